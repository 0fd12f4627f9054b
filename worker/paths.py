"""Local folders of this machine (never artifact-store paths): var/, the embedded Redis's data, caches."""
from __future__ import annotations

import os
from pathlib import Path

from core.data.defaults import EXTRACTION_CACHE, SHARD_CACHE
from worker.defaults import REPO_ROOT, VAR_DIR


def var_dir() -> Path:
    """`TRAINER_VAR_DIR` or `var/` under the repository root (not the cwd, so every command finds the same one)."""
    raw = os.environ.get("TRAINER_VAR_DIR", "").strip()
    path = Path(raw).expanduser() if raw else Path(VAR_DIR)
    return path if path.is_absolute() else REPO_ROOT / path


def redis_dir() -> Path:
    """Data, config, pidfile and password of the embedded Redis."""
    return var_dir() / "redis"


def password_file() -> Path:
    """The embedded Redis's password (mode 0600), generated on its first start."""
    return redis_dir() / "password"


def cache_dir() -> Path:
    """Worker-local cache: datasets fetched from a remote store, run folders of jobs synced to a remote store."""
    return var_dir() / "cache"


def runs_cache_dir() -> Path:
    """Run folders of jobs synced to a remote store (`<job id>/run/`), written by the worker running them."""
    return cache_dir() / "runs"


def dataset_cache_dir() -> Path:
    """Dataset zips fetched from a remote store (`<sha256>.zip`) and registered in-place sources synced from a URL
    (`<version hash>/`, or `<version hash>.zip`), once per machine."""
    return cache_dir() / "datasets"


def extraction_cache_dir() -> Path:
    """Where this machine's training processes extract dataset zips (core's cache, `<sha256, 16 hex>/`): the worker
    hands it to them as DATA_CACHE_DIR. Core's own default place (EXTRACTION_CACHE) under this worker's var folder,
    so it follows TRAINER_VAR_DIR like every other cache of the worker."""
    return var_dir() / EXTRACTION_CACHE


def shard_cache_dir() -> Path:
    """Where this machine's training processes keep prepared shards (core/data/shard_cache.py, `<sha256>.tar`, within
    DATASET_CACHE_GB): handed to them as DATASET_SHARD_DIR, so it follows TRAINER_VAR_DIR too."""
    return var_dir() / SHARD_CACHE
