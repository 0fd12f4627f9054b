"""A Redis that anyone on the network can write to means code on every worker: off loopback, a URL with neither a
password nor a TLS client certificate is refused by the worker, the CLI, `worker doctor` and the dashboard, unless
REDIS_ALLOW_INSECURE=1 says it is on purpose (then a warning).

The real case: a password-less redis-server bound to an address that is not loopback, inside a network namespace
this test makes (tests/test_multinode_netns.py's two_hosts), and the real `python -m worker` commands in the other
namespace.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_app import open_page
from tests.fixtures_worker import wait_for
from tests.test_multinode_netns import ADDR_A, _cli, _in, two_hosts  # noqa: F401 - two_hosts is a fixture
from worker.connection import insecure_reason

PORT = 6391


def test_which_urls_are_insecure() -> None:
    assert insecure_reason("redis://127.0.0.1:6379/0") is None
    assert insecure_reason("redis://localhost:6379/0") is None
    assert insecure_reason("redis://[::1]:6379/0") is None
    assert insecure_reason("unix:///tmp/redis.sock") is None
    assert insecure_reason("redis://:pw@10.1.2.3:6379/0") is None
    assert insecure_reason("rediss://10.1.2.3:6379/0?ssl_certfile=/c.pem&ssl_keyfile=/k.pem") is None
    for url in ("redis://10.1.2.3:6379/0", "rediss://10.1.2.3:6379/0", "redis://user@10.1.2.3/0",
                "redis://no-such-host.invalid:6379/0"):
        reason = insecure_reason(url)
        assert reason and "no password" in reason, url


def _passwordless_redis(tmp_path: Path, ns: str, spawn: Any, env: dict[str, str]) -> None:
    from worker.server import server_binary

    data = tmp_path / "open-redis"
    data.mkdir()
    conf = data / "redis.conf"
    conf.write_text("\n".join([f"bind {ADDR_A}", "protected-mode no", f"port {PORT}", f"dir {data}",
                               'save ""', "appendonly no", "daemonize no", 'logfile ""']) + "\n")
    spawn(["ip", "netns", "exec", ns, server_binary(), str(conf)], env, name="open-redis")


def _keys(ns: str) -> int:
    """How many keys the password-less server holds (asked from inside its namespace; -1 while it does not answer)."""
    code = f"import redis; print(redis.Redis(host={ADDR_A!r}, port={PORT}).dbsize())"
    res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=False)
    return int(res.stdout.strip()) if res.returncode == 0 else -1


def test_a_passwordless_redis_off_loopback_is_refused(two_hosts: tuple[str, str], job_env: dict[str, str],  # noqa: F811
                                                      spawn: Any, tmp_path: Path) -> None:
    ns_a, ns_b = two_hosts
    env = {**job_env, "REDIS_URL": f"redis://{ADDR_A}:{PORT}/0", "PATH": os.environ["PATH"]}
    env.pop("REDIS_ALLOW_INSECURE", None)
    _passwordless_redis(tmp_path, ns_a, spawn, env)
    wait_for(lambda: _keys(ns_a) == 0, 30, "the password-less redis-server to answer")

    worker = subprocess.run(_in(ns_b, ["worker", "run", "--cpu", "--burst", "--no-prewarm", "--wait", "5"]),
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert worker.returncode == 2, worker.stderr[-2000:]
    assert "no password" in worker.stderr and "REDIS_ALLOW_INSECURE=1" in worker.stderr
    assert "Traceback" not in worker.stderr
    listing = _cli(ns_b, ["worker", "list"], env)
    assert listing.returncode == 2 and "no password" in listing.stderr
    assert _keys(ns_a) == 0  # neither registered a worker nor wrote anything

    doctor = _cli(ns_b, ["worker", "doctor", "--json"], env)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert doctor.returncode == 1 and checks["redis security"]["status"] == "fail"
    assert "REDIS_ALLOW_INSECURE=1" in checks["redis security"]["fix"]

    allowed = {**env, "REDIS_ALLOW_INSECURE": "1"}
    listing = _cli(ns_b, ["worker", "list", "--json"], allowed)
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout) == [] and "warning:" in listing.stderr and "no password" in listing.stderr
    doctor = _cli(ns_b, ["worker", "doctor", "--json"], allowed)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["redis security"]["status"] == "warn" and checks["redis"]["status"] != "fail"


def test_the_dashboard_refuses_an_insecure_url(redis_conn: Any, job_env: dict[str, str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before anything is sent: the address (TEST-NET-1) is never contacted."""
    monkeypatch.setenv("REDIS_URL", "redis://192.0.2.10:6379/0")
    monkeypatch.delenv("REDIS_ALLOW_INSECURE", raising=False)
    at = open_page("jobs")
    assert not at.exception, [e.value for e in at.exception]
    assert at.error and "no password" in at.error[0].value and "REDIS_ALLOW_INSECURE=1" in at.error[0].value
