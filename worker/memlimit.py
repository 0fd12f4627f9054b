"""A job's memory bound: the worker stops a training process tree that holds more than `JOB_MEMORY_LIMIT_GB`, so
the job fails with "out of memory: ..." instead of the kernel's OOM killer picking a victim (the worker, Redis, the
dashboard, another job) or the machine swapping to a halt.

What counts is the memory the kernel cannot drop: anonymous and shared-memory pages (tensors, Python objects, the
DataLoader workers' shared batches), not the page cache of files (libraries, an mmapped dataset), which the kernel
reclaims under pressure. Each look is cheap (RssAnon + RssShmem of every process of the tree from /proc/PID/status,
about 0.1 ms a process); that sum counts a page shared by a forked DataLoader worker once per process, so it is an
upper bound, and only when it is over the limit does the watch take the exact figure (the proportional share, Pss,
from /proc/PID/smaps_rollup: about 15 ms a process) before stopping anything.

Why a watchdog and not the kernel: RLIMIT_AS counts address space, which CUDA reserves by the terabyte, so it breaks
GPU jobs; a cgroup v2 `memory.max` needs a delegated cgroup, which a worker in a container or under a plain user
seldom has (docs/reliability.md). A spike faster than the watch's interval can still reach the kernel's OOM killer:
the guard (worker/guard.py) raises the job's `oom_score_adj`, so the kernel then picks the job, not its worker.
"""
from __future__ import annotations

import dataclasses
import os
import re

import psutil

from worker.defaults import JOB_MEMORY_FRACTION, JOB_MEMORY_LIMIT_ENV

GiB = 2**30


def job_memory_limit() -> int | None:
    """The bound in bytes: env JOB_MEMORY_LIMIT_GB (GiB, may be fractional; 0 = none), else JOB_MEMORY_FRACTION of
    this machine's RAM (a worker runs one job at a time). ValueError naming the variable when it is not a number."""
    raw = os.environ.get(JOB_MEMORY_LIMIT_ENV, "").strip()
    if not raw:
        return int(psutil.virtual_memory().total * JOB_MEMORY_FRACTION)
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb >= 0 or gb == float("inf"):
        raise ValueError(f"{JOB_MEMORY_LIMIT_ENV}: must be a number of GiB (0 for no limit), got {raw!r}")
    return int(gb * GiB) or None


def describe_limit(limit: int | None) -> str:
    """The bound as the worker's start line and `worker doctor` say it."""
    return f"{limit / GiB:.2f} GiB per job ({JOB_MEMORY_LIMIT_ENV})" if limit else f"none ({JOB_MEMORY_LIMIT_ENV}=0)"


@dataclasses.dataclass(frozen=True)
class MemoryExceeded:
    """A job's processes held more than its bound: `held` bytes (the exact figure) over `limit`, in `processes`."""

    limit: int
    held: int
    processes: int

    def message(self) -> str:
        """The job's error: what happened, the numbers, and what to change."""
        return (f"out of memory: the job's {self.processes} process(es) held {self.held / GiB:.2f} GiB, over the "
                f"limit of {self.limit / GiB:.2f} GiB per job ({JOB_MEMORY_LIMIT_ENV} on the worker); they were "
                "stopped. Use a smaller train.batch_size, data.image_size or data.num_workers, or raise "
                f"{JOB_MEMORY_LIMIT_ENV}")


_STATUS_FIELDS = re.compile(rb"^(RssAnon|RssShmem):\s+(\d+) kB", re.MULTILINE)
_ROLLUP_FIELDS = re.compile(rb"^(Pss_Anon|Pss_Shmem):\s+(\d+) kB", re.MULTILINE)


def _kb_sum(path: str, fields: re.Pattern[bytes]) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        return None
    found = fields.findall(text)
    return sum(int(kb) for _name, kb in found) * 1024 if found else None


def _held(pid: int, *, exact: bool) -> int:
    """Bytes process `pid` holds: the cheap upper bound, or with `exact` its proportional share. A kernel without
    these files (or another OS): psutil's RSS."""
    if exact:
        held = _kb_sum(f"/proc/{pid}/smaps_rollup", _ROLLUP_FIELDS)
        if held is not None:
            return held
    held = _kb_sum(f"/proc/{pid}/status", _STATUS_FIELDS)
    if held is not None:
        return held
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def tree_pids(pid: int) -> list[int]:
    """`pid` and its live descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.Error:
        return []


def tree_memory(pid: int, *, exact: bool = False) -> int:
    """Bytes the process tree under `pid` holds (see the module docstring)."""
    return sum(_held(p, exact=exact) for p in tree_pids(pid))


class MemoryWatch:
    """Looks at a launched command's process tree; `poll` returns a `MemoryExceeded` once it holds over `limit`
    bytes (None: no bound, or under it)."""

    def __init__(self, pid: int, limit: int | None):
        self.pid = pid
        self.limit = limit

    def poll(self) -> MemoryExceeded | None:
        if not self.limit:
            return None
        pids = tree_pids(self.pid)
        if sum(_held(p, exact=False) for p in pids) <= self.limit:
            return None
        held = sum(_held(p, exact=True) for p in pids)
        return MemoryExceeded(self.limit, held, len(pids)) if held > self.limit else None
