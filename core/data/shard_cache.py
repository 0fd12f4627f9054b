"""A worker's local cache of prepared shards: fetched once from the store, verified, kept within a disk budget.

- Where: $DATASET_SHARD_DIR, else defaults.SHARD_CACHE under the repository's var/ (a worker hands its training
  processes the folder under its own var/). One file per shard, named by its sha256: two datasets (or two
  versions) with the same shard share it, and a file there is always a verified one.
- Budget: $DATASET_CACHE_GB (GB, 10**9 bytes; default defaults.DATASET_CACHE_GB_DEFAULT). Before a shard is added,
  the least recently used shards (file mtime, touched on every use) are deleted until it fits
  (core/data/cache_budget.py, the LRU of every cache). A budget smaller than one shard is a DataError naming both
  numbers.
- Verification: a shard is downloaded to a temporary file while its sha256 is computed; a mismatch (corrupt or
  truncated in the store, or cut off in transit) is fetched once more, then the job fails naming the shard.
- Several processes (the ranks of a job, jobs of one worker) share the folder: a shard appears by an atomic rename,
  and a shard deleted by another process's eviction is simply fetched again.
"""
from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from core.data.cache_budget import CacheEntry, budget_bytes, entries, make_room, touch
from core.data.defaults import (
    DATASET_CACHE_GB_DEFAULT,
    DATASET_CACHE_GB_ENV,
    REPO_ROOT,
    SHARD_CACHE,
    SHARD_DIR_ENV,
    VAR_DIR,
)
from core.data.shards import ShardInfo, open_fs
from core.errors import DataError

_CHUNK = 4 << 20
FETCH_ATTEMPTS = 2
"""A shard whose hash does not match is fetched this many times in all before the job fails."""


def cache_budget_bytes() -> int:
    """DATASET_CACHE_GB in bytes; DataError when it is not a positive number."""
    return budget_bytes(DATASET_CACHE_GB_ENV, DATASET_CACHE_GB_DEFAULT)


def shard_entries(folder: Path) -> list[CacheEntry]:
    """The shards in a shard cache folder, as cache entries."""
    return [e for e in entries(folder) if e.path.suffix == ".tar"]


def shard_cache_dir() -> Path:
    return Path(os.environ.get(SHARD_DIR_ENV) or REPO_ROOT / VAR_DIR / SHARD_CACHE)


class ShardCache:
    """Fetch-verify-evict for one process; thread-safe (the loader's prefetch thread and its reader share it)."""

    def __init__(self, folder: Path | None = None, budget_bytes: int | None = None) -> None:
        self.folder = Path(folder) if folder is not None else shard_cache_dir()
        self.budget = cache_budget_bytes() if budget_bytes is None else int(budget_bytes)
        self._lock = threading.Lock()
        self._filesystems: dict[str, tuple[Any, str]] = {}
        self.fetched: list[str] = []
        """Names of the shards this process downloaded (tests and the report read it)."""
        self.refetched: list[str] = []
        """Names of shards whose first download did not match their sha256."""

    def path(self, shard: ShardInfo) -> Path:
        return self.folder / f"{shard.sha256}.tar"

    def get(self, base_url: str, shard: ShardInfo) -> Path:
        """The local, verified file of `shard` (of the form at `base_url`), fetched when not cached."""
        if shard.bytes > self.budget:
            raise DataError(f"the shard cache budget {DATASET_CACHE_GB_ENV}={self.budget / 1e9:g} GB ({self.budget} "
                            f"bytes) is smaller than one shard ({shard.name}: {shard.bytes} bytes); raise "
                            f"{DATASET_CACHE_GB_ENV}")
        target = self.path(shard)
        if touch(target):  # the LRU clock: a used shard is the most recent
            return target
        self.folder.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            tmp = self.folder / f".{shard.sha256}.{uuid.uuid4().hex[:8]}.part"
            try:
                digest, size = self._download(base_url, shard.name, tmp)
                if digest == shard.sha256 and size == shard.bytes:
                    with self._lock:
                        make_room(shard_entries(self.folder), budget=self.budget, need=shard.bytes, keep=target)
                        os.replace(tmp, target)
                        self.fetched.append(shard.name)
                    return target
                self.refetched.append(shard.name)
                problem = (f"sha256 {digest[:16]}… of {size} bytes, the index says {shard.sha256[:16]}… of "
                           f"{shard.bytes}")
            finally:
                tmp.unlink(missing_ok=True)
        raise DataError(f"shard {shard.name} of the prepared dataset {base_url} is corrupt or truncated ({problem}; "
                        f"fetched {FETCH_ATTEMPTS} times); prepare the dataset again")

    def _fs(self, base_url: str) -> tuple[Any, str]:
        """One filesystem per form for this cache's life (open_fs: not fsspec's shared instance cache)."""
        with self._lock:
            if base_url not in self._filesystems:
                self._filesystems[base_url] = open_fs(base_url)
            return self._filesystems[base_url]

    def _download(self, base_url: str, name: str, dest: Path) -> tuple[str, int]:
        url = f"{base_url.rstrip('/')}/{name}"
        digest, size = hashlib.sha256(), 0
        try:
            fs, root = self._fs(base_url)
            with fs.open(f"{root.rstrip('/')}/{name}", "rb") as src, dest.open("wb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        except FileNotFoundError:
            raise DataError(f"shard {url} is missing from the store; prepare the dataset again") from None
        except Exception as err:  # noqa: BLE001 — fsspec back-ends (s3fs, http) raise their own
            raise DataError(f"cannot fetch shard {url} into {dest.parent}: {type(err).__name__}: {err}") from None
        return digest.hexdigest(), size

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.tar")) if self.folder.is_dir() else 0
