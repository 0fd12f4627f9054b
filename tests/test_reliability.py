"""Faults and safe defaults, with the real test Redis, real `python -m worker run` processes and the real dashboard
(AppTest). What the worker engineer's tests already cover is not repeated here (see docs/reliability.md):
SIGKILL of a worker mid-epoch and the worker's own time limit are in tests/test_worker_jobs.py.

Here: the embedded Redis stopped and restarted mid-job (nothing lost, workers reconnect, the dashboard's banner comes
and goes); cancel during dataset preparation, training and export (clean `cancelled`, no orphan, the run folder
marked partial); an unwritable and a full artifact store; a job that raises; and the safe defaults (password on the
embedded Redis, JSON payloads, `torch.load(weights_only=True)`, job ids as the only way to reach a file, the
dashboard's optional login).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import zlib
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from tests.conftest import ROOT, free_port
from tests.fixtures_app import open_page
from tests.fixtures_worker import DIGITS, explain_job, make_imagefolder, wait_for
from tests.test_worker_jobs import rank_processes
from worker import api, keys
from worker.errors import ArtifactError, NoSuchJobError
from worker.submit import submit_job

FAST = ["export.enabled=false", "train.log_every=2", "data.image_size=16"]


def start_worker(spawn: Any, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return spawn.python(["worker", "run", "--cpu", "--slots", "1", *args], env, name="worker")


def status(conn: Any, job_id: str) -> dict[str, Any]:
    return api.job_status(conn, job_id)


def final(conn: Any, job_id: str) -> bool:
    return bool(status(conn, job_id)["final"])


# ======================================================================================= Redis stopped mid-job
def test_redis_restart_mid_job_loses_nothing(tmp_path: Path, spawn: Any, test_token: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m worker redis` (append-only, password in var/) is stopped with SIGTERM while a job trains and
    another waits, then started again: every job is still there and finishes, each epoch once; the worker process
    is the same one (it reconnected); the dashboard shows the banner while Redis is down and recovers by itself."""
    port = free_port()
    env = {**os.environ, "TRAINER_VAR_DIR": str(tmp_path / "var"), "ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           "REDIS_PORT": str(port), "WORKER_HEARTBEAT_TTL": "3", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "TRAINER_TEST_TOKEN": test_token, "DATA_CACHE_DIR": str(tmp_path / "data-cache")}
    env.pop("REDIS_URL", None)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("REDIS_URL", raising=False)
    from worker.connection import check, connect, embedded_url

    server = spawn.python(["worker", "redis"], env, name="redis")
    conn = wait_for(lambda: _ping(connect(embedded_url())), 20, "the embedded Redis")
    # safe default: loopback only, and nobody gets in without the generated password
    assert conn.config_get("bind")["bind"] == "127.0.0.1" and conn.config_get("appendonly")["appendonly"] == "yes"
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port).ping()

    worker = start_worker(spawn, env)
    done = submit_job(DIGITS, ["train.epochs=1", *FAST], connection=conn, allow_local_paths=True).job_id
    wait_for(lambda: final(conn, done), 120, "the first job", explain=explain_job(conn, done, spawn))
    running = submit_job(DIGITS, ["train.epochs=3", *FAST], connection=conn, allow_local_paths=True).job_id
    waiting = submit_job(DIGITS, ["train.epochs=1", *FAST], connection=conn, allow_local_paths=True).job_id
    wait_for(lambda: api.epoch_events(conn, running), 120, "epoch 1", explain=explain_job(conn, running, spawn))

    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=20) == 0
    at = open_page("jobs")  # the dashboard while Redis is down: a banner, not a traceback
    assert not at.exception and at.error and "Redis is unreachable" in at.error[0].value
    assert embedded_url().split("@")[0].split(":")[-1] not in at.error[0].value  # the password is not shown

    spawn.python(["worker", "redis"], env, name="redis-again")
    conn = wait_for(lambda: _ping(connect(embedded_url())), 20, "the restarted Redis")
    at.run()  # what the banner's reconnect fragment triggers: the same session, the same cached client
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert {done, running, waiting} <= {j["id"] for j in api.list_jobs(conn)}

    for job_id in (running, waiting):
        wait_for(lambda j=job_id: final(conn, j), 240, f"job {job_id} to end", explain=explain_job(conn, job_id, spawn))
    for job_id, epochs in ((done, [1]), (running, [1, 2, 3]), (waiting, [1])):
        st = status(conn, job_id)
        assert st["state"] == "finished", (job_id, st.get("error"), explain_job(conn, job_id, spawn)())
        assert [e["epoch"] for e in api.epoch_events(conn, job_id)] == epochs
    assert worker.poll() is None  # the same worker process, reconnected
    wait_for(lambda: api.list_workers(conn), 15, "the worker to advertise itself again")
    check(conn)
    assert rank_processes(test_token) == []


def _ping(conn: Any) -> Any:
    try:
        conn.ping()
        return conn
    except redis.exceptions.RedisError:
        return None


# ================================================================================================ cancel
def _run_dir(job_env: dict[str, str], job_id: str) -> Path:
    return Path(job_env["ARTIFACTS_DIR"]) / "jobs" / job_id / "run"


def _cancel_and_check(conn: Any, job_id: str, job_env: dict[str, str], token: str) -> dict[str, Any]:
    assert api.cancel_job(conn, job_id, wait=15) == "cancelled", explain_job(conn, job_id, None)
    st = status(conn, job_id)
    assert st["state"] == "cancelled" and st["artifacts"]["partial"] is True, st
    assert psutil.wait_procs(rank_processes(token), timeout=5)[1] == []  # no orphan rank
    marker = _run_dir(job_env, job_id) / "CANCELLED"
    assert marker.is_file(), sorted(p.name for p in _run_dir(job_env, job_id).iterdir())
    assert "CANCELLED" in st["artifacts"]["files"]  # the store's copy says it is partial
    return st


def test_cancel_during_preparation_training_and_export(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                                       test_token: str, tmp_path: Path) -> None:
    worker = start_worker(spawn, job_env)
    # 1. while the run is being prepared (dataset fetched, process starting, data scanned): no step yet
    folder = make_imagefolder(tmp_path / "shapes", per_class=150, size=24)
    prep = submit_job(DIGITS, ["train.epochs=1", "train.batch_size=8", *FAST], connection=redis_conn,
                      dataset_path=folder).job_id
    wait_for(lambda: status(redis_conn, prep)["state"] == "running", 60, "the job to start")
    _cancel_and_check(redis_conn, prep, job_env, test_token)
    assert not [e for e in api.events_since(redis_conn, prep) if e["type"] == "step"]

    # 2. while training
    train = submit_job(DIGITS, ["train.epochs=50", *FAST], connection=redis_conn, allow_local_paths=True).job_id
    wait_for(lambda: any(e["type"] == "step" for e in api.events_since(redis_conn, train)), 90, "a step",
             explain=explain_job(redis_conn, train, spawn))
    _cancel_and_check(redis_conn, train, job_env, test_token)

    # 3. while exporting: report.json exists, the export is incomplete, the run says CANCELLED
    export = submit_job(DIGITS, ["train.epochs=1", "train.log_every=2", "data.image_size=16"],
                        connection=redis_conn, allow_local_paths=True).job_id
    wait_for(lambda: status(redis_conn, export).get("phase") == "export" or final(redis_conn, export), 120,
             "the export phase", interval=0.1, explain=explain_job(redis_conn, export, spawn))
    st = _cancel_and_check(redis_conn, export, job_env, test_token)
    assert "export/bundle.zip" not in st["artifacts"]["files"]
    assert worker.poll() is None and api.list_workers(redis_conn)[0]["state"] in ("idle", "busy")


# ======================================================================================== failures say why
@pytest.fixture
def tiny_store(tmp_path: Path) -> Any:
    """A 96 KiB tmpfs as the artifact store (root only: skipped where mount is not allowed)."""
    mnt = tmp_path / "tiny-store"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_unwritable_full_store_and_a_raising_job_fail_with_the_reason(
        redis_conn: Any, job_env: dict[str, str], spawn: Any, tiny_store: Path, monkeypatch: pytest.MonkeyPatch,
        test_token: str) -> None:
    monkeypatch.setenv("ARTIFACTS_DIR", str(tiny_store))
    monkeypatch.setenv("DISK_MIN_FREE_GB", "0")  # the store fills during the jobs, not before (the floor: test_storage)
    env = {**job_env, "ARTIFACTS_DIR": str(tiny_store), "DISK_MIN_FREE_GB": "0"}
    # unwritable: the job's folder in the store cannot be created (a file is in the way)
    blocked = submit_job(DIGITS, ["train.epochs=1", *FAST], connection=redis_conn, allow_local_paths=True).job_id
    (tiny_store / "jobs").mkdir()
    (tiny_store / "jobs" / blocked).write_text("in the way")
    # raises: an unexpected exception inside core (its events file is a folder): traceback tail in status and logs
    raising = submit_job(DIGITS, ["train.epochs=1", *FAST], connection=redis_conn, allow_local_paths=True).job_id
    (tiny_store / "jobs" / raising / "run" / "metrics.jsonl").mkdir(parents=True)
    # full: the first checkpoint does not fit in 96 KiB
    full = submit_job(DIGITS, ["train.epochs=2", *FAST], connection=redis_conn, allow_local_paths=True).job_id

    worker = start_worker(spawn, env, "--burst")
    assert worker.wait(timeout=240) == 0, spawn.output(worker)

    st = status(redis_conn, blocked)
    assert st["state"] == "failed" and st["error_kind"] == "ArtifactError", st
    assert re.search(r"the artifact store .* is not writable", st["error"]), st["error"]

    st = status(redis_conn, raising)
    assert st["state"] == "failed" and st["exit_code"] == 1, st
    assert "Is a directory" in st["error"], st["error"]
    assert any("Traceback (most recent call last)" in line for line in st["log_tail"]), st["log_tail"]
    assert any("IsADirectoryError" in line for line in st["log_tail"])
    logs = [e["line"] for e in api.logs_tail(redis_conn, raising, 500)]
    assert any("IsADirectoryError" in line for line in logs)

    st = status(redis_conn, full)
    assert st["state"] == "failed" and st["error_kind"] == "ArtifactError", st
    assert re.search(r"the artifact store .* is full", st["error"]), st["error"]
    assert rank_processes(test_token) == []


# =========================================================================================== safe defaults
def test_every_torch_load_uses_weights_only() -> None:
    """No pickle from a checkpoint or a downloaded file can run code: every torch.load passes weights_only=True."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or "var" in path.parts[len(ROOT.parts):len(ROOT.parts) + 1]:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find(")", m.start()) + 1 + 200]
            depth, end = 0, m.end() - 1
            for end in range(m.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[m.start(): end + 1]
            if "weights_only=True" not in call and not text[max(0, m.start() - 1)].isalnum() and "`" not in call:
                offenders.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {call[:80]}")
    assert not offenders, offenders


def test_job_payloads_in_redis_are_json_not_pickle(redis_conn: Any, job_env: dict[str, str]) -> None:
    from rq.job import Job
    from rq.serializers import JSONSerializer

    job_id = submit_job(DIGITS, ["train.epochs=1"], connection=redis_conn, allow_local_paths=True).job_id
    rq_job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
    assert rq_job.func_name == "worker.attempt.run_attempt" and rq_job.args == [job_id]
    for key in redis_conn.scan_iter(match="rq:job:*"):
        raw = redis_conn.hget(key, "data")
        body = zlib.decompress(raw)
        assert not body.startswith(b"\x80"), key  # a pickle starts with the PROTO opcode
        json.loads(body)
    for field, value in redis_conn.hgetall(keys.job(job_id)).items():
        assert not value.startswith(b"\x80"), field


@pytest.mark.parametrize("bad", ["../../etc/passwd", "..", "/etc/passwd", "20250101-120000-abcdef/../x",
                                 "20250101-120000-abcde", "20250101-120000-abcdef\n", ""])
def test_a_typed_job_id_never_reaches_the_filesystem(bad: str, redis_conn: Any, job_env: dict[str, str]) -> None:
    with pytest.raises(NoSuchJobError):
        api.job_status(redis_conn, bad)
    with pytest.raises(NoSuchJobError):
        api.artifact_files(bad)
    with pytest.raises(NoSuchJobError):
        api.open_artifact(bad, "report")


def test_artifact_names_outside_the_listing_are_refused(redis_conn: Any, job_env: dict[str, str]) -> None:
    job_id = submit_job(DIGITS, ["train.epochs=1"], connection=redis_conn, allow_local_paths=True).job_id
    run = Path(job_env["ARTIFACTS_DIR"]) / "jobs" / job_id / "run"
    run.mkdir(parents=True)
    (run / "report.json").write_text("{}")
    (Path(job_env["ARTIFACTS_DIR"]) / "secret.txt").write_text("no")
    assert api.read_artifact(job_id, "report") == b"{}"
    for name in ("../../secret.txt", "/etc/passwd", "../run/report.json", "report.json/../../../secret.txt"):
        with pytest.raises(ArtifactError):
            api.read_artifact(job_id, name)
    at = open_page("job", {"job": "../../etc/passwd"})  # a crafted link: a message, no traceback, no file read
    assert not at.exception


def test_dashboard_login_with_a_shared_password(redis_conn: Any, job_env: dict[str, str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    from tests.fixtures_app import APP

    monkeypatch.setenv("DASHBOARD_PASSWORD", "correct horse")
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Sign in"]  # nothing else is drawn: no jobs, no navigation
    at.text_input[0].input("wrong")
    at.button[0].click().run()
    assert at.error and at.error[0].value == "Wrong password." and [t.value for t in at.title] == ["Sign in"]
    at.text_input[0].input("correct horse")
    at.button[0].click().run()
    assert not at.exception and at.title[0].value == "New job"

    monkeypatch.delenv("DASHBOARD_PASSWORD")  # no password configured: open (a trusted network)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception and at.title[0].value == "New job"


def test_dashboard_login_with_oidc_shows_only_the_sign_in_until_logged_in(redis_conn: Any, job_env: dict[str, str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An `[auth]` secrets section turns on st.login: a logged-out session sees "Sign in" and a "Log in" button and
    nothing else; a logged-in one sees the dashboard and a "Log out" button. (The redirect to the identity provider
    and back needs a provider; it is Streamlit's code, not exercised here.)"""
    from streamlit.testing.v1 import AppTest

    from tests.fixtures_app import APP

    monkeypatch.delenv("DASHBOARD_PASSWORD", raising=False)
    from app.defaults import ALLOWED_EMAILS_ENV

    monkeypatch.setenv(ALLOWED_EMAILS_ENV, "ada@example.com")  # OIDC is refused without an allow-list
    auth = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "c" * 32, "client_id": "id",
            "client_secret": "secret", "server_metadata_url": "https://idp.example/.well-known/openid-configuration"}
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.secrets["auth"] = auth
    at.user = {"is_logged_in": False}
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == ["Sign in"] and [b.label for b in at.button] == ["Log in"]

    at = AppTest.from_file(str(APP), default_timeout=60)
    at.secrets["auth"] = auth
    at.user = {"is_logged_in": True, "email": "ada@example.com"}
    at.run()
    assert not at.exception and at.title[0].value == "New job"
    assert "Log out" in [b.label for b in at.sidebar.button]
