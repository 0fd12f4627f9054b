"""Local folders of this machine (never artifact-store paths): var/, the embedded Redis's data, caches."""
from __future__ import annotations

import os
from pathlib import Path

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


def dataset_cache_dir() -> Path:
    """Datasets on this machine: zips fetched from a remote store (`<sha256>.zip`) and, because the worker hands this
    folder to its training processes as DATA_CACHE_DIR, core's extractions of them (`<sha256, 16 hex>/`). One folder,
    under var/ of the repository (or TRAINER_VAR_DIR), whatever the working directory."""
    return cache_dir() / "datasets"
