"""The retention policy: `python -m worker gc [--dry-run]`, and once a day by every worker.

What it removes (each rule's age is a constant in worker/defaults.py):
- `checkpoints/last.pt` of a job that **finished** more than RETENTION_CHECKPOINT_DAYS ago (best.pt, the report and
  export/ stay: the model can still be downloaded, exported and pruned; only resuming needs last.pt, and a finished
  job never resumes). Failed and cancelled jobs keep theirs: a retry resumes from it.
- the run folder of a job whose record is gone (deleted while its files could not be removed, or by hand);
- a stored dataset zip that no registered version and no job refers to, older than RETENTION_ORPHAN_DAYS;
- on this machine: the local copy of a remote store's run folder whose job was deleted, or ended more than
  RETENTION_LOCAL_RUN_DAYS ago (the store keeps it; a download fetches it again); dashboard uploads older than a day.

Nothing of a queued, running or recovering job is ever touched. A run over the store takes a Redis lock, so two
workers sharing it do not both sweep it; the machine-local part runs on every machine.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import redis

from core.runfolder import CHECKPOINTS, LAST_CHECKPOINT
from worker import audit, keys, users
from worker.artifacts import ArtifactStore
from worker.defaults import (
    GC_INTERVAL,
    RETENTION_CHECKPOINT_DAYS,
    RETENTION_LOCAL_RUN_DAYS,
    RETENTION_ORPHAN_DAYS,
)
from worker.errors import WorkerError
from worker.paths import runs_cache_dir, var_dir
from worker.record import JobRecord
from worker.states import JobState
from worker.storage import job_folders, stored_datasets

DAY = 86400.0
UPLOADS_KEEP = DAY
"""Dashboard uploads (var/uploads) older than this are removed (submission has copied them into the store)."""


@dataclasses.dataclass
class Removal:
    """One thing the policy removes: where, why, how many bytes."""

    what: str
    """`store` (the artifact store, shared) or `local` (this machine)."""
    target: str
    reason: str
    bytes: int


def _age_days(stamp: float | None, now: float) -> float:
    return (now - float(stamp)) / DAY if stamp else 0.0


def plan_store(conn: redis.Redis, store: ArtifactStore, now: float | None = None) -> list[Removal]:
    """What the policy removes from the artifact store now."""
    now = now or time.time()
    out: list[Removal] = []
    for row in job_folders(conn, store):
        run = store.run_key(row["job_id"])
        if row["state"] is None:
            out.append(Removal("store", f"{run}/", "its job no longer exists", row["bytes"]))
            continue
        ended_days = _age_days(row["ended_at"], now)
        if row["state"] == JobState.FINISHED and ended_days > RETENTION_CHECKPOINT_DAYS:
            for key, size, _ in store.listing(f"{run}/{CHECKPOINTS}"):
                if key == f"{run}/{LAST_CHECKPOINT}":
                    out.append(Removal("store", key, f"finished {ended_days:.1f} days ago (over "
                                       f"{RETENTION_CHECKPOINT_DAYS:g}); best.pt and export/ stay", size))
    for ds in stored_datasets(conn, store):
        days = _age_days(ds["modified"], now)
        if not ds["used_by"] and days > RETENTION_ORPHAN_DAYS:
            out.append(Removal("store", ds["key"], f"no dataset version or job refers to it ({days:.1f} days old)",
                               ds["bytes"]))
    return out


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def plan_local(conn: redis.Redis, store: ArtifactStore, now: float | None = None) -> list[Removal]:
    """What the policy removes from this machine's caches now."""
    now = now or time.time()
    out: list[Removal] = []
    runs = runs_cache_dir()
    if not store.is_local and runs.is_dir():
        folders = [p for p in runs.iterdir() if p.is_dir()]
        records = JobRecord.fetch_many(conn, [p.name for p in folders], "state", "ended_at")
        for folder in folders:
            rec = records.get(folder.name)
            if rec is None:
                out.append(Removal("local", str(folder), "its job no longer exists", _folder_bytes(folder)))
            elif rec.state is not None and rec.state.is_final:
                days = _age_days(rec.get("ended_at"), now)
                if days > RETENTION_LOCAL_RUN_DAYS:
                    out.append(Removal("local", str(folder), f"a copy of the store's folder; its job ended "
                                       f"{days:.1f} days ago", _folder_bytes(folder)))
    uploads = var_dir() / "uploads"
    if uploads.is_dir():
        for path in uploads.iterdir():
            if path.is_file() and now - path.stat().st_mtime > UPLOADS_KEEP:
                out.append(Removal("local", str(path), "a dashboard upload over a day old", path.stat().st_size))
    return out


def apply(store: ArtifactStore, removals: list[Removal]) -> list[Removal]:
    """Remove what the plan names; returns what was removed (an item that fails is skipped and left)."""
    done = []
    for item in removals:
        try:
            if item.what == "store":
                if item.target.endswith("/"):
                    store.delete_job(item.target.split("/")[1])
                else:
                    store.remove(item.target)
            elif Path(item.target).is_dir():
                shutil.rmtree(item.target)
            else:
                Path(item.target).unlink(missing_ok=True)
        except (OSError, WorkerError):
            continue
        done.append(item)
    return done


def collect(conn: redis.Redis, store: ArtifactStore, *, dry_run: bool = False,
            now: float | None = None, actor: users.Actor | None = None) -> list[Removal]:
    """The whole policy: the store's part and this machine's; with dry_run, only what it would remove. Applying it is
    an admin's (PermissionDeniedError otherwise); a dry run anyone may ask for."""
    if not dry_run:
        actor = audit.authorize(conn, actor, users.Action.ADMIN, "run the retention policy (gc)")
    plan = plan_store(conn, store, now) + plan_local(conn, store, now)
    if dry_run:
        return plan
    done = apply(store, plan)
    audit.record(conn, actor, audit.AuditAction.GC, store.url, removed=len(done), bytes=sum(r.bytes for r in done))
    return done


def claim(conn: redis.Redis, scope: str) -> bool:
    """Whether the caller runs the policy for `scope` now: the first to claim it in GC_INTERVAL does."""
    return bool(conn.set(keys.gc_claim(scope), str(time.time()), nx=True, ex=int(GC_INTERVAL)))


def daily(conn: redis.Redis, store: ArtifactStore, machine: str) -> list[Removal]:
    """A worker's daily run: the store's part by one worker of all that share the store, this machine's part by one
    worker of this machine."""
    store_id = store.identity()
    plan = plan_store(conn, store) if claim(conn, store_id) else []
    if claim(conn, f"{store_id}:{machine}"):
        plan += plan_local(conn, store)
    return apply(store, plan)
