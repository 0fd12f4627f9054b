"""`python -m worker doctor [--json]` against real parts: the test's redis-server, real `python -m worker run` workers
advertising their artifact store, a store made read-only by a read-only bind mount (in a private mount namespace),
and a REDIS_URL whose password is wrong."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_worker import ROOT, run_cli, wait_for


def doctor(env: dict[str, str], prefix: list[str] | None = None) -> tuple[int, dict[str, Any]]:
    cmd = [*(prefix or []), sys.executable, "-m", "worker", "doctor", "--json"]
    env = {**env, "WORKER_ADDR": "127.0.0.1"}  # the address check stays on loopback (a warning: single machine)
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    try:
        out = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON (exit {res.returncode}):\n{res.stdout}\n{res.stderr}") from None
    return res.returncode, out


def by_name(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in out["checks"]}


def start_worker(spawn: Any, env: dict[str, str], conn: Any, name: str) -> None:
    from worker import api

    proc = spawn.python(["worker", "run", "--cpu", "--slots", "1", "--no-prewarm", "--name", name], env, name=name)
    wait_for(lambda: any(w["name"] == name for w in api.list_workers(conn)) or proc.poll() is not None, 60,
             f"worker {name} to advertise", explain=lambda: spawn.output(proc))
    assert proc.poll() is None, spawn.output(proc)


def test_a_good_setup_passes_and_a_worker_on_another_store_fails(job_env: dict[str, str], redis_conn: Any,
                                                                 spawn: Any, tmp_path: Path) -> None:
    start_worker(spawn, job_env, redis_conn, "same-store")
    rc, out = doctor(job_env)
    checks = by_name(out)
    assert rc == 0 and out["ok"], json.dumps(out, indent=1)
    assert {c["status"] for c in out["checks"]} <= {"ok", "warn", "skip"}
    assert checks["redis"]["status"] == "ok" and checks["redis"]["data"]["version"]
    assert checks["redis"]["data"]["aof"] is True  # the test server has the embedded server's config
    assert checks["store"]["status"] == "ok" and "written, read back" in checks["store"]["detail"]
    assert checks["shared store"]["status"] == "ok" and "same store as the 1 live worker" in \
        checks["shared store"]["detail"]
    assert checks["distributed"]["data"]["gloo"] == "ok"
    assert checks["packages"]["status"] in ("ok", "warn") and checks["python"]["status"] == "ok"
    assert checks["address"]["status"] == "warn" and "loopback" in checks["address"]["detail"]

    other = {**job_env, "ARTIFACTS_DIR": str(tmp_path / "another-store")}
    start_worker(spawn, other, redis_conn, "other-store")
    text = run_cli(["worker", "doctor"], {**job_env, "WORKER_ADDR": "127.0.0.1"}, timeout=300)  # the human-readable form
    assert text.returncode == 1, text.stdout + text.stderr
    assert re.search(r"FAIL +shared store +1 of 2 live worker\(s\) use another artifact store", text.stdout)
    assert "other-store on" in text.stdout and "fix: set ARTIFACTS_DIR to the same store" in text.stdout
    assert "cannot serve jobs (1 problem(s): shared store)" in text.stdout


def test_a_bad_redis_url_and_a_read_only_store_fail_with_their_fixes(job_env: dict[str, str], redis_server: Any,
                                                                     redis_conn: Any) -> None:
    """One run, two faults (each check is independent): a wrong password in REDIS_URL, and the artifact store
    mounted read-only (a bind mount in a private mount namespace; where that is not allowed, only Redis is tested)."""
    env = {**job_env, "REDIS_URL": f"redis://:wrong@127.0.0.1:{redis_server.port}/0"}
    store = Path(job_env["ARTIFACTS_DIR"])
    store.mkdir(parents=True, exist_ok=True)
    mount = ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f'mount --bind -o ro "{store}" "{store}" && exec "$@"', "sh"]
    read_only = shutil.which("unshare") is not None and subprocess.run(
        [*mount, "true"], capture_output=True, check=False).returncode == 0
    rc, out = doctor(env, prefix=mount if read_only else None)
    checks = by_name(out)
    assert rc == 1 and not out["ok"]
    redis = checks["redis"]
    assert redis["status"] == "fail" and "refused the password" in redis["detail"]
    assert ":wrong@" not in json.dumps(out)  # the password is never printed
    assert "REDIS_URL=redis://:PASSWORD@HOST:6379/0" in redis["fix"]
    assert checks["shared store"]["status"] == "skip"
    if not read_only:
        pytest.skip("no private mount namespace here (needs CAP_SYS_ADMIN): the read-only store was not tested")
    assert checks["store"]["status"] == "fail", json.dumps(out, indent=1)
    assert "not writable" in checks["store"]["detail"] and "Read-only file system" in checks["store"]["detail"]
    assert "ARTIFACTS_DIR" in checks["store"]["fix"]
    assert checks["python"]["status"] == "ok" and checks["distributed"]["status"] == "ok"  # the rest is fine
