"""Nothing fills the disk (README "Disk, retention and limits"): `worker storage` shows what each job, dataset and cache holds;
`worker gc` removes what the retention policy allows and nothing else; below the free-disk floor submission and
dataset uploads are refused before anything is written; the embedded Redis has a memory ceiling that evicts nothing.

Real parts: the test's redis-server, the real CLI in subprocesses, run folders in a real (local) artifact store.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tests.fixtures_app import TEST_WORKER, seed_running_job, submit_digits
from tests.fixtures_worker import DIGITS, make_imagefolder, run_cli
from tests.test_full_disk import small_disk  # noqa: F401 - a fixture
from worker import keys
from worker.artifacts import ArtifactStore
from worker.queues import discard_rq_job
from worker.record import JobRecord, mark_final, mark_started
from worker.states import JobState

DAY = 86400.0


def fake_run(store: ArtifactStore, job_id: str) -> Path:
    """A run folder with the files retention cares about (sizes only matter)."""
    run = store.local_run_dir(job_id)
    for rel, size in (("checkpoints/last.pt", 30_000), ("checkpoints/best.pt", 20_000), ("report.json", 500),
                      ("export/model.onnx", 10_000)):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"x" * size)
    return run


def finished_job(conn: Any, store: ArtifactStore, *, ended_days_ago: float) -> tuple[str, Path]:
    job_id = submit_digits(conn)
    discard_rq_job(conn, JobRecord.fetch(conn, job_id).rq_job)
    assert mark_started(conn, job_id, TEST_WORKER, job_id) == "ok"
    run = fake_run(store, job_id)
    assert mark_final(conn, job_id, TEST_WORKER, JobState.FINISHED, {}) == "ok"
    JobRecord(conn, job_id).save(ended_at=time.time() - ended_days_ago * DAY)
    return job_id, run


def cli_json(args: list[str], env: dict[str, str]) -> Any:
    res = run_cli(["worker", *args, "--json"], env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_storage_shows_and_gc_removes_only_what_the_policy_allows(redis_conn: Any, job_env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    store = ArtifactStore()
    old_id, old_run = finished_job(redis_conn, store, ended_days_ago=10)
    _, new_run = finished_job(redis_conn, store, ended_days_ago=1)
    running_id = seed_running_job(redis_conn)
    running_run = fake_run(store, running_id)
    gone_id = keys.new_job_id()
    gone_run = fake_run(store, gone_id)  # a run folder whose job record no longer exists
    res = run_cli(["worker", "dataset", "add", "shapes", str(make_imagefolder(tmp_path / "shapes"))], job_env)
    assert res.returncode == 0, res.stderr
    orphan = Path(store.path("datasets/" + "0" * 64 + ".zip"))
    orphan.write_bytes(b"PK" + b"\0" * 5000)
    os.utime(orphan, (time.time() - 3 * DAY, time.time() - 3 * DAY))
    fresh_orphan = Path(store.path("datasets/" + "1" * 64 + ".zip"))  # may be a submission uploading right now
    fresh_orphan.write_bytes(b"PK" + b"\0" * 100)

    report = cli_json(["storage"], job_env)
    jobs = {j["job_id"]: j for j in report["jobs"]}
    assert jobs[old_id]["state"] == "finished" and jobs[old_id]["checkpoint_bytes"] == 50_000
    assert jobs[old_id]["bytes"] == 60_500 and jobs[gone_id]["state"] is None
    stored = {d["key"]: d for d in report["datasets"]}
    assert stored["datasets/" + "0" * 64 + ".zip"]["used_by"] == []
    assert [d["used_by"] for d in report["datasets"] if d["used_by"]] == [["shapes:1"]]
    assert report["totals"]["orphan_datasets"] == 5002 + 102
    assert {c["cache"] for c in report["caches"]} >= {"extracted datasets", "dataset cache"}
    assert report["redis"]["keys"] > 0 and report["disk"][0]["free"] > 0

    planned = cli_json(["gc", "--dry-run"], job_env)
    targets = {r["target"] for r in planned["removed"]}
    expected = {f"jobs/{old_id}/run/checkpoints/last.pt", f"jobs/{gone_id}/run/", "datasets/" + "0" * 64 + ".zip"}
    assert targets == expected, planned
    assert (old_run / "checkpoints/last.pt").exists() and gone_run.exists() and orphan.exists()  # dry run

    done = cli_json(["gc"], job_env)
    assert {r["target"] for r in done["removed"]} == expected and done["bytes"] == 30_000 + 60_500 + 5002
    assert not (old_run / "checkpoints/last.pt").exists() and not gone_run.exists() and not orphan.exists()
    for kept in (old_run / "checkpoints/best.pt", old_run / "export/model.onnx", old_run / "report.json",
                 new_run / "checkpoints/last.pt", running_run / "checkpoints/last.pt", fresh_orphan):
        assert kept.exists(), kept
    assert JobRecord(redis_conn, old_id).exists()  # the job itself stays, with its model
    assert cli_json(["dataset", "list"], job_env)[0]["name"] == "shapes"
    assert cli_json(["gc", "--dry-run"], job_env)["removed"] == []  # nothing left to remove


def test_below_the_disk_floor_nothing_is_submitted_or_uploaded(redis_conn: Any, job_env: dict[str, str],
                                                               tmp_path: Path) -> None:
    env = {**job_env, "DISK_MIN_FREE_GB": "1000000"}  # a floor above any real disk: this one is "full"
    res = run_cli(["worker", "submit", str(DIGITS)], env)
    assert res.returncode == 2 and "low disk" in res.stderr and "DISK_MIN_FREE_GB" in res.stderr, res.stderr
    assert redis_conn.zcard(keys.jobs_index()) == 0
    res = run_cli(["worker", "dataset", "add", "shapes", str(make_imagefolder(tmp_path / "shapes"))], env)
    assert res.returncode == 2 and "low disk" in res.stderr, res.stderr
    assert not list(Path(job_env["ARTIFACTS_DIR"]).rglob("*.zip"))
    assert run_cli(["worker", "dataset", "list", "--json"], env).stdout.strip() == "[]"


def test_the_embedded_redis_has_a_ceiling_and_evicts_nothing(redis_conn: Any) -> None:
    """The test's redis-server runs worker.server's own config (tests/fixtures_redis.py)."""
    assert int(redis_conn.config_get("maxmemory")["maxmemory"]) == 2048 * 2**20
    assert redis_conn.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_a_worker_on_a_full_disk_takes_no_job_until_space_is_freed(redis_conn: Any, job_env: dict[str, str],
                                                                   spawn: Any, small_disk: Path) -> None:  # noqa: F811
    """The worker's var/ on a 256 KiB tmpfs (tests/test_full_disk.py), filled: it advertises `low disk` and leaves
    the job queued; once the filler is deleted it takes the job and finishes it."""
    from tests.fixtures_worker import wait_for
    from worker import api

    job_id = submit_digits(redis_conn, ["train.epochs=1", "export.enabled=false", "data.image_size=8"])
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (200 * 1024))
    env = {**job_env, "TRAINER_VAR_DIR": str(small_disk), "DISK_MIN_FREE_GB": str(100 / 2**20)}  # 100 KiB floor
    worker = spawn.python(["worker", "run", "--cpu", "--slots", "1", "--no-prewarm"], env, name="worker")

    def advertised() -> list[dict[str, Any]]:
        return api.list_workers(redis_conn)

    ws = wait_for(lambda: [w for w in advertised() if w.get("state") == "low disk"], 60, "a low-disk advertisement",
                  explain=lambda: spawn.output(worker)[-2000:])
    assert "below the" in ws[0]["low_disk"]
    assert api.job_status(redis_conn, job_id)["state"] == "queued"
    filler.unlink()
    wait_for(lambda: api.job_status(redis_conn, job_id)["state"] == "finished", 240, "the job to run once space is back",
             explain=lambda: spawn.output(worker)[-2000:])
    assert "taking no jobs: low disk" in spawn.output(worker)
