"""Everything the dashboard and the CLI need, as plain functions over an explicit Redis connection.

    submit_job(config, overrides, connection=..., gpus=, priority=, dataset_path=, actor=) -> Submitted(job_id, ...)
    list_jobs(conn, states=None, owner=)    job_status(conn, job_id)        cancel_job(conn, job_id, actor=)
    retry_job(conn, job_id, actor=)         delete_job(conn, job_id, actor=) list_workers(conn)
    events_since(conn, job_id, last_id)     logs_tail(conn, job_id, n)      logs_since(conn, job_id, last_id)
    chart_events_since(conn, job_id, last_id)                               epoch_events(conn, job_id)
    artifact_files(job_id)                  open_artifact(job_id, name)     read_artifact(job_id, name)

People (README "Users and roles"): every function that changes something takes `actor: users.Actor | None` (None:
the operator, only while no user exists), checks it with `audit.authorize` and logs what it did with `audit.record`;
what it makes records the actor as its `owner`; listings take `owner: str | None` (None: everyone's).

Artifacts are addressed by (job id, name), and a name must be one the job's own listing returned, so no path a user
typed ever reaches the filesystem. Key layout and schemas: docs/redis.md. The dashboard (app/) imports the worker
package only through this module: states, artifact names, the store, connections and errors are re-exported here.
"""
from __future__ import annotations

from typing import IO, Any

import redis

from core.events import EPOCH_METRICS
from worker import (  # registries, deployments, people, webhooks
    accounts,
    audit,
    datasets,
    deployments,
    jobs,
    keys,
    models,
    notify,
    signin,
    users,
)
from worker.artifacts import NAMED_ARTIFACTS, ArtifactStore, store_url
from worker.chartstream import chart_events_since, epoch_events
from worker.connection import check, connect, redact, redis_url
from worker.dataset_view import suggest_dataset_name
from worker.dataset_view import thumbnails as dataset_thumbnails
from worker.defaults import (
    LIST_LIMIT,
    MAX_GPUS_PER_JOB,
    MAX_NODES_PER_JOB,
    PRIORITIES,
    REPO_ROOT,
    STATUS_WAIT_CANCEL,
)
from worker.errors import (
    ArtifactError,
    DatasetError,
    InvalidJobStateError,
    ModelError,
    NoSuchDatasetError,
    NoSuchJobError,
    NoSuchSweepError,
    PermissionDeniedError,
    RedisUnavailableError,
    SubmissionError,
    UserError,
)
from worker.nodes import NodeState, job_nodes
from worker.notify import HookError
from worker.paths import var_dir
from worker.presence import is_alive, list_workers
from worker.queues import discard_rq_job
from worker.record import JobRecord
from worker.states import ACTIVE_STATES, FINAL_STATES, JobState
from worker.streaming import (
    events_since,
    follow_logs,
    logs_since,
    logs_tail,
    wait_events,
)
from worker.submit import Submitted, check_request, default_time_limit, submit_job
from worker.sweeps import (
    PRUNERS,
    SAMPLERS,
    SHOWN_TRIAL_COUNTS,
    SweepState,
    TrialCount,
    cancel_sweep,
    create_sweep,
    importances,
    list_sweeps,
    optuna_study,
    shown_counts,
    sweep_status,
    sweep_trials,
    trial_ended,
)

__all__ = [
    # jobs
    "ACTIVE_STATES", "FINAL_STATES", "JobState", "NodeState", "Submitted", "artifact_files", "cancel_job", "delete_job",
    "chart_events_since", "epoch_events", "events_since", "follow_logs", "job_nodes", "job_status", "list_jobs",
    "list_workers", "logs_since", "logs_tail", "open_artifact", "read_artifact", "retry_job", "submit_job",
    "wait_events",
    # sweeps
    "EPOCH_METRICS", "PRUNERS", "SAMPLERS", "SHOWN_TRIAL_COUNTS", "SweepState", "TrialCount", "cancel_sweep",
    "create_sweep", "importances", "list_sweeps", "optuna_study", "shown_counts", "sweep_status", "sweep_trials",
    # what the dashboard's pages need besides (app/ imports worker only through this module)
    "NAMED_ARTIFACTS", "ArtifactStore", "store_url", "check", "connect", "redact", "redis_url", "var_dir",
    "MAX_GPUS_PER_JOB", "MAX_NODES_PER_JOB", "PRIORITIES", "REPO_ROOT",
    "ArtifactError", "InvalidJobStateError", "NoSuchJobError", "NoSuchSweepError", "RedisUnavailableError",
    "SubmissionError",
    # the dataset registry (worker/datasets): datasets.register, .list_datasets, .describe, .remove, ...
    "datasets",
    # the model registry (worker/models: register, set_alias, resolve, ...) and managed deployments (create, stop, ...)
    "models", "deployments", "ModelError",
    # webhooks (worker/notify.py: add_hook, list_hooks, remove_hook, delivery_log, EVENTS) and their refusal
    "notify", "HookError",
    # people: users (roles, tokens, Actor), their management as an actor (worker/accounts.py: add, change_role,
    # change_limits, new_token, remove, listing, sign_in), the audit log (worker/users.py, worker/audit.py) and the
    # sign-in throttle (worker/signin.py)
    "users", "accounts", "audit", "signin", "PermissionDeniedError", "UserError",
    # what the Datasets page and New job need besides: its errors, thumbnails, a name from a file name, and the
    # submission checks that need no dataset (config, GPUs, nodes: run before an upload is registered)
    "DatasetError", "NoSuchDatasetError", "dataset_thumbnails", "suggest_dataset_name", "check_request",
    "default_time_limit",
]

SUMMARY_EXCLUDE = ("config", "overrides", "log_tail", "dataset")
"""Bulky fields list_jobs leaves out (job_status has them)."""


def job_status(conn: redis.Redis, job_id: str) -> dict[str, Any]:
    """The full status of one job (NoSuchJobError when unknown): at least state, progress, epoch, epochs, error,
    artifacts, best_val_acc, worker, submitted_at/started_at/ended_at (unix seconds), duration, eta, config."""
    record = JobRecord.fetch(conn, job_id)
    st = record.status()
    st["nodes"] = job_nodes(conn, job_id, st)
    if record.state is JobState.RUNNING and record.worker:
        st["worker_alive"] = is_alive(conn, record.worker)
    return st


def list_jobs(
    conn: redis.Redis, states: set[str] | None = None, *, limit: int = LIST_LIMIT, with_config: bool = False,
    owner: str | None = None,
) -> list[dict[str, Any]]:
    """Jobs, newest first, optionally only those in `states` and only `owner`'s (None: everyone's)."""
    ids = [i.decode() for i in conn.zrevrange(keys.jobs_index(), 0, max(0, limit - 1))]
    out = []
    for record in JobRecord.fetch_many(conn, ids).values():
        if record is None:
            continue
        st = record.status()
        if (states and st["state"] not in states) or (owner is not None and st["owner"] != owner):
            continue
        if not with_config:
            for k in SUMMARY_EXCLUDE:
                st.pop(k, None)
        out.append(st)
    return out


def _authorized(conn: redis.Redis, job_id: str, actor: users.Actor | None, verb: str) -> tuple[users.Actor, JobRecord]:
    """The job's record, once `actor` may `verb` it (its owner, or an admin); PermissionDeniedError otherwise."""
    record = JobRecord.fetch(conn, job_id, "owner", "attempt", "num_nodes")
    owner = record.get("owner", users.OPERATOR)
    return audit.authorize(conn, actor, users.Action.MANAGE, f"{verb} job {job_id}", owner=owner), record


def cancel_job(conn: redis.Redis, job_id: str, *, wait: float = 0.0, actor: users.Actor | None = None) -> str:
    """Cancel a queued, recovering or running job; returns the state it is in afterwards (worker.jobs.cancel_job).
    A sweep's trial that the cancel itself ended (no worker ends it) is told to its sweep now, or at the next scan.
    `actor`: the job's owner or an admin (PermissionDeniedError otherwise, nothing changed)."""
    actor, record = _authorized(conn, job_id, actor, "cancel")
    state = jobs.cancel_job(conn, job_id, wait=wait, ended=_tell_its_sweep)
    audit.record(conn, actor, audit.AuditAction.JOB_CANCEL, job_id, owner=record.get("owner", users.OPERATOR),
                 state=state)
    return state


def _tell_its_sweep(record: JobRecord) -> None:
    if record.refresh("sweep") and record.get("sweep"):
        trial_ended(record.conn, record.get("sweep"), wait=0)


def retry_job(conn: redis.Redis, job_id: str, *, store: ArtifactStore | None = None,
              actor: users.Actor | None = None) -> str:
    """Submit a finished, failed or cancelled job again (same config, GPUs, priority, stored dataset): new job id,
    owned by `actor` (who must own the old job, or be an admin) and within their limits."""
    actor, _ = _authorized(conn, job_id, actor, "retry")
    record = JobRecord.fetch(conn, job_id)
    if record.state not in FINAL_STATES:
        raise InvalidJobStateError(f"job {job_id} is {record.state}; only a finished, failed or cancelled job can "
                                   "be retried")
    new = submit_job(record.config, connection=conn, gpus=record.gpus, nodes=record.num_nodes,
                     priority=record.priority, store=store, allow_local_paths=True, timeout=record.timeout,
                     name=record.get("name"), extra={"retried_from": job_id}, actor=actor).job_id
    audit.record(conn, actor, audit.AuditAction.JOB_RETRY, job_id, owner=record.get("owner", users.OPERATOR), new=new)
    return new


def delete_job(conn: redis.Redis, job_id: str, *, store: ArtifactStore | None = None,
               wait: float = STATUS_WAIT_CANCEL, actor: users.Actor | None = None) -> None:
    """Remove a job everywhere: its keys, its RQ records and its artifacts. A job still running is cancelled first
    (InvalidJobStateError when it does not stop within `wait` seconds). `actor`: its owner or an admin."""
    actor, record = _authorized(conn, job_id, actor, "delete")
    if record.state not in FINAL_STATES:
        state = cancel_job(conn, job_id, wait=wait, actor=actor)
        if state not in FINAL_STATES:
            raise InvalidJobStateError(f"job {job_id} is still {state}; try again once it has stopped")
    nodes = record.num_nodes
    for attempt in range(record.attempt + 1):
        discard_rq_job(conn, keys.rq_job_id(job_id, attempt))
        for node in range(nodes if nodes > 1 else 0):  # a multi-node attempt: one RQ job per node
            discard_rq_job(conn, keys.rq_node_job_id(job_id, attempt, node))
    with conn.pipeline() as pipe:
        pipe.delete(*keys.job_keys(job_id))
        pipe.zrem(keys.jobs_index(), job_id)
        pipe.srem(keys.running_set(), job_id)
        pipe.srem(keys.recovering_set(), job_id)
        pipe.zrem(keys.gangs(), job_id)
        pipe.execute()
    (store or ArtifactStore()).delete_job(job_id)
    audit.record(conn, actor, audit.AuditAction.JOB_DELETE, job_id, owner=record.get("owner", users.OPERATOR))


def artifact_files(job_id: str, *, store: ArtifactStore | None = None) -> list[str]:
    """Every file of the job's run folder (relative names, the only names open_artifact accepts)."""
    return (store or ArtifactStore()).list_files(job_id)


def open_artifact(job_id: str, name: str, *, store: ArtifactStore | None = None) -> IO[bytes]:
    """Open a file of the job's run folder: `name` from artifact_files, or a short name (onnx, int8, pt, bundle,
    report, labels, config, metrics, log)."""
    return (store or ArtifactStore()).open(job_id, name)


def read_artifact(job_id: str, name: str, *, store: ArtifactStore | None = None) -> bytes:
    """The bytes of one artifact, whole in memory: for small files (report, labels, images, the model Try it loads).
    Downloads stream `open_artifact` instead (app/downloads.py)."""
    return (store or ArtifactStore()).read_bytes(job_id, name)
