"""Real jobs through real workers: `python -m worker run` subprocesses against the session's redis-server, training
digits on CPU (gloo for 2 ranks). Cancel and recovery check the process table, not just the status."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import processes_with_token
from tests.fixtures_worker import DIGITS, ROOT, explain_job, make_imagefolder, run_cli, wait_for
from worker import api, keys
from worker.defaults import GUARD_POLL_INTERVAL
from worker.submit import submit_job
from worker.warmstart import BUSY_NAME, IDLE_NAME

FAST = ["export.enabled=false", "train.log_every=2", "data.image_size=16"]
"""Every job here: digits, no export (tests/test_export.py tests that), frequent step events."""


def state_of(conn: Any, job_id: str) -> str:
    return api.job_status(conn, job_id)["state"]


def epochs_streamed(conn: Any, job_id: str) -> list[int]:
    return [e["epoch"] for e in api.epoch_events(conn, job_id)]


def _cmdline_and_name(proc: psutil.Process) -> tuple[str, str]:
    try:
        return " ".join(proc.cmdline()), proc.name()
    except psutil.Error:  # gone meanwhile
        return "", ""


def rank_processes(token: str) -> list[psutil.Process]:
    """Live training processes (core.train or torchrun, any rank, or a worker's pre-started trainer that took a
    job) started by this test. An idle pre-started trainer is not one: it holds no job."""
    out = []
    for proc in processes_with_token(token):
        cmd, name = _cmdline_and_name(proc)
        busy_warm = "worker.warmstart" in cmd and name == BUSY_NAME
        launcher = "torch.distributed.run" in cmd or "worker.torchrun" in cmd  # torchrun, or ours (multi-node)
        if ("core.train" in cmd or launcher or busy_warm) and "worker.guard" not in cmd:
            out.append(proc)
    return out


def start_worker(spawn: Any, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return spawn.python(["worker", "run", "--cpu", "--slots", "2", *args], env, name="worker")


def test_submit_then_burst_worker_trains_to_finished(redis_conn: Any, job_env: dict[str, str], spawn: Any) -> None:
    job_id = submit_job(DIGITS, ["train.epochs=2", *FAST], connection=redis_conn, allow_local_paths=True).job_id
    assert state_of(redis_conn, job_id) == "queued"

    worker = start_worker(spawn, job_env, "--burst")
    assert worker.wait(timeout=150) == 0, spawn.output(worker)

    st = api.job_status(redis_conn, job_id)
    assert st["state"] == "finished", (st, spawn.output(worker))
    assert st["progress"] == 1.0 and st["epoch"] == 2 and st["epochs"] == 2
    assert 0.3 < st["best_val_acc"] <= 1.0
    assert st["started_at"] >= st["submitted_at"] and st["ended_at"] >= st["started_at"]
    assert epochs_streamed(redis_conn, job_id) == [1, 2]
    types = {e["type"] for e in api.events_since(redis_conn, job_id)}
    assert {"start", "step", "epoch", "phase", "report"} <= types

    files = api.artifact_files(job_id)
    assert {"report.json", "checkpoints/last.pt", "config.yaml", "job.log"} <= set(files)
    assert st["artifacts"]["report"].endswith("report.json") and st["artifacts"]["partial"] is False
    report = json.loads(api.read_artifact(job_id, "report"))
    assert report["epochs_completed"] == 2
    assert any("epoch 2/2" in line["line"] for line in api.logs_tail(redis_conn, job_id))

    # the CLI reads the same status, as JSON with the contract's keys
    out = run_cli(["worker", "status", job_id, "--json"], job_env)
    cli = json.loads(out.stdout)
    assert {"state", "progress", "epoch", "epochs", "error", "artifacts"} <= set(cli)
    assert cli["state"] == "finished"
    logs = run_cli(["worker", "logs", job_id, "--follow"], job_env)  # a finished job: prints everything, returns
    assert logs.returncode == 0 and "epoch 2/2" in logs.stdout and "[worker] finished" in logs.stdout


def test_two_rank_job_uploaded_dataset_remote_store_and_a_failing_job(
        redis_conn: Any, job_env: dict[str, str], spawn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One burst worker, three jobs, an fsspec URL artifact store (file:// here, s3:// in production):
    - `--gpus 2` on a CPU worker: two gloo ranks under torchrun;
    - an uploaded imagefolder: stored at submission, fetched into the worker's cache, the run folder uploaded;
    - a job that fails by itself (its CIFAR files are missing on the worker: core exits 2 while loading data): it
      ends `failed` with the error and the log tail, once (no retry)."""
    bucket = f"file://{tmp_path / 'bucket'}"
    monkeypatch.setenv("ARTIFACTS_DIR", bucket)
    env = {**job_env, "ARTIFACTS_DIR": bucket}
    ddp = submit_job(DIGITS, ["train.epochs=1", *FAST], connection=redis_conn, gpus=2, allow_local_paths=True).job_id
    folder = make_imagefolder(tmp_path / "shapes")
    shapes = submit_job(DIGITS, ["train.epochs=2", "data.image_size=16", "train.batch_size=8", *FAST],
                        connection=redis_conn, dataset_path=folder).job_id
    missing = Path(job_env["TRAINER_VAR_DIR"]) / "no-cifar-here"
    bad = submit_job(DIGITS, ["data.name=cifar10", f"data.path={missing}", *FAST], connection=redis_conn,
                     allow_local_paths=True).job_id
    worker = start_worker(spawn, env, "--burst")
    assert worker.wait(timeout=240) == 0, spawn.output(worker)

    st = api.job_status(redis_conn, ddp)
    assert st["state"] == "finished", explain_job(redis_conn, ddp, spawn)()
    start = next(e for e in api.events_since(redis_conn, ddp) if e["type"] == "start")
    assert start["data"]["world_size"] == 2
    assert epochs_streamed(redis_conn, ddp) == [1]
    assert json.loads(api.read_artifact(ddp, "report"))["world_size"] == 2

    st = api.job_status(redis_conn, shapes)
    assert st["state"] == "finished", explain_job(redis_conn, shapes, spawn)()
    assert st["artifacts"]["run"] == f"{bucket}/jobs/{shapes}/run"
    assert (tmp_path / "bucket" / "jobs" / shapes / "run" / "report.json").is_file()
    assert json.loads(api.read_artifact(shapes, "report"))["data"]["classes"] == ["circle", "square", "tri"]
    cached = list((Path(env["TRAINER_VAR_DIR"]) / "cache" / "datasets").iterdir())
    assert [c.name for c in cached] == [st["dataset"]["ref"].rsplit("/", 1)[1]]
    assert epochs_streamed(redis_conn, shapes) == [1, 2]

    st = api.job_status(redis_conn, bad)
    assert st["state"] == "failed" and st["exit_code"] == 2, st
    assert "no-cifar-here" in st["error"] and st["error_kind"] == "DataError", st["error"]
    assert st["log_tail"] and any("no-cifar-here" in line for line in st["log_tail"])
    assert st["attempt"] == 0 and st["recoveries"] == 0
    assert redis_conn.llen(b"rq:queue:" + keys.queue_name(1, "default").encode()) == 0  # not re-queued


def test_cancel_mid_run_stops_every_rank(redis_conn: Any, job_env: dict[str, str], spawn: Any, test_token: str,
                                         redis_url: str) -> None:
    job_id = submit_job(DIGITS, ["train.epochs=50", *FAST], connection=redis_conn, gpus=2,
                        allow_local_paths=True).job_id
    worker = start_worker(spawn, job_env)
    wait_for(lambda: any(e["type"] == "step" for e in api.events_since(redis_conn, job_id)), 90, "the first step")
    ranks = rank_processes(test_token)
    assert len(ranks) >= 3, [p.cmdline() for p in ranks]  # torchrun + 2 ranks

    # RQ's own CLI sees our queues and the busy worker (JSON payloads, password in the URL)
    info = run_cli(["rq.cli", "info", "--url", redis_url], job_env)
    assert info.returncode == 0, info.stderr
    assert keys.queue_name(2, "default") in info.stdout
    worker_name = api.list_workers(redis_conn)[0]["name"]
    assert worker_name in info.stdout

    t0 = time.monotonic()
    out = run_cli(["worker", "cancel", job_id], job_env)
    assert out.returncode == 0 and "cancelled" in out.stdout, (out.stdout, out.stderr)
    assert time.monotonic() - t0 < 10 + 3  # + the CLI's own start-up
    assert psutil.wait_procs(ranks, timeout=1)[1] == []
    assert rank_processes(test_token) == []
    st = api.job_status(redis_conn, job_id)
    assert st["state"] == "cancelled" and st["artifacts"]["partial"] is True
    assert worker.poll() is None  # the worker survives a cancel and goes back to idle
    wait_for(lambda: api.list_workers(redis_conn)[0]["state"] == "idle", 10, "the worker to be idle")

    # a job past its time limit is stopped the same way and fails as timed out
    slow = submit_job(DIGITS, ["train.epochs=50", *FAST], connection=redis_conn, allow_local_paths=True,
                      timeout=4).job_id
    wait_for(lambda: api.job_status(redis_conn, slow)["final"], 40, "the time limit",
             explain=explain_job(redis_conn, slow, spawn))
    st = api.job_status(redis_conn, slow)
    assert st["state"] == "failed" and st["error_kind"] == "Timeout" and "timed out" in st["error"], st
    assert rank_processes(test_token) == []

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert api.list_workers(redis_conn) == []  # a worker leaving cleanly withdraws at once


GUARDED_TREE = """
import json, subprocess, sys, time
import psutil
from worker.procutil import terminate_tree

agent, poll = sys.argv[1], float(sys.argv[2])
guard = "import sys, worker.guard as g; g.GUARD_POLL_INTERVAL = %r; sys.exit(g.main())" % poll
guard = subprocess.Popen([sys.executable, "-c", guard, "--", sys.executable, "-c", agent])
deadline = time.monotonic() + 30
while len(psutil.Process(guard.pid).children(recursive=True)) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
tree = [p.pid for p in psutil.Process(guard.pid).children(recursive=True)]
killed = terminate_tree(guard.pid, grace=0.5)
guard.wait(timeout=5)
print(json.dumps({"tree": tree, "killed": killed, "left": [pid for pid in tree if psutil.pid_exists(pid)]}))
"""
"""A worker's part: a guard (polling every argv[2] s) over a launcher (the code argv[1]) that starts one rank,
stopped by terminate_tree with a grace of 0.5 s; prints which of the two still exist (alive or as zombies) when it
has returned."""

NOT_REAPING_INIT = """
import subprocess, sys
from worker.procutil import set_child_subreaper

set_child_subreaper()  # orphans of the processes below come here, as they go to init, and are never reaped here
sys.exit(subprocess.run([sys.executable, "-c", *sys.argv[1:]], check=False).returncode)
"""

_IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
_RANK = _IGNORE_TERM + "time.sleep(60)"
STUBBORN_LAUNCHER = _IGNORE_TERM + f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {_RANK!r}]); " \
    "time.sleep(60)"
"""A launcher and its rank, both ignoring SIGTERM."""
LATE_LAUNCHER = "import os, signal, subprocess, sys, time; " \
    f"rank = subprocess.Popen([sys.executable, '-c', {_RANK!r}]); " \
    "signal.signal(signal.SIGTERM, lambda *_: (rank.kill(), rank.wait(), time.sleep(0.3), os._exit(1))); " \
    "time.sleep(60)"
"""A launcher that stops its rank on SIGTERM and exits just before the grace ends (torchrun waiting for its ranks)."""


def _stop_guarded_tree(env: dict[str, str], launcher: str, guard_poll: float) -> dict[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", NOT_REAPING_INIT, GUARDED_TREE, launcher, str(guard_poll)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_tree_that_ignores_sigterm_is_killed_and_reaped_by_its_guard(job_env: dict[str, str]) -> None:
    """A cancel's escalation (worker/procutil.py terminate_tree): a launcher and its rank both ignoring SIGTERM are
    SIGKILLed after the grace, and reaped by their guard, not left as zombies for init to collect (a torchrun killed
    together with its guard outlived a cancel that way, in CI, until init reaped it)."""
    got = _stop_guarded_tree(job_env, STUBBORN_LAUNCHER, GUARD_POLL_INTERVAL)
    assert len(got["tree"]) == 2 and set(got["tree"]) <= set(got["killed"]), got
    assert got["left"] == [], got  # reaped by the guard: nothing of the tree was left for init


def test_a_launcher_that_exits_late_in_the_grace_is_reaped_by_its_guard(job_env: dict[str, str]) -> None:
    """The launcher exits just before the grace ends and its guard has not polled yet when it does: the guard must be
    let reap it and exit by itself. SIGKILLed then (the launcher was no longer alive, the guard was), it left the
    launcher a zombie for init (a torchrun outlived a cancel so, in CI)."""
    got = _stop_guarded_tree(job_env, LATE_LAUNCHER, 1.5)
    assert len(got["tree"]) == 2, got
    assert got["left"] == [], got  # (on a loaded machine the launcher may miss the grace and be killed: same end)


def test_cancel_queued_job_never_runs(redis_conn: Any, job_env: dict[str, str]) -> None:
    job_id = submit_job(DIGITS, ["train.epochs=1", *FAST], connection=redis_conn, allow_local_paths=True).job_id
    assert api.cancel_job(redis_conn, job_id) == "cancelled"
    assert redis_conn.llen(b"rq:queue:" + keys.queue_name(1, "default").encode()) == 0
    assert api.job_status(redis_conn, job_id)["state"] == "cancelled"
    assert api.cancel_job(redis_conn, job_id) == "cancelled"  # idempotent


def test_sigkilled_worker_job_resumes_elsewhere(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                                test_token: str) -> None:
    """Worker 1 is SIGKILLed after epoch 1: its ranks die with it, worker 2 recovers the job and resumes it from the
    checkpoint. Worker 2 is then shut down (SIGTERM) after epoch 2: it gives the job back, and a burst worker 3
    finishes epoch 3. Each epoch is in the stream once; only the crash counts as a recovery."""
    job_id = submit_job(DIGITS, ["train.epochs=3", *FAST], connection=redis_conn, allow_local_paths=True).job_id
    explain = explain_job(redis_conn, job_id, spawn)
    first = start_worker(spawn, job_env)
    wait_for(lambda: 1 in epochs_streamed(redis_conn, job_id), 120, "epoch 1", explain=explain)
    ranks = rank_processes(test_token)
    assert ranks
    dead_name = api.job_status(redis_conn, job_id)["worker"]

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    # the guard notices its worker died and kills the run: nothing keeps training on the dead worker's machine
    assert psutil.wait_procs(ranks, timeout=5)[1] == []
    wait_for(lambda: dead_name not in [w["name"] for w in api.list_workers(redis_conn)], 30,
             "the dead worker to disappear")

    t_dead = time.monotonic()
    second = start_worker(spawn, job_env)
    wait_for(lambda: api.job_status(redis_conn, job_id)["attempt"] == 1, 60, "the job to be re-queued",
             explain=explain)
    assert time.monotonic() - t_dead < 60
    wait_for(lambda: 2 in epochs_streamed(redis_conn, job_id), 120, "epoch 2 on the second worker", explain=explain)
    st = api.job_status(redis_conn, job_id)
    assert st["recoveries"] == 1 and st["worker"] != dead_name and st["resumed_from"] >= 1

    ranks = rank_processes(test_token)
    second.send_signal(signal.SIGTERM)  # honcho stop / Ctrl-C: the job is given back, not lost nor waited for
    assert second.wait(timeout=30) == 0
    assert psutil.wait_procs(ranks, timeout=5)[1] == []
    st = api.job_status(redis_conn, job_id)
    if st["state"] != "finished":  # (unless epoch 3 won the race against the signal)
        assert st["state"] == "recovering" and st["attempt"] == 2 and st["recoveries"] == 1, st
        third = start_worker(spawn, job_env, "--burst")
        assert third.wait(timeout=120) == 0, explain()

    st = api.job_status(redis_conn, job_id)
    assert st["state"] == "finished", explain()
    assert st["recoveries"] == 1
    assert epochs_streamed(redis_conn, job_id) == [1, 2, 3]  # each epoch once: re-emitted epochs were dropped
    starts = [e["data"] for e in api.events_since(redis_conn, job_id) if e["type"] == "start"]
    assert starts[0]["resumed_from"] is None and starts[1]["resumed_from"] >= 1  # attempt 2 did not restart at 1
    logs = [entry["line"] for entry in api.logs_tail(redis_conn, job_id, 2000)]
    assert any("re-queued as attempt 1" in line for line in logs)
    assert any("resuming from the last checkpoint" in line for line in logs)


def warm_processes(token: str, name: str) -> list[psutil.Process]:
    """This test's pre-started trainers (`python -m worker.warmstart`, not their guards) whose process name is
    `name`."""
    out = []
    for proc in processes_with_token(token):
        cmd, proc_name = _cmdline_and_name(proc)
        if "worker.warmstart" in cmd and "worker.guard" not in cmd and proc_name == name:
            out.append(proc)
    return out


@pytest.mark.slow  # 40-57 s on 2 idle cores; the default suite stays near its 20-minute aim
def test_one_rank_jobs_run_in_the_pre_started_trainer_and_start_cold_without_it(
        redis_conn: Any, job_env: dict[str, str], spawn: Any, test_token: str) -> None:
    """A (non-burst) worker keeps one training process with torch imported; a one-rank job runs in it, the worker
    starts the next one afterwards, and a job still runs (cold) when that process has died."""
    worker = start_worker(spawn, job_env)
    wait_for(lambda: [w.get("warm") for w in api.list_workers(redis_conn)] == ["ready"], 90,
             "the worker to advertise a ready pre-started trainer")
    idle = warm_processes(test_token, IDLE_NAME)
    assert len(idle) == 1
    guard_pid = idle[0].ppid()

    job_id = submit_job(DIGITS, ["train.epochs=1", *FAST], connection=redis_conn, allow_local_paths=True).job_id
    explain = explain_job(redis_conn, job_id, spawn)
    wait_for(lambda: api.job_status(redis_conn, job_id)["final"], 120, "the warm job", explain=explain)
    st = api.job_status(redis_conn, job_id)
    assert st["state"] == "finished" and st["epoch"] == 1, explain()
    assert int(st["pid"]) == guard_pid  # the job ran in the process that was waiting (under its guard)
    assert not idle[0].is_running()  # and that process served this one job only
    lines = [e["line"] for e in api.logs_tail(redis_conn, job_id, 200)]
    assert any("pre-started training process" in line for line in lines)
    assert any("epoch 1/1" in line for line in lines) and any(line.startswith("done: test accuracy") for line in lines)
    assert epochs_streamed(redis_conn, job_id) == [1]

    fresh = wait_for(lambda: warm_processes(test_token, IDLE_NAME), 60, "the next pre-started trainer")
    assert fresh[0].pid != idle[0].pid
    wait_for(lambda: [w.get("warm") for w in api.list_workers(redis_conn)] == ["ready"], 90, "it to be ready")
    fresh[0].kill()  # e.g. the OOM killer took it while idle
    fresh[0].wait(timeout=10)

    cold = submit_job(DIGITS, ["train.epochs=1", *FAST], connection=redis_conn, allow_local_paths=True).job_id
    wait_for(lambda: api.job_status(redis_conn, cold)["final"], 120, "the cold job",
             explain=explain_job(redis_conn, cold, spawn))
    assert api.job_status(redis_conn, cold)["state"] == "finished"
    assert not any("pre-started" in e["line"] for e in api.logs_tail(redis_conn, cold, 200))

    wait_for(lambda: warm_processes(test_token, IDLE_NAME), 60, "a pre-started trainer after the cold job")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    wait_for(lambda: not warm_processes(test_token, IDLE_NAME), 10, "the idle trainer to stop with its worker")


def test_finished_run_whose_events_never_reached_redis_takes_its_status_from_report_json(
        redis_conn: Any, redis_url: str, job_env: dict[str, str], tmp_path: Path) -> None:
    """When the training process could not reach Redis (a URL only the worker can use), the job must not end
    `finished` at epoch 0 with no accuracy: the worker reads report.json and says so in the job's log."""
    from worker.artifacts import ArtifactStore
    from worker.attempt import Attempt, WorkerContext
    from worker.streaming import LogWriter

    job_id = submit_job(DIGITS, ["train.epochs=3", *FAST], connection=redis_conn, allow_local_paths=True).job_id
    ctx = WorkerContext(connection=redis_conn, redis_url=redis_url, worker_name="w", devices=None,
                        store=ArtifactStore(job_env["ARTIFACTS_DIR"]))
    run = Attempt(ctx, job_id)
    run.run_dir = tmp_path / "run"
    run.run_dir.mkdir()
    run.log = LogWriter(redis_conn, job_id)
    try:
        assert run._fields_from_report() == {}  # no report: nothing to say
        (run.run_dir / "report.json").write_text(json.dumps({"epochs_completed": 3, "test": {"accuracy": 0.97}}))
        assert run._fields_from_report() == {"epoch": 3, "test_acc": 0.97}
        redis_conn.hset(keys.job(job_id), "epoch", 3)  # the events did arrive: the stream's fields stand
        assert run._fields_from_report() == {}
    finally:
        run.log.close()
    lines = [e["line"] for e in api.logs_tail(redis_conn, job_id, 20)]
    assert sum("no epoch event of this run reached Redis" in line for line in lines) == 1, lines
