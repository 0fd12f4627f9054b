"""Byte budgets for this machine's caches, least recently used entries removed first, never one in use.

One piece serves every cache that grows per dataset: the prepared-shard cache (core/data/shard_cache.py,
DATASET_CACHE_GB), the extraction cache (core/data/archive.py, EXTRACT_CACHE_GB) and a worker's download cache of
dataset zips and synced folders (worker/datasets, DOWNLOAD_CACHE_GB). A cache is a folder of entries (a file or a
folder each; names starting with "." are work in progress and never entries).

- The clock: an entry's mtime, set to now each time it is used (`touch`), so "least recently used" survives restarts
  and is shared by every process of the machine.
- In use: a process reading an entry for its whole life (a training process and its extraction) holds a shared
  `flock` on it (`hold`); the kernel drops it when the process ends, however it ends. Eviction takes an exclusive lock
  without waiting and skips the entry when that fails, so an entry a running job holds is never removed.
- Removal: under the exclusive lock the entry is renamed to a hidden name (atomic: no process sees half of it), then
  deleted. A process that took its hold on the old name meanwhile notices (`hold` compares the inode) and makes the
  entry again.
- When: before an entry is added, room is made for its size (`make_room`); `python -m worker gc` trims every cache to
  its budget too. An entry bigger than the whole budget is still added (refusing the job would help nobody); the
  rest of the cache is emptied for it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from core.errors import DataError

GB = 10**9


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One entry of a cache: its path, its size and when it was last used (mtime, ns)."""

    path: Path
    bytes: int
    last_used_ns: int


def budget_bytes(env: str, default_gb: float) -> int:
    """The budget in bytes from env `env` (GB, 10**9 bytes, fractional allowed), else `default_gb`; DataError naming
    the variable when it is not a positive number."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return int(default_gb * GB)
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not 0 < gb < float("inf"):
        raise DataError(f"{env}={raw!r} is not a positive number of GB")
    return int(gb * GB)


def folder_bytes(path: Path) -> int:
    """Bytes of the files under a folder (symlinks not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def entries(folder: Path, size_of: Callable[[Path], int] | None = None) -> list[CacheEntry]:
    """Every entry of a cache folder (hidden names skipped). `size_of(path)` gives an entry's bytes (default: a
    file's size, a folder's walk)."""
    out = []
    try:
        children = list(os.scandir(folder))
    except OSError:
        return []
    for child in children:
        if child.name.startswith("."):
            continue
        path = Path(child.path)
        try:
            mtime = child.stat(follow_symlinks=False).st_mtime_ns
            size = size_of(path) if size_of else (folder_bytes(path) if child.is_dir(follow_symlinks=False)
                                                  else child.stat(follow_symlinks=False).st_size)
        except OSError:
            continue
        out.append(CacheEntry(path, size, mtime))
    return out


def touch(path: Path) -> bool:
    """Mark the entry used now (the LRU clock); False when it is gone."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


_HELD: dict[str, int] = {}
"""Path → the descriptor holding its shared lock, for this process's life."""


def hold(path: Path) -> bool:
    """Hold a shared lock on the entry for the rest of this process's life (it is in use); False when the entry is
    gone or was being removed (the caller makes it again)."""
    key = str(path)
    if key in _HELD:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not os.path.samestat(os.fstat(fd), os.stat(path)):
            raise FileNotFoundError(path)  # removed (renamed away) before our lock
    except OSError:
        os.close(fd)
        return False
    _HELD[key] = fd
    return True


def release(path: Path) -> None:
    """Let go of a hold taken by this process (tests; a long-lived process done with an entry)."""
    fd = _HELD.pop(str(path), None)
    if fd is not None:
        os.close(fd)


def in_use(path: Path) -> bool:
    """Whether some process holds the entry (a dry run's question; `remove_entry` asks it again as it removes)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the lock


def remove_entry(path: Path) -> bool:
    """Remove an entry unless a process holds it; True when it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # in use
        doomed = path.with_name(f".evicting-{path.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return True
    finally:
        os.close(fd)
    if doomed.is_dir() and not doomed.is_symlink():
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        doomed.unlink(missing_ok=True)
    return True


def over_budget(cache: Iterable[CacheEntry], *, budget: int, need: int = 0,
                keep: Path | None = None) -> list[CacheEntry]:
    """The least recently used entries (not `keep`, none in use) whose removal lets `need` more bytes fit within
    `budget`: as many as that takes, or all there are."""
    listed = [e for e in cache if e.path != keep]
    total = sum(e.bytes for e in listed)
    out = []
    for entry in sorted(listed, key=lambda e: e.last_used_ns):
        if total + need <= budget:
            break
        if not in_use(entry.path):
            out.append(entry)
            total -= entry.bytes
    return out


def make_room(cache: Iterable[CacheEntry], *, budget: int, need: int = 0,
              keep: Path | None = None) -> list[CacheEntry]:
    """Remove what `over_budget` names (an entry held meanwhile stays). Returns what was removed."""
    return [e for e in over_budget(cache, budget=budget, need=need, keep=keep) if remove_entry(e.path)]
