"""Registering a dataset version from the dashboard (the Datasets page, New job's upload): an uploaded zip or a URL
read in place, through the registry's own `register` (its checks, its messages, nothing registered on a refusal).

The dashboard never reads a path a browser user typed from its own disk: a plain path is refused, and a `file://`
URL only names data under a folder listed in DASHBOARD_DATASET_ROOTS (a shared file system the workers mount).
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redis

from app.defaults import DATASET_ROOTS_ENV
from app.upload import save_upload
from worker.api import ArtifactStore, DatasetError, datasets, users


def dataset_roots() -> list[Path]:
    """The folders a `file://` source may be under (env DASHBOARD_DATASET_ROOTS, read on every call)."""
    raw = os.environ.get(DATASET_ROOTS_ENV, "")
    return [Path(p).resolve() for p in raw.split(os.pathsep) if p.strip()]


def check_url(url: str) -> str:
    """The URL, stripped, if the dashboard may register it; DatasetError saying why not."""
    url = url.strip()
    if not url:
        raise DatasetError("give a URL: s3://bucket/prefix, gs://..., https://host/data.zip or file:///shared/path")
    parts = urlsplit(url)
    if "://" not in url or not parts.scheme:
        raise DatasetError(f"{url!r} is not a URL; the dashboard registers URLs (s3://..., file:///...) or an "
                           "uploaded .zip (a folder on your machine: python -m worker dataset add NAME FOLDER)")
    if parts.scheme == "file":
        path = Path(unquote(parts.path)).resolve()
        roots = dataset_roots()
        if not any(path == r or r in path.parents for r in roots):
            allowed = ", ".join(str(r) for r in roots) or "none"
            raise DatasetError(f"{url}: the dashboard registers file:// data only under the folders in "
                               f"{DATASET_ROOTS_ENV} (now: {allowed}); use python -m worker dataset add instead")
    return url


def check_name(name: str) -> str:
    """A dataset name (no version: registering makes the next one); DatasetError naming the rule."""
    ref = datasets.DatasetRef.parse(name)
    if ref.version is not None:
        raise DatasetError(f"give the dataset's name without a version ({ref.name!r}): registering makes the next one")
    return ref.name


def register_saved(conn: redis.Redis, name: str, path: Path, *, store: ArtifactStore,
                   actor: users.Actor) -> datasets.Registered:
    """Register a zip the dashboard saved itself (app/upload.py: New job's checked upload); DatasetError, or
    PermissionDeniedError for a viewer."""
    check_name(name)
    return datasets.register(conn, name, str(path), store=store, actor=actor)


def register_upload(conn: redis.Redis, name: str, data: bytes, *, store: ArtifactStore,
                    actor: users.Actor) -> datasets.Registered:
    """Register an uploaded zip's bytes (app/upload.py's cap and checks, then the registry's); UploadError,
    DatasetError or PermissionDeniedError with the reason, nothing registered."""
    check_name(name)  # refused before anything is saved
    actor.require(users.Action.SUBMIT, "register datasets")  # (the registry checks again, and logs a refusal)
    _, path = save_upload(data)
    return datasets.register(conn, name, str(path), store=store, actor=actor)


def register_url(conn: redis.Redis, name: str, url: str, *, store: ArtifactStore,
                 actor: users.Actor) -> datasets.Registered:
    """Register a URL read in place; DatasetError (or PermissionDeniedError) with the reason, nothing registered."""
    check_name(name)
    return datasets.register(conn, name, check_url(url), store=store, actor=actor)
