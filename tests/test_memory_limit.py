"""A job's memory bound (worker/memlimit.py): a real worker with a tiny JOB_MEMORY_LIMIT_GB stops its training
processes, the job fails with "out of memory: ..." naming the limit, what they held and the variable, and the worker
lives on to take the next job. A bad value stops the worker at start with a message naming the variable."""
from __future__ import annotations

import subprocess
import sys
from typing import Any

from tests.fixtures_worker import DIGITS, ROOT, explain_job, run_cli, wait_for
from tests.test_worker_jobs import FAST, rank_processes, start_worker
from worker import api
from worker.defaults import JOB_MEMORY_LIMIT_ENV
from worker.memlimit import MemoryWatch, tree_memory
from worker.procutil import kill_tree
from worker.submit import submit_job

LIMIT_GB = 0.12
"""Below what a process that imported torch holds (about 0.25 GiB of anonymous memory): every job is over it."""


def test_job_over_its_memory_bound_fails_and_the_worker_takes_the_next(
        redis_conn: Any, job_env: dict[str, str], spawn: Any, test_token: str) -> None:
    env = {**job_env, JOB_MEMORY_LIMIT_ENV: str(LIMIT_GB)}
    jobs = [submit_job(DIGITS, ["train.epochs=30", *FAST], connection=redis_conn, allow_local_paths=True).job_id
            for _ in range(2)]
    worker = start_worker(spawn, env)
    for job_id in jobs:
        st = wait_for(lambda j=job_id: (s := api.job_status(redis_conn, j))["state"] in ("failed", "finished") and s,
                      120, f"job {job_id} to end", explain=explain_job(redis_conn, job_id, spawn))
        assert st["state"] == "failed", st
        assert st["error"].startswith("out of memory: "), st["error"]
        assert f"limit of {LIMIT_GB:.2f} GiB" in st["error"] and JOB_MEMORY_LIMIT_ENV in st["error"]
        assert st["error_kind"] == "OutOfMemory"
        assert st["epoch"] < 30
        out = run_cli(["worker", "status", job_id], job_env)
        assert "out of memory: " in out.stdout, out.stdout
    assert worker.poll() is None, spawn.output(worker)  # it lived through both and took the second
    assert f"memory bound {LIMIT_GB:.2f} GiB per job" in spawn.output(worker)
    wait_for(lambda: not rank_processes(test_token), 15, "the stopped jobs' processes to be gone")


def test_a_bad_memory_limit_stops_the_worker_at_start(job_env: dict[str, str]) -> None:
    out = run_cli(["worker", "run", "--cpu", "--burst"], {**job_env, JOB_MEMORY_LIMIT_ENV: "lots"}, timeout=60)
    assert out.returncode == 2
    assert f"{JOB_MEMORY_LIMIT_ENV}: must be a number of GiB (0 for no limit), got 'lots'" in out.stderr


def test_the_watch_counts_a_tree_once_and_only_stops_what_is_over() -> None:
    """A parent and a forked child sharing 200 MiB written before the fork: the cheap sum counts it twice, the exact
    figure once; a bound between the two does not stop them."""
    code = ("import os, time\nb = bytearray(200 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
            "os.fork()\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        wait_for(lambda: tree_memory(proc.pid) > 400 * 2**20, 30, "both processes to hold the buffer")
        exact = tree_memory(proc.pid, exact=True)
        assert 200 * 2**20 < exact < 300 * 2**20
        assert MemoryWatch(proc.pid, 320 * 2**20).poll() is None
        over = MemoryWatch(proc.pid, 100 * 2**20).poll()
        assert over is not None and over.processes == 2 and 200 * 2**20 < over.held < 300 * 2**20
        assert over.message().startswith("out of memory: the job's 2 process(es) held 0.2")
    finally:
        kill_tree(proc.pid)
        proc.wait()
