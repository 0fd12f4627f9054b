"""`data.num_workers: auto` (the default): DataLoader processes per rank from the CPUs this process may use.

Only the PIL DataLoader path decodes in worker processes. The tensor cache, the feature cache and prepared shards
need none (their batches are a gather and a few kernels; shards are assembled by a thread), so they ignore it.
auto = min(CPUs per rank - 1, AUTO_MAX_WORKERS), at least 0: one CPU is left to the rank itself (the training step
and the optimizer), the others decode. CPUs per rank: the CPUs this process may run on (its affinity mask, which a
container's cpuset sets) divided by the ranks on this machine (LOCAL_WORLD_SIZE under torchrun). Measured in
docs/benchmarks.md ("Shard format" and `--only shards`): on 2 cores one worker keeps the PIL path ahead of none.
"""
from __future__ import annotations

import os
from typing import Any

AUTO_MAX_WORKERS = 4
"""Processes per rank that `auto` never exceeds (more rarely help a PIL pipeline and each costs ~300 MB of RSS)."""


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_num_workers(value: int | str, local_world_size: int | None = None) -> int:
    """The DataLoader processes of one rank for `data.num_workers` (an int is taken as given)."""
    if value != "auto":
        return int(value)
    ranks = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    per_rank = available_cpus() // max(ranks, 1)
    return max(0, min(per_rank - 1, AUTO_MAX_WORKERS))


def num_workers(cfg: Any) -> int:
    """`resolve_num_workers` of a config's data.num_workers."""
    return resolve_num_workers(cfg.data.num_workers)
