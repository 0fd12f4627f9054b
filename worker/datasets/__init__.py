"""Registered, versioned datasets (README "Datasets", docs/redis.md): `register` a source under a NAME, list, show and
`remove` versions, and pin a job's `data.dataset` to the exact version it trains on.

Modules: registry (the Redis records, submission's resolution), sources (uploads and in-place URLs: listing, content
hash, the sampled health check, and the worker's `fetch` of a job's data).
"""
from __future__ import annotations

from worker.datasets.prepared import ensure_prepared, use_prepared
from worker.datasets.registry import (
    DatasetRef,
    DatasetVersion,
    JobUse,
    Registered,
    add_prepared_form,
    dataset_versions,
    describe,
    get_version,
    job_field,
    list_datasets,
    prepared_forms,
    record_job,
    register,
    remove,
    resolve_for_job,
    scan_source,
    summary,
    version_jobs,
)
from worker.datasets.sources import IN_PLACE, UPLOAD, fetch, needs_fetch

__all__ = ["IN_PLACE", "UPLOAD", "DatasetRef", "DatasetVersion", "JobUse", "Registered", "add_prepared_form",
           "dataset_versions", "describe", "ensure_prepared", "fetch", "get_version", "job_field", "list_datasets",
           "needs_fetch", "prepared_forms", "record_job", "register", "remove", "resolve_for_job", "scan_source",
           "summary", "use_prepared", "version_jobs"]
