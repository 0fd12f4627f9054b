"""Which Redis to talk to: `REDIS_URL` (passwords and `rediss://` work), else the embedded server of this machine.

Connections are created here and then passed explicitly; nothing in the package keeps a global client.
Clients are in bytes mode (what RQ expects); our helpers decode.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

import redis

from worker.defaults import ALLOW_INSECURE_ENV, REDIS_CONNECT_TIMEOUT, REDIS_HOST, REDIS_PORT
from worker.errors import InsecureRedisError, RedisUnavailableError
from worker.paths import password_file


def embedded_port() -> int:
    """Port of the embedded Redis: env `REDIS_PORT` or 6379."""
    raw = os.environ.get("REDIS_PORT", "").strip()
    if not raw:
        return REDIS_PORT
    try:
        port = int(raw)
    except ValueError:
        raise RedisUnavailableError(f"REDIS_PORT must be a port number, got {raw!r}") from None
    if not 0 < port < 65536:
        raise RedisUnavailableError(f"REDIS_PORT must be between 1 and 65535, got {port}")
    return port


def embedded_password() -> str | None:
    """The password the embedded server was started with (None before its first start)."""
    path = password_file()
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def embedded_url(password: str | None = None, port: int | None = None) -> str:
    """URL of the embedded server; the password is read from var/redis/password when not given."""
    password = password if password is not None else embedded_password()
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{REDIS_HOST}:{port or embedded_port()}/0"


def redis_url() -> str:
    """`REDIS_URL` if set, else the embedded server's URL (with its password)."""
    return os.environ.get("REDIS_URL", "").strip() or embedded_url()


def redact(url: str) -> str:
    """The URL with its password replaced by `***`, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def is_loopback(host: str | None) -> bool:
    """Whether every address `host` resolves to is loopback (127.0.0.0/8, ::1); a name that does not resolve is not."""
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def insecure_reason(url: str) -> str | None:
    """Why `url` lets anyone who reaches its port run jobs on every worker, or None: a TCP Redis off loopback with
    neither a password nor a TLS client certificate (`rediss://...?ssl_certfile=...`). Unix sockets are local."""
    parts = urlsplit(url)
    if parts.scheme == "unix" or is_loopback(parts.hostname):
        return None
    if parts.password:
        return None
    if parts.scheme == "rediss" and parse_qs(parts.query).get("ssl_certfile"):
        return None
    return (f"Redis at {redact(url)} is off loopback and has no password: anyone who reaches it can queue jobs "
            "on every worker")


def allows_insecure() -> bool:
    """REDIS_ALLOW_INSECURE=1 (or true/yes): the operator accepts a password-less Redis off loopback."""
    return os.environ.get(ALLOW_INSECURE_ENV, "").strip().lower() in ("1", "true", "yes")


_warned: set[str] = set()


def check_secure(url: str) -> None:
    """Refuse an insecure URL (InsecureRedisError with the fix) unless REDIS_ALLOW_INSECURE=1, which prints a
    warning once per URL and process."""
    reason = insecure_reason(url)
    if reason is None:
        return
    if not allows_insecure():
        parts = urlsplit(url)
        raise InsecureRedisError(
            f"{reason}. Set a password on that server (requirepass) and use "
            f"REDIS_URL=redis://:PASSWORD@{parts.hostname}:{parts.port or 6379}/0 (or rediss:// with a client "
            f"certificate), or set {ALLOW_INSECURE_ENV}=1 to allow it on purpose")
    if url not in _warned:
        _warned.add(url)
        print(f"warning: {reason} ({ALLOW_INSECURE_ENV}=1 allows it)", file=sys.stderr, flush=True)


def connect(url: str | None = None) -> redis.Redis:
    """A client for `url` (default `redis_url()`). Lazy: nothing is sent until the first command. A password-less
    URL off loopback is refused here (`check_secure`), so the worker, the CLI and the dashboard all refuse it."""
    url = url or redis_url()
    check_secure(url)
    conn = redis.Redis.from_url(
        url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        socket_keepalive=True,
        health_check_interval=30,
        retry_on_timeout=True,
    )
    conn._trainer_url = url  # the exact URL (TLS options included) for child processes, see connection_url()
    return conn


def check(conn: redis.Redis) -> redis.Redis:
    """PING; a friendly RedisUnavailableError instead of a driver traceback when it fails."""
    url = connection_url(conn)
    parts = urlsplit(url)
    try:
        conn.ping()
    except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError) as err:
        no_password = not parts.password and ("NOAUTH" in str(err) or "authenticated" in str(err))
        if no_password:  # redis-py 8 raises AuthenticationError for NOAUTH; older versions a ResponseError
            host = f"{parts.hostname}:{parts.port or 6379}"
            raise RedisUnavailableError(
                f"Redis at {redact(url)} needs a password: set REDIS_URL={parts.scheme}://:PASSWORD@{host}/0"
            ) from None
        if isinstance(err, redis.exceptions.AuthenticationError):
            raise RedisUnavailableError(f"Redis at {redact(url)} refused the password: {err}") from None
        raise RedisUnavailableError(f"Redis at {redact(url)}: {err}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as err:
        hint = "" if os.environ.get("REDIS_URL") else " (start it with `python -m worker redis` or `honcho start`)"
        if parts.scheme == "redis" and "reset by peer" in str(err):  # what a TLS-only port does to plain TCP
            hint += " (if that server only speaks TLS, use a rediss:// URL)"
        raise RedisUnavailableError(f"cannot reach Redis at {redact(url)}{hint}: {err}") from None
    return conn


def connection_url(conn: redis.Redis) -> str:
    """A URL that reaches the same server as `conn` (password included), for child processes."""
    if getattr(conn, "_trainer_url", None):
        return conn._trainer_url
    kw = conn.connection_pool.connection_kwargs
    scheme = "rediss" if conn.connection_pool.connection_class.__name__ == "SSLConnection" else "redis"
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    user = quote(kw.get("username") or "", safe="")
    password = kw.get("password")
    auth = f"{user}:{quote(password, safe='')}@" if password else (f"{user}@" if user else "")
    return f"{scheme}://{auth}{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def wait_for_redis(timeout: float) -> tuple[str, redis.Redis]:
    """(url, checked connection), retrying for `timeout` seconds: under honcho the worker may start before the
    embedded server has (and before its password file exists), so the URL is re-read on every try."""
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        url = redis_url()
        conn = connect(url)  # an insecure URL raises here, at once: waiting does not make it secure
        try:
            return url, check(conn)
        except RedisUnavailableError as err:
            conn.close()
            if time.monotonic() >= deadline:
                raise
            if not announced:
                print(f"waiting for Redis: {err}", file=sys.stderr, flush=True)
                announced = True
            time.sleep(1.0)
