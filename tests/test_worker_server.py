"""The embedded Redis (`python -m worker redis`): loopback, password generated once and kept 0600, persistence,
a second start that does not start a second server, and no orphan whichever way it stops."""
from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from worker.connection import check, connect, embedded_password, redis_url
from worker.errors import RedisUnavailableError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def servers_on(port: int) -> list[psutil.Process]:
    """redis-server processes serving this port (redis retitles itself `redis-server 127.0.0.1:PORT`)."""
    out = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if "redis-server" in (proc.info["name"] or "") and f":{port}" in " ".join(proc.info["cmdline"] or []) \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def wait_ping(timeout: float = 15) -> redis.Redis:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check(connect())
        except RedisUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def embedded_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_token: str) -> dict[str, str]:
    """No REDIS_URL: clients must find the embedded server and its password in TRAINER_VAR_DIR by themselves."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("TRAINER_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("REDIS_PORT", str(free_port()))
    monkeypatch.setenv("TRAINER_TEST_TOKEN", test_token)
    return dict(os.environ)


def test_embedded_redis_single_instance_password_persistence_no_orphan(embedded_env: dict[str, str],
                                                                        spawn: Any) -> None:
    data_dir = Path(embedded_env["TRAINER_VAR_DIR"]) / "redis"
    port = int(embedded_env["REDIS_PORT"])
    first = spawn.python(["worker", "redis"], embedded_env, name="redis")
    conn = wait_ping()

    # exec'd: the process honcho started *is* the server, bound to loopback only
    assert "redis-server" in psutil.Process(first.pid).name()
    assert [s.pid for s in servers_on(port)] == [first.pid]
    assert conn.config_get("bind")["bind"] == "127.0.0.1"

    # a password was generated, kept 0600, never on a command line; clients read it by themselves
    password_file = data_dir / "password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / "redis.conf").stat().st_mode) == 0o600
    password = embedded_password()
    assert password and len(password) >= 24 and password in redis_url()
    assert not any(password in arg for arg in psutil.Process(first.pid).cmdline())
    anonymous = redis.Redis(host="127.0.0.1", port=int(embedded_env["REDIS_PORT"]))
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    assert conn.config_get("appendonly")["appendonly"] == "yes"
    conn.set("survives", "restart")

    # starting twice does not start a second server: the second one watches the first (and says so)
    second = spawn.python(["worker", "redis"], embedded_env, name="redis-again")
    deadline = time.monotonic() + 20
    while "already running" not in spawn.output(second) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "already running" in spawn.output(second)
    assert second.poll() is None
    assert [s.pid for s in servers_on(port)] == [first.pid]

    # SIGTERM stops the server (append-only file synced); the watcher notices and exits by itself
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 0
    assert second.wait(timeout=20) == 0
    assert servers_on(port) == []

    # a restart keeps the data and the password
    third = spawn.python(["worker", "redis"], embedded_env, name="redis-third")
    conn = wait_ping()
    assert conn.get("survives") == b"restart" and embedded_password() == password

    # SIGKILL of what honcho started leaves nothing behind: there is no wrapper to orphan a server
    third.send_signal(signal.SIGKILL)
    third.wait(timeout=10)
    time.sleep(0.2)
    assert servers_on(port) == []


def test_embedded_redis_refuses_a_port_used_by_another_program(embedded_env: dict[str, str], spawn: Any) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(embedded_env["REDIS_PORT"])))
        squatter.listen(1)
        proc = spawn.python(["worker", "redis"], embedded_env, name="redis")
        assert proc.wait(timeout=30) == 1
    out = spawn.output(proc)
    assert "used by another program" in out and "REDIS_PORT" in out
