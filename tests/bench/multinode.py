"""The multi-node row: submit → first step event of a 2-node × 1-rank digits job on two idle CPU workers (≤ 15 s)."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from tests.bench.harness import Row, Section, log, na
from tests.bench.processes import start_cpu_worker, submit_to_first_step, worker_env

MULTINODE_ROW = "submit → first step event, 2-node × 1-rank job on two idle CPU workers"
MULTINODE_GPU_ROW = "multi-node scaling: images/s of 2 nodes × G/2 GPUs vs 1 node × G GPUs"


def bench_multinode(quick: bool, url: str) -> list[Row]:
    """Two `python -m worker run --cpu --slots 1` workers on this machine (advertising 127.0.0.1): the time from
    submitting a 2-node digits job to its first step event (gang reservation, rendezvous, two torchruns)."""
    from tests.fixtures_redis import stop
    from worker.artifacts import ArtifactStore
    from worker.connection import connect
    from worker.presence import list_workers

    with tempfile.TemporaryDirectory(prefix="bench-multinode-") as tmp:
        env = worker_env(tmp, url, WORKER_ADDR="127.0.0.1")
        out = (Path(tmp) / "workers.log").open("wb")
        procs = [start_cpu_worker(env, out, "--slots", "1", "--no-prewarm", "--name", f"bench-node-{i}")
                 for i in range(2)]
        conn = connect(url)
        store = ArtifactStore(env["ARTIFACTS_DIR"])

        def both_idle() -> bool:
            return sum(w.get("state") == "idle" for w in list_workers(conn)) >= 2

        try:
            times = []
            for _ in range(1 if quick else 3):
                deadline = time.monotonic() + 60
                while not both_idle():
                    if time.monotonic() > deadline:
                        raise TimeoutError("two idle workers did not advertise themselves within 60 s")
                    time.sleep(0.2)
                times.append(submit_to_first_step(conn, store, gpus=1, nodes=2))
                log(f"multi-node: {times[-1]:.2f} s")
        finally:
            conn.close()
            for proc in procs:
                stop(proc, grace=30)
            out.close()
    rows = [Row(MULTINODE_ROW, statistics.median(times), 15.0, "s", higher_is_better=False,
                note=f"digits preset; gang of two --no-prewarm workers, torchrun static rendezvous on 127.0.0.1; "
                     f"runs {[round(t, 2) for t in times]}")]
    if not torch.cuda.is_available():
        rows.append(na(MULTINODE_GPU_ROW, None, "ratio", "no CUDA GPU on this machine"))
    return rows


SECTION = Section("multinode", "multi-node row", bench_multinode, (Row(MULTINODE_ROW, None, 15.0, "s", False),),
                  redis=True)
