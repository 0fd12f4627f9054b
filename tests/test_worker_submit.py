"""Submission against the real test Redis: everything is validated before anything is written, payloads are JSON,
datasets are uploaded content-addressed, the GPU count is checked against live workers; plus the job-management
functions the dashboard calls (list, cancel, retry, delete) and the CLI's exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_worker import DIGITS, ROOT, make_imagefolder, run_cli
from worker import api, keys
from worker.artifacts import ArtifactStore
from worker.errors import InvalidJobStateError, NoSuchJobError, SubmissionError
from worker.presence import advertise
from worker.submit import submit_job


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(["worker", *args], env)


def test_cli_submit_bad_config_exits_2_and_enqueues_nothing(redis_conn: Any, job_env: dict[str, str]) -> None:
    out = cli(["submit", str(DIGITS), "--set", "train.epochs=0"], job_env)
    assert out.returncode == 2, out
    assert "train.epochs" in out.stderr
    with pytest.raises(SubmissionError, match="model.name"):
        submit_job(DIGITS, ["model.name=no_such_net"], connection=redis_conn)
    with pytest.raises(SubmissionError, match="unknown key"):
        submit_job({"train": {"epochs": 2, "epoch": 3}}, connection=redis_conn)
    out = cli(["submit", "configs/no-such-file.yaml"], job_env)
    assert out.returncode == 2 and "not found" in out.stderr
    assert redis_conn.dbsize() == 0



@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_cli_into_a_closed_pipe_ends_quietly(redis_conn: Any, job_env: dict[str, str], unbuffered: str) -> None:
    """`python -m worker status JOB --json | head -c 10` (or `| grep -q`): the reader goes away before the CLI has
    written everything. The CLI ends quietly with 141 (as a shell reports a tool that SIGPIPE ended), no traceback."""
    job_id = submit_job(DIGITS, ["train.epochs=1"], connection=redis_conn, allow_local_paths=True).job_id
    for args in (["status", job_id, "--json"], ["status", job_id], ["list"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first byte: every write fails with EPIPE
        try:
            proc = subprocess.run([sys.executable, "-m", "worker", *args], stdout=write_end, stderr=subprocess.PIPE,
                                  env={**job_env, "PYTHONUNBUFFERED": unbuffered}, cwd=ROOT, text=True, timeout=120,
                                  check=False)
        finally:
            os.close(write_end)
        assert proc.returncode == 141, (args, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, (args, proc.stderr)

def test_cli_submit_list_status(redis_conn: Any, job_env: dict[str, str]) -> None:
    out = cli(["submit", str(DIGITS), "--set", "train.epochs=3", "--priority", "high"], job_env)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[-1]  # the contract: the job id is the last word
    assert keys.JOB_ID_RE.match(job_id)
    assert "waiting for a worker" in out.stdout  # no worker is running: accepted, and it says what it waits for

    st = api.job_status(redis_conn, job_id)
    assert st["state"] == "queued" and st["epochs"] == 3 and st["priority"] == "high" and st["gpus"] == 1
    assert st["config"]["train"]["epochs"] == 3 and st["config"]["data"]["name"] == "digits"
    assert redis_conn.lrange(b"rq:queue:" + keys.queue_name(1, "high").encode(), 0, -1) == [job_id.encode()]

    # nothing pickled crosses Redis: the RQ payload is JSON naming the function and the job id
    payload = json.loads(zlib.decompress(redis_conn.hget(f"rq:job:{job_id}", "data")))
    assert payload[0] == "worker.attempt.run_attempt" and payload[2] == [job_id]

    listing = cli(["list"], job_env)
    assert job_id in listing.stdout and "queued" in listing.stdout
    status = cli(["status", job_id], job_env)
    assert "queued" in status.stdout
    assert cli(["status", "20990101-000000-abcdef"], job_env).returncode == 2
    assert cli(["status", "../../etc/passwd"], job_env).returncode == 2


def test_gpu_count_is_checked_against_live_workers(redis_conn: Any, job_env: dict[str, str]) -> None:
    for bad in (0, 17, 2.5, True):
        with pytest.raises(SubmissionError, match="gpus"):
            submit_job(DIGITS, connection=redis_conn, gpus=bad)  # type: ignore[arg-type]
    with pytest.raises(SubmissionError, match="priority"):
        submit_job(DIGITS, connection=redis_conn, priority="urgent")
    advertise(redis_conn, "box-1", {"name": "box-1", "hostname": "box", "kind": "gpu", "slots": 2}, ttl=30)
    with pytest.raises(SubmissionError, match="the largest has 2"):
        submit_job(DIGITS, connection=redis_conn, gpus=4)
    assert redis_conn.llen(b"rq:queue:" + keys.queue_name(4, "default").encode()) == 0
    job_id = submit_job(DIGITS, connection=redis_conn, gpus=2).job_id
    assert api.job_status(redis_conn, job_id)["queue"] == "train:g2:default"
    assert api.job_status(redis_conn, job_id).get("waiting") is None


def test_local_dataset_is_checked_then_uploaded_once(redis_conn: Any, job_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    folder = make_imagefolder(tmp_path / "shapes")
    overrides = ["data.name=imagefolder", f"data.path={folder}", "data.image_size=16", "train.batch_size=8"]
    # the dashboard never passes a path from the config itself: only its own saved upload (dataset_path)
    with pytest.raises(SubmissionError, match="upload"):
        submit_job(DIGITS, overrides, connection=redis_conn)
    assert redis_conn.dbsize() == 0

    job_id = submit_job(DIGITS, overrides, connection=redis_conn, allow_local_paths=True).job_id
    st = api.job_status(redis_conn, job_id)
    ref = st["config"]["data"]["path"]
    assert ref.startswith("artifact:datasets/") and ref == st["dataset"]["ref"]
    assert st["dataset"]["classes"] == ["circle", "square", "tri"]
    store = ArtifactStore()
    assert store.exists(ref.removeprefix("artifact:"))

    again = submit_job(DIGITS, ["data.image_size=16", "train.batch_size=8"], connection=redis_conn,
                       dataset_path=folder).job_id
    assert api.job_status(redis_conn, again)["config"]["data"]["path"] == ref  # content-addressed: stored once
    assert len(list((Path(job_env["ARTIFACTS_DIR"]) / "datasets").iterdir())) == 1


def test_bad_dataset_is_refused_with_its_reason(redis_conn: Any, job_env: dict[str, str], tmp_path: Path) -> None:
    single = make_imagefolder(tmp_path / "one", classes=("only",))
    with pytest.raises(SubmissionError, match="dataset"):
        submit_job(DIGITS, connection=redis_conn, dataset_path=single)
    out = cli(["submit", str(DIGITS), "--set", "data.name=imagefolder", "--set", f"data.path={tmp_path}/nothing"],
              job_env)
    assert out.returncode == 2 and "dataset" in out.stderr
    assert redis_conn.dbsize() == 0
    assert not (Path(job_env["ARTIFACTS_DIR"]) / "datasets").exists()


def test_cancel_retry_delete(redis_conn: Any, job_env: dict[str, str]) -> None:
    job_id = submit_job(DIGITS, ["train.epochs=2"], connection=redis_conn, priority="low").job_id
    with pytest.raises(InvalidJobStateError):
        api.retry_job(redis_conn, job_id)
    assert api.cancel_job(redis_conn, job_id) == "cancelled"
    assert redis_conn.llen(b"rq:queue:" + keys.queue_name(1, "low").encode()) == 0

    again = api.retry_job(redis_conn, job_id)
    st = api.job_status(redis_conn, again)
    assert st["state"] == "queued" and st["retried_from"] == job_id and st["priority"] == "low"
    assert st["config"] == api.job_status(redis_conn, job_id)["config"]
    assert [j["id"] for j in api.list_jobs(redis_conn)] == [again, job_id]
    assert [j["id"] for j in api.list_jobs(redis_conn, {"cancelled"})] == [job_id]

    run_dir = ArtifactStore().local_run_dir(job_id)
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text("{}")
    api.delete_job(redis_conn, job_id)
    assert not run_dir.exists()
    assert not any(redis_conn.exists(k) for k in keys.job_keys(job_id))
    assert [j["id"] for j in api.list_jobs(redis_conn)] == [again]
    with pytest.raises(NoSuchJobError):
        api.job_status(redis_conn, job_id)
    with pytest.raises(NoSuchJobError):
        api.cancel_job(redis_conn, "../../etc")
