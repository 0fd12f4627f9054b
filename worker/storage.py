"""What the disk holds: `python -m worker storage [--json]`.

`usage()`: every job's run folder in the artifact store (its checkpoints apart), every stored dataset zip with what
refers to it (nothing: an orphan `worker gc` removes), this machine's caches, free space (worker/diskspace.py) and
Redis' memory.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import redis

from core.errors import DataError
from core.runfolder import CHECKPOINTS
from worker import keys
from worker.artifacts import DATASET_REF_PREFIX, ArtifactStore
from worker.caches import budgeted_caches
from worker.diskspace import disk_places, min_free_bytes
from worker.paths import cache_dir, runs_cache_dir, var_dir
from worker.record import JobRecord


def folder_bytes(path: Path) -> tuple[int, int]:
    """(bytes, files) under a local folder; (0, 0) when it does not exist."""
    total = files = 0
    if path.is_dir():
        for p in path.rglob("*"):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
                files += 1
    return total, files


def local_caches() -> list[dict[str, Any]]:
    """This machine's caches: the dataset caches with their byte budgets (worker/caches.py: `budget` in bytes and the
    variable setting it), run folders of remote stores and dashboard uploads (kept by age: no budget)."""
    rows = []
    places = [(c.what, c.path, c) for c in budgeted_caches()]
    places += [("run folders (remote store's local copies)", runs_cache_dir(), None),
               ("dashboard uploads", var_dir() / "uploads", None)]
    for what, path, cache in places:
        size, files = folder_bytes(path)
        entries = sum(1 for _ in path.iterdir()) if path.is_dir() else 0
        try:
            budget = cache.budget() if cache is not None else None
        except DataError:  # a wrong value is the job's error (and the worker's); here it shows as no budget
            budget = None
        rows.append({"cache": what, "path": str(path), "bytes": size, "files": files, "entries": entries,
                     "budget": budget, "budget_env": cache.budget_env if cache is not None else None})
    other_size, _ = folder_bytes(cache_dir())
    known = sum(r["bytes"] for r in rows if str(r["path"]).startswith(str(cache_dir())))
    if other_size > known:
        rows.append({"cache": "other caches", "path": str(cache_dir()), "bytes": other_size - known, "files": None,
                     "entries": None})
    return rows


def job_folders(conn: redis.Redis, store: ArtifactStore) -> list[dict[str, Any]]:
    """Every run folder in the store: its job (None when the job record is gone), bytes, checkpoint bytes."""
    by_job: dict[str, dict[str, Any]] = {}
    for key, size, modified in store.listing("jobs"):
        parts = key.split("/", 3)  # jobs/<id>/run/<rel>
        if len(parts) < 4:
            continue
        row = by_job.setdefault(parts[1], {"job_id": parts[1], "bytes": 0, "checkpoint_bytes": 0, "modified": 0.0})
        row["bytes"] += size
        row["modified"] = max(row["modified"], modified)
        if parts[3].startswith(CHECKPOINTS + "/"):
            row["checkpoint_bytes"] += size
    records = JobRecord.fetch_many(conn, list(by_job), "state", "name", "ended_at")
    for job_id, row in by_job.items():
        rec = records.get(job_id)
        row["state"] = str(rec.state) if rec is not None and rec.state is not None else None
        row["name"] = rec.get("name") if rec is not None else None
        row["ended_at"] = rec.get("ended_at") if rec is not None else None
    return sorted(by_job.values(), key=lambda r: -r["bytes"])


def referenced_dataset_keys(conn: redis.Redis) -> dict[str, list[str]]:
    """Stored dataset zip key → what refers to it (`NAME:VERSION` of registered versions, `job <id>` of jobs)."""
    from worker.datasets import dataset_versions, list_datasets

    refs: dict[str, list[str]] = {}
    for name in list_datasets(conn):
        for version in dataset_versions(conn, name):
            if version.source.startswith(DATASET_REF_PREFIX):
                refs.setdefault(version.source.removeprefix(DATASET_REF_PREFIX), []).append(version.ref)
    ids = [i.decode() for i in conn.zrange(keys.jobs_index(), 0, -1)]
    for job_id, rec in JobRecord.fetch_many(conn, ids, "config").items():
        path = str(((rec.config if rec is not None else None) or {}).get("data", {}).get("path") or "")
        if path.startswith(DATASET_REF_PREFIX):
            refs.setdefault(path.removeprefix(DATASET_REF_PREFIX), []).append(f"job {job_id}")
    return refs


def stored_datasets(conn: redis.Redis, store: ArtifactStore) -> list[dict[str, Any]]:
    refs = referenced_dataset_keys(conn)
    return [{"key": key, "bytes": size, "modified": modified, "used_by": refs.get(key, [])}
            for key, size, modified in store.listing("datasets") if key.endswith(".zip")]


def redis_memory(conn: redis.Redis) -> dict[str, Any]:
    info = conn.info("memory")
    return {"used_memory": int(info.get("used_memory", 0)), "maxmemory": int(info.get("maxmemory", 0)),
            "maxmemory_policy": info.get("maxmemory_policy"), "keys": int(conn.dbsize())}


def usage(conn: redis.Redis, store: ArtifactStore) -> dict[str, Any]:
    """The whole report `python -m worker storage --json` prints."""
    jobs = job_folders(conn, store)
    datasets = stored_datasets(conn, store)
    return {
        "store": store.url,
        "disk": [dataclasses.asdict(p) for p in disk_places(store)],
        "min_free_bytes": min_free_bytes(),
        "jobs": jobs,
        "datasets": datasets,
        "models": [],
        "caches": local_caches(),
        "redis": redis_memory(conn),
        "totals": {"jobs": sum(j["bytes"] for j in jobs), "checkpoints": sum(j["checkpoint_bytes"] for j in jobs),
                   "datasets": sum(d["bytes"] for d in datasets),
                   "orphan_datasets": sum(d["bytes"] for d in datasets if not d["used_by"])},
    }
