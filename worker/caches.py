"""This machine's caches that grow per dataset, each with its byte budget (core/data/cache_budget.py: least recently
used first, never an entry a running job holds): one table, which `python -m worker storage` shows, `python -m
worker gc` trims to budget, and the worker's dataset fetches make room in.

| cache | folder | budget (GB) |
|---|---|---|
| extracted datasets | `var/cache/extracted/<sha256, 16 hex>/` | `EXTRACT_CACHE_GB` (core's, 40) |
| dataset cache | `var/cache/datasets/` (zips from a remote store, synced in-place sources) | `DOWNLOAD_CACHE_GB` (40) |
| prepared shards | `var/cache/shards/<sha256>.tar` | `DATASET_CACHE_GB` (core's, 20) |

Run folders of a remote store's jobs and dashboard uploads are not caches of datasets: the retention policy
(worker/retention.py) removes them by age.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from core.data import archive
from core.data.cache_budget import CacheEntry, budget_bytes, entries, make_room
from core.data.defaults import (
    DATASET_CACHE_GB_DEFAULT,
    DATASET_CACHE_GB_ENV,
    EXTRACT_CACHE_GB_DEFAULT,
    EXTRACT_CACHE_GB_ENV,
)
from core.data.shard_cache import shard_entries
from worker.defaults import DOWNLOAD_CACHE_GB, DOWNLOAD_CACHE_GB_ENV
from worker.paths import dataset_cache_dir, extraction_cache_dir, shard_cache_dir


@dataclasses.dataclass(frozen=True)
class BudgetedCache:
    """A cache folder, the variable and default of its budget, and how to list its entries."""

    what: str
    path: Path
    budget_env: str
    default_gb: float
    list_entries: Callable[[Path], list[CacheEntry]]

    def budget(self) -> int:
        """Bytes (DataError naming the variable when it is set wrongly)."""
        return budget_bytes(self.budget_env, self.default_gb)

    def entries(self) -> list[CacheEntry]:
        return self.list_entries(self.path)


def _extractions(folder: Path) -> list[CacheEntry]:
    return entries(folder, archive.extraction_bytes)


def download_entries(folder: Path) -> list[CacheEntry]:
    """Zips and synced folders; a download in progress (`*.part<pid>`) is not an entry."""
    return [e for e in entries(folder) if ".part" not in e.path.name]


def budgeted_caches() -> list[BudgetedCache]:
    """This machine's dataset caches (its var folder: TRAINER_VAR_DIR)."""
    return [
        BudgetedCache("extracted datasets", extraction_cache_dir(), EXTRACT_CACHE_GB_ENV, EXTRACT_CACHE_GB_DEFAULT,
                      _extractions),
        BudgetedCache("dataset cache", dataset_cache_dir(), DOWNLOAD_CACHE_GB_ENV, DOWNLOAD_CACHE_GB,
                      download_entries),
        BudgetedCache("prepared shards", shard_cache_dir(), DATASET_CACHE_GB_ENV, DATASET_CACHE_GB_DEFAULT,
                      shard_entries),
    ]


def download_cache() -> BudgetedCache:
    return next(c for c in budgeted_caches() if c.budget_env == DOWNLOAD_CACHE_GB_ENV)


def make_download_room(need: int, keep: Path) -> list[CacheEntry]:
    """Before a dataset is downloaded into this machine's cache: remove least recently used downloads (none a running
    job holds) until `need` more bytes fit in DOWNLOAD_CACHE_GB."""
    cache = download_cache()
    return make_room(cache.entries(), budget=cache.budget(), need=need, keep=keep)
