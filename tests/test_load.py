"""Load: many small jobs submitted at once against two real workers (`python -m pytest -m load`, not in the default
run). Every job must reach a final state (finished), none lost, none run twice (one `start` event, attempt 0, one
run folder each), and the jobs page must stay usable (its AppTest render time, while the queue drains and at the
end). The figures are printed and written to $LOAD_RESULTS (default: the test's tmp folder) for docs/reliability.md.

The job is tiny on purpose (synthetic data, 64 images of 8 px, simple_cnn, batch 32, one epoch, no export): what is
measured is the queue, the workers and Redis, not training. `LOAD_JOBS` changes the count (default 200).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_app import open_page
from tests.fixtures_worker import DIGITS
from worker import api
from worker.submit import submit_job

TINY = ["data.name=synthetic", "data.synthetic_size=64", "data.synthetic_image_size=8", "data.image_size=8",
        "data.color_mode=RGB", "model.name=simple_cnn", "train.batch_size=32", "train.epochs=1",
        "export.enabled=false", "train.log_every=1", "data.augment=none"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def render_seconds() -> float:
    t0 = time.perf_counter()
    at = open_page("jobs", timeout=120)
    assert not at.exception, [e.value for e in at.exception]
    return time.perf_counter() - t0


@pytest.mark.load
@pytest.mark.timeout(7200)  # the suite-wide 600 s (pytest.ini) cut a 200-job run at 134 jobs
def test_many_small_jobs_against_two_workers(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                             tmp_path: Path) -> None:
    n = int(os.environ.get("LOAD_JOBS", "200"))
    workers = [spawn.python(["worker", "run", "--cpu", "--slots", "1"], job_env, name=f"worker{i}") for i in range(2)]
    t0 = time.time()
    ids = [submit_job(DIGITS, [*TINY, f"train.seed={i}"], connection=redis_conn, allow_local_paths=True).job_id
           for i in range(n)]
    submit_seconds = time.time() - t0

    renders: list[float] = []
    deadline = time.monotonic() + float(os.environ.get("LOAD_TIMEOUT", "3600"))
    next_render = time.monotonic() + 30
    while True:
        jobs = api.list_jobs(redis_conn, limit=n + 10)
        if sum(1 for j in jobs if j["final"]) == n:
            break
        assert time.monotonic() < deadline, f"{sum(1 for j in jobs if j['final'])}/{n} final"
        assert all(w.poll() is None for w in workers), [spawn.output(w)[-2000:] for w in workers]
        if time.monotonic() > next_render:  # the jobs page while the queue drains
            renders.append(render_seconds())
            next_render = time.monotonic() + 60
        time.sleep(2)
    total = time.time() - t0
    renders.append(render_seconds())

    statuses = [api.job_status(redis_conn, i) for i in ids]
    assert len(statuses) == n and {s["state"] for s in statuses} == {"finished"}, \
        {s["id"]: (s["state"], s.get("error")) for s in statuses if s["state"] != "finished"}
    starts = {i: sum(1 for e in api.events_since(redis_conn, i) if e["type"] == "start") for i in ids}
    assert set(starts.values()) == {1}, {i: c for i, c in starts.items() if c != 1}
    assert {s["attempt"] for s in statuses} == {0}
    run_dirs = list((Path(job_env["ARTIFACTS_DIR"]) / "jobs").iterdir())
    assert len(run_dirs) == n
    by_worker: dict[str, int] = {}
    for s in statuses:
        by_worker[s["worker"]] = by_worker.get(s["worker"], 0) + 1

    latency = [s["ended_at"] - s["submitted_at"] for s in statuses]
    run = [s["ended_at"] - s["started_at"] for s in statuses]
    results = {
        "jobs": n, "workers": 2, "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg()[0],
        "submit_seconds": round(submit_seconds, 1), "total_seconds": round(total, 1),
        "jobs_per_minute": round(n / total * 60, 1),
        "latency_p50_s": round(statistics.median(latency), 1), "latency_p95_s": round(pct(latency, 0.95), 1),
        "run_p50_s": round(statistics.median(run), 1), "run_p95_s": round(pct(run, 0.95), 1),
        "jobs_page_render_s": [round(r, 2) for r in renders], "jobs_per_worker": sorted(by_worker.values()),
    }
    out = Path(os.environ.get("LOAD_RESULTS") or tmp_path / "load.json")
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print("\nLOAD RESULTS " + json.dumps(results))
    assert max(renders) < 30, renders  # usable: a page that takes longer than this is not
