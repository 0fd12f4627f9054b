"""Row 7: dashboard render times through streamlit.testing's AppTest, the job page with 20,000 metric points and the
jobs page with 1,000 jobs: ≤ 1 s each."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from tests.bench.harness import Row, Section, log, na

DASHBOARD_ROWS = ("dashboard: job page with 20,000 metric points", "dashboard: jobs page with 1,000 jobs")


def bench_dashboard(quick: bool, url: str) -> list[Row]:
    """Render times through streamlit.testing's AppTest (the dashboard tests' `open_page`), against seeded Redis."""
    try:
        from tests.fixtures_app import (
            open_page,
            seed_jobs,
            seed_step_events,
            submit_digits,
        )
    except ImportError as err:
        return [na(n, 1.0, "s", f"dashboard not landed ({err})", higher_is_better=False) for n in DASHBOARD_ROWS]
    from tests.fixtures_redis import service_env

    runs = 2 if quick else 3
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp, service_env(url, Path(tmp)) as conn:
        job_id = submit_digits(conn, ["train.seed=99999"])
        seed_step_events(conn, job_id, 20_000)
        open_page("jobs")  # warm-up: imports and script compilation happen once per process
        cases = [(DASHBOARD_ROWS[0], "job", {"job": job_id}, "")]
        t = time.perf_counter()
        seed_jobs(conn, 999)
        cases.append((DASHBOARD_ROWS[1], "jobs", {}, f"1,000 jobs seeded in {time.perf_counter() - t:.0f} s"))
        for name, page, query, extra in cases:
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                at = open_page(page, query)
                times.append(time.perf_counter() - t)
                if at.exception:
                    raise RuntimeError(f"{page} page raised: {at.exception[0].value}")
            rows.append(Row(name, statistics.median(times), 1.0, "s", higher_is_better=False,
                            note=f"AppTest run of the entry file + switch to the page (a fresh session), median of "
                                 f"{runs}: {[round(x, 2) for x in times]} s" + (f"; {extra}" if extra else "")))
            log(f"row 7: {name}: {rows[-1].value:.2f} s")
    return rows


SECTION = Section("dashboard", "row 7", bench_dashboard, tuple(Row(n, None, 1.0, "s", False) for n in DASHBOARD_ROWS),
                  redis=True)
