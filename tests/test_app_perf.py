"""The two page timings the benchmark reports (tests/bench/dashboard.py), held to their 1 s target here: the Job page
of a job with 20,000 metric points in its stream and the Jobs page with 1,000 jobs, each rendered through AppTest
against the real test Redis (a warm server: the first render of a page pays for imports and is not timed)."""
from __future__ import annotations

import time
from typing import Any

import pytest

from tests.fixtures_app import open_page, seed_running_job, seed_step_events, submit_digits

TARGET_SECONDS = 1.0


def timed(page: str, query: dict[str, str]) -> tuple[float, Any]:
    open_page(page, query)  # warm-up: module imports, caches of the server process
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        at = open_page(page, query)
        best = min(best, time.perf_counter() - start)
    return best, at


@pytest.fixture
def perf_env(redis_conn: Any, job_env: dict[str, str]) -> Any:
    return redis_conn


def test_job_page_with_20000_metric_points(perf_env: Any) -> None:
    job = seed_running_job(perf_env)
    seed_step_events(perf_env, job, 20_000)
    seconds, at = timed("job", {"job": job})
    assert not at.exception
    assert at.session_state[f"job:series:{job}"].entries == 20_000
    print(f"job page, 20,000 points: {seconds:.3f} s")
    assert seconds < TARGET_SECONDS


def test_jobs_page_with_1000_jobs(perf_env: Any) -> None:
    from worker import keys

    first = submit_digits(perf_env)
    raw = perf_env.hgetall(keys.job(first))
    with perf_env.pipeline(transaction=False) as pipe:  # 999 copies of a real job's hash, under fresh ids
        for i in range(999):
            job_id = f"20250101-{i // 3600 % 24:02d}{i // 60 % 60:02d}{i % 60:02d}-{i:06x}"
            pipe.hset(keys.job(job_id), mapping={**raw, b"id": job_id})
            pipe.zadd(keys.jobs_index(), {job_id: 1_700_000_000 + i})
        pipe.execute()
    seconds, at = timed("jobs", {})
    assert not at.exception
    assert len(at.dataframe[0].value) == 1000
    print(f"jobs page, 1,000 jobs: {seconds:.3f} s")
    assert seconds < TARGET_SECONDS
