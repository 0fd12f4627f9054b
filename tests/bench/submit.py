"""Row 4: submit → first step event in Redis on a warm `python -m worker run`: 1 process ≤ 2 s, torchrun 2 gloo ranks
≤ 10 s; and the memory of the worker and of its idle pre-started trainer."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import psutil

from tests.bench.harness import Row, Section, log
from tests.bench.processes import start_cpu_worker, submit_to_first_step, vm_hwm_kb, wait_worker, worker_env


def bench_submit(quick: bool, url: str) -> list[Row]:
    from tests.fixtures_redis import stop
    from worker.artifacts import ArtifactStore
    from worker.connection import connect

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        env = worker_env(tmp, url)
        out = (Path(tmp) / "worker.log").open("wb")
        proc = start_cpu_worker(env, out, "--slots", "2")
        conn = connect(url)
        store = ArtifactStore(env["ARTIFACTS_DIR"])
        try:
            wait_worker(conn, time.monotonic() + 60)
            for gpus, target, label in ((1, 2.0, "single process"), (2, 10.0, "torchrun 2 gloo ranks")):
                times = []
                for _ in range(1 if quick else 2):
                    wait_worker(conn, time.monotonic() + 60)
                    times.append(submit_to_first_step(conn, store, gpus=gpus))
                    log(f"row 4 ({label}): {times[-1]:.2f} s")
                rows.append(Row(f"submit → first step event, warm worker, {label}", statistics.median(times), target,
                                "s", higher_is_better=False,
                                note="digits preset (the first step is reported at once); runs "
                                     f"{[round(t, 2) for t in times]}"))
            rss_kb = vm_hwm_kb(proc.pid)
            if rss_kb:
                rows.append(Row("memory: peak RSS of the `python -m worker run` process", rss_kb / 1024, None, "MiB",
                                higher_is_better=False, note="the supervisor only; training runs in a child"))
            wait_worker(conn, time.monotonic() + 60)
            warm = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if p.cmdline()[1:3] == ["-m", "worker.warmstart"]]  # not its guard
            if warm:
                rows.append(Row("memory: RSS of the worker's idle pre-started trainer",
                                warm[0].memory_info().rss / 2**20, None, "MiB", higher_is_better=False,
                                note="`python -m worker.warmstart` with torch, torchvision, core and the Redis sink "
                                     "imported"))
        finally:
            conn.close()
            stop(proc, grace=30)
            out.close()
    return rows


SECTION = Section("submit", "row 4", bench_submit, (
    Row("submit → first step event, warm worker, single process", None, 2.0, "s", False),
    Row("submit → first step event, warm worker, torchrun 2 gloo ranks", None, 10.0, "s", False)), redis=True)
