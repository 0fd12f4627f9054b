"""The sweep rows: the overhead per trial of `advance` (tell + ask + submit under the sweep's lock, ≤ 50 ms), and a
real sweep's gap from a trial's end to the next trial's first step event on a warm worker (≤ 1 s)."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from tests.bench.harness import ROOT, Row, Section, log
from tests.bench.processes import start_cpu_worker, wait_worker, worker_env

SWEEP_ROWS = ("sweep: overhead per trial (tell + ask + submit, under the sweep's lock)",
              "sweep: a trial's end → the next trial's first step event, warm worker")


def bench_sweep(quick: bool, url: str) -> list[Row]:
    """Row A: `advance` (what the worker that ends a trial calls: tell Optuna, ask for the next trial, enqueue its job)
    timed in one process, over a TPE sweep whose trials "ended" through the worker's own state functions (no
    training). Row B: a real sweep of one-epoch digits trials, one at a time, on one worker: the gap between a
    trial's `ended_at` and the first step event of the next trial (both on this machine's clock)."""
    from tests.fixtures_redis import stop
    from worker import api
    from worker.artifacts import ArtifactStore
    from worker.connection import connect
    from worker.record import mark_final, mark_started
    from worker.states import JobState
    from worker.streaming import RedisEventSink
    from worker.sweeps import advance

    rows: list[Row] = []
    digits = str(ROOT / "configs" / "digits.yaml")
    space = {"optim.lr": {"float": [1e-4, 1e-1], "log": True}, "train.batch_size": {"choice": [32, 64, 128]},
             "optim.weight_decay": {"float": [1e-6, 1e-2], "log": True}}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        store = ArtifactStore(str(Path(tmp) / "artifacts"))
        conn = connect(url)
        try:
            n = 15 if quick else 30
            sweep_id = api.create_sweep(digits, space, connection=conn, trials=n + 1, parallel=1, seed=0,
                                        allow_local_paths=True, store=store)
            times = []
            for i in range(n):
                [job_id] = [t["job"] for t in api.sweep_trials(conn, sweep_id) if t["state"] == "queued"]
                assert mark_started(conn, job_id, "bench-worker", job_id) == "ok"
                sink = RedisEventSink(conn, job_id)
                sink.emit("epoch", {"epoch": 1, "epochs": 1, "val_acc": 0.5 + 0.01 * (i % 7)})
                sink.close()
                mark_final(conn, job_id, "bench-worker", JobState.FINISHED, {})
                t0 = time.perf_counter()
                advance(conn, sweep_id, store=store)
                times.append(time.perf_counter() - t0)
            later = times[10:]  # TPE samples with a model from the 11th trial on (before: random start-up trials)
            rows.append(Row(SWEEP_ROWS[0], statistics.median(times) * 1000, 50.0, "ms", higher_is_better=False,
                            note=f"{n} trials, 3 parameters, TPE; median over all; after its 10 random start-up "
                                 f"trials median {statistics.median(later) * 1000:.0f} ms, max "
                                 f"{max(later) * 1000:.0f} ms; the first call in a process also replays the journal"))
            log(f"sweep row A: {[round(t * 1000) for t in times]} ms")
            for key in conn.scan_iter(match="rq:queue:*"):
                conn.delete(key)  # row B's worker must not train row A's leftover trial
        finally:
            conn.close()

        env = worker_env(tmp, url)
        out = (Path(tmp) / "worker.log").open("wb")
        proc = start_cpu_worker(env, out, "--slots", "1")
        conn = connect(url)
        try:
            wait_worker(conn, time.monotonic() + 60)
            trials = 3 if quick else 5
            sweep_id = api.create_sweep(digits, space, connection=conn, trials=trials, parallel=1, pruner="none",
                                        seed=1, allow_local_paths=True, store=ArtifactStore(env["ARTIFACTS_DIR"]),
                                        overrides=["train.epochs=1", "export.enabled=false"])
            deadline = time.monotonic() + 120 * trials
            while not api.sweep_status(conn, sweep_id, with_trials=False)["final"]:
                if time.monotonic() > deadline:
                    raise TimeoutError("the sweep did not finish")
                time.sleep(0.5)
            jobs = [api.job_status(conn, t["job"]) for t in api.sweep_trials(conn, sweep_id)]
            gaps = []
            for prev, nxt in zip(jobs, jobs[1:]):
                steps = api.events_since(conn, nxt["id"], types={"step"}, count=None)
                first = int(steps[0]["id"].split("-")[0]) / 1000 if steps else None
                if first is not None and prev.get("ended_at"):
                    gaps.append(first - prev["ended_at"])
            log(f"sweep row B: gaps {[round(g, 2) for g in gaps]} s")
            rows.append(Row(SWEEP_ROWS[1], statistics.median(gaps) if gaps else None, 1.0, "s",
                            higher_is_better=False,
                            note=f"{trials} one-epoch digits trials, parallel 1, one CPU worker (it pre-starts the "
                                 f"next trainer while a trial runs); gaps {[round(g, 2) for g in gaps]}"))
        finally:
            conn.close()
            stop(proc, grace=30)
            out.close()
    return rows


SECTION = Section("sweep", "sweep rows", bench_sweep, (
    Row(SWEEP_ROWS[0], None, 50.0, "ms", False), Row(SWEEP_ROWS[1], None, 1.0, "s", False)), redis=True)
