"""Free disk: the floor below which new work waits (`DISK_MIN_FREE_GB`), checked on this machine's var/ folder (the
embedded Redis' data, caches, uploads) and a local artifact store. Submission, dataset uploads and idle workers ask
`low_disk` before they write anything (README "Disk, retention and limits")."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from worker.artifacts import ArtifactStore
from worker.defaults import DISK_MIN_FREE_GB, DISK_MIN_FREE_GB_ENV
from worker.paths import var_dir


@dataclasses.dataclass
class Place:
    """A folder on a disk and the free space there."""

    what: str
    path: str
    free: int
    total: int


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_places(store: ArtifactStore) -> list[Place]:
    """var/ (Redis data, caches, uploads) and a local artifact store, with their free bytes."""
    places = {"var": var_dir()}
    if store.is_local:
        places["artifact store"] = Path(store.base)
    out = []
    for what, path in places.items():
        usage = shutil.disk_usage(_existing(path))
        out.append(Place(what, str(path), usage.free, usage.total))
    return out


def min_free_bytes() -> int:
    """The floor: env DISK_MIN_FREE_GB (GiB, may be fractional), else DISK_MIN_FREE_GB."""
    raw = os.environ.get(DISK_MIN_FREE_GB_ENV, "").strip()
    try:
        gb = float(raw) if raw else DISK_MIN_FREE_GB
    except ValueError:
        gb = DISK_MIN_FREE_GB
    return int(max(gb, 0.0) * 2**30)


def low_disk(store: ArtifactStore) -> str | None:
    """Why new work must wait for disk space, or None."""
    floor = min_free_bytes()
    short = [p for p in disk_places(store) if p.free < floor]
    if not short:
        return None
    where = "; ".join(f"{p.what} {p.path}: {p.free / 2**30:.2f} GiB free" for p in short)
    return (f"low disk: {where}, below the {floor / 2**30:.2f} GiB floor ({DISK_MIN_FREE_GB_ENV}). Free space "
            "(`python -m worker storage` shows what each job, dataset and cache holds; `python -m worker gc` "
            "removes what the retention policy allows) and try again")
