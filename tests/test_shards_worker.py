"""Prepared datasets through real workers (worker/datasets/prepared.py): two jobs on a registered dataset that does
not fit the tensor cache; one worker slot prepares the shards under the lock while the other waits, both train from
the shards, and report.json and the events say so. Real Redis, real worker processes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_worker import DIGITS, explain_job, make_imagefolder, run_cli
from worker import api, datasets, keys
from worker.streaming import logs_tail
from worker.submit import submit_job

SHARDS = ["export.enabled=false", "train.log_every=2", "data.image_size=64", "train.batch_size=16",
          "track.tensorboard=false", "train.epochs=1", "data.color_mode=RGB", "data.cache_max_mb=1"]
"""120 images × 3 × 64 × 64 bytes = 1.4 MiB: more than data.cache_max_mb, so the job reads prepared shards."""


def _events(conn: Any, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(v[b"type"].decode(), json.loads(v[b"data"])) for _, v in conn.xrange(keys.events(job_id))]


@pytest.mark.slow  # three jobs on one worker: about two minutes on 2 shared cores
@pytest.mark.timeout(300)
def test_jobs_beyond_the_tensor_cache_prepare_once_and_train_from_shards(redis_conn: Any, job_env: dict[str, str],
                                                                         tmp_path: Path, spawn: Any) -> None:
    folder = make_imagefolder(tmp_path / "shapes", per_class=40, size=64)
    version = datasets.register(redis_conn, "shapes", str(folder)).version
    jobs = [submit_job(DIGITS, ["data.dataset=shapes", *SHARDS, f"train.seed={s}"], connection=redis_conn).job_id
            for s in (1, 2)]
    small = submit_job(DIGITS, ["data.dataset=shapes", *[s for s in SHARDS if "cache_max_mb" not in s]],
                       connection=redis_conn).job_id  # fits the tensor cache: nothing prepared for it
    worker = spawn.python(["worker", "run", "--cpu", "--slots", "2", "--burst"], job_env, name="worker")
    assert worker.wait(timeout=280) == 0, spawn.output(worker)
    for job in jobs:
        st = api.job_status(redis_conn, job)
        assert st["state"] == "finished", explain_job(redis_conn, job, spawn)()
        report = json.loads(api.read_artifact(job, "report"))
        assert report["data_path"] == "shards" and report["data"]["counts"]["train"] == 84
    forms = datasets.prepared_forms(redis_conn, "shapes", 1)
    assert [f["key"] for f in forms] == ["64-RGB"] and forms[0]["images"] == 120 and forms[0]["encoding"] == "raw"
    assert forms[0]["url"].endswith(f"prepared/{version.hash}/64-RGB")
    preparer = [j for j in jobs if ("phase", {"phase": "prepare"}) in _events(redis_conn, j)]
    progress = [d for j in jobs for t, d in _events(redis_conn, j) if t == "prepare"]
    assert preparer and progress and progress[-1]["done"] == progress[-1]["total"] == 120
    logs = " ".join(e.get("line", "") for j in jobs for e in logs_tail(redis_conn, j, 500))
    assert logs.count("preparing shapes:1 (64-RGB)") == 1  # one worker slot prepared, once
    assert json.loads(api.read_artifact(small, "report"))["data_path"] == "tensor_cache"


def test_dataset_add_prepare_prepares_at_registration(redis_conn: Any, job_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    folder = make_imagefolder(tmp_path / "shapes")
    out = run_cli(["worker", "dataset", "add", "shapes", str(folder), "--prepare", "--size", "32"], job_env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "shapes:1" and "prepared shapes:1 32-RGB: raw shards" in out.stdout
    forms = datasets.prepared_forms(redis_conn, "shapes", 1)
    assert [f["key"] for f in forms] == ["32-RGB"]
    index = Path(forms[0]["url"]) / "index.json"
    assert json.loads(index.read_text())["classes"] == ["circle", "square", "tri"]
    progress = [line for line in out.stderr.split("\n") if line.startswith("preparing: ")]
    assert progress and progress[-1].startswith("preparing: 36/36 images")  # not a terminal: a line per tenth
    assert "\r" not in out.stderr  # no carriage returns run together in a log
    shown = json.loads(run_cli(["worker", "dataset", "show", "shapes:1", "--json"], job_env).stdout)
    assert shown["prepared"][0]["url"] == forms[0]["url"]
    text = run_cli(["worker", "dataset", "show", "shapes:1"], job_env).stdout
    counts = ", ".join(f"{split} {n}" for split, n in forms[0]["counts"].items())
    assert f"prepared  32-RGB    raw, {forms[0]['shards']} shards, 36 images ({counts})," in text, text
    assert run_cli(["worker", "dataset", "rm", "shapes"], job_env).returncode == 0
    assert not index.exists() and not index.parent.parent.exists()  # the shards go with the last version of the data
