"""Everything the dashboard and the CLI need, as plain functions over an explicit Redis connection.

    submit_job(config, overrides, connection=..., gpus=, priority=, dataset_path=)  -> job id   (worker.submit)
    list_jobs(conn, states=None)            job_status(conn, job_id)        cancel_job(conn, job_id)
    retry_job(conn, job_id)                 delete_job(conn, job_id)        list_workers(conn)
    events_since(conn, job_id, last_id)     logs_tail(conn, job_id, n)      logs_since(conn, job_id, last_id)
    artifact_files(job_id)                  open_artifact(job_id, name)     read_artifact(job_id, name)

Artifacts are addressed by (job id, name), and a name must be one the job's own listing returned, so no path a user
typed ever reaches the filesystem. Key layout and schemas: docs/redis.md.
"""
from __future__ import annotations

import json
import time
from typing import IO, Any

import redis

from worker import gang, keys
from worker.artifacts import ArtifactStore
from worker.defaults import LIST_LIMIT, STATUS_WAIT_CANCEL
from worker.errors import InvalidJobStateError, NoSuchJobError
from worker.presence import is_alive, list_workers
from worker.queues import discard_rq_job
from worker.status import FINAL_STATES, JobState, mark_final, parse_status, read_status, request_cancel
from worker.streaming import epoch_events, events_since, follow_logs, logs_since, logs_tail, wait_events
from core.events import EPOCH_METRICS
from worker.study import PRUNERS, SAMPLERS
from worker.submit import submit_job
from worker.sweeps import (
    SweepState,
    cancel_sweep,
    create_sweep,
    importances,
    list_sweeps,
    optuna_study,
    sweep_status,
    sweep_trials,
    trial_ended,
)

__all__ = [
    "JobState", "artifact_files", "cancel_job", "delete_job", "epoch_events", "events_since", "follow_logs",
    "job_nodes", "job_status", "list_jobs", "list_workers", "logs_since", "logs_tail", "open_artifact", "read_artifact",
    "retry_job", "submit_job", "wait_events",
    "EPOCH_METRICS", "PRUNERS", "SAMPLERS", "SweepState", "cancel_sweep", "create_sweep", "importances", "list_sweeps", "optuna_study", "sweep_status",
    "sweep_trials",
]

SUMMARY_EXCLUDE = ("config", "overrides", "log_tail", "dataset")
"""Bulky fields list_jobs leaves out (job_status has them)."""


def _derive(st: dict[str, Any]) -> dict[str, Any]:
    """Fields computed on read: a guaranteed set of keys, duration and ETA."""
    now = time.time()
    for key in ("state", "progress", "epoch", "epochs", "error", "artifacts", "best_val_acc", "worker",
                "submitted_at", "started_at", "ended_at"):
        st.setdefault(key, None)
    st["progress"] = float(st["progress"] or 0.0)
    st["epoch"] = int(st["epoch"] or 0)
    start, end = st.get("started_at"), st.get("ended_at")
    st["duration"] = round((end or now) - start, 1) if start else None
    st["eta"] = None
    if st["state"] == JobState.RUNNING.value and start and 0 < st["progress"] < 1:
        began = st.get("attempt_started_at") or start
        # progress made in this attempt only (a resumed attempt starts from its checkpoint's progress)
        base = (st.get("resumed_from") or 0) / st["epochs"] if st.get("epochs") else 0.0
        done = st["progress"] - base
        if done > 0:
            st["eta"] = round((now - began) * (1 - st["progress"]) / done, 1)
    st["final"] = st["state"] in {s.value for s in FINAL_STATES}
    return st


def job_nodes(conn: redis.Redis, job_id: str, st: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The nodes of a multi-node job, by node rank: `node_rank`, `worker`, `host`, `addr`, `ranks`, `global_ranks`,
    `state` (`reserved` while the gang gathers; then `starting`, `running`, `finished`, `failed`, `cancelled`,
    `lost`, `stopped`), `attempt`, `pid`, `exit_code`. Empty for a one-node job."""
    st = st if st is not None else (read_status(conn, job_id) or {})
    if int(st.get("num_nodes") or 1) <= 1:
        return []
    if st.get("state") in (JobState.QUEUED.value, JobState.RECOVERING.value):
        return [{"node_rank": None, "worker": name, "state": "reserved", "ranks": st.get("gpus")}
                for name in gang.members(conn, job_id)]
    out = [json.loads(v) for v in conn.hvals(keys.nodes(job_id))]
    attempt = int(st.get("attempt") or 0)
    known = {n.get("node_rank") for n in out if n.get("attempt") == attempt}
    for rank, name in enumerate(gang.gang_of(st)):  # a node that has not written its entry yet
        if rank not in known:
            out.append({"node_rank": rank, "worker": name, "state": "starting", "ranks": st.get("gpus"),
                        "attempt": attempt})
    return sorted((n for n in out if n.get("attempt") == attempt), key=lambda n: n.get("node_rank") or 0)


def job_status(conn: redis.Redis, job_id: str) -> dict[str, Any]:
    """The full status of one job (NoSuchJobError when unknown): at least state, progress, epoch, epochs, error,
    artifacts, best_val_acc, worker, submitted_at/started_at/ended_at (unix seconds), duration, eta, config."""
    st = read_status(conn, job_id)
    if st is None:
        raise NoSuchJobError(f"no such job {job_id!r}")
    st = _derive(st)
    st["nodes"] = job_nodes(conn, job_id, st)
    if st["state"] == JobState.RUNNING.value and st.get("worker"):
        st["worker_alive"] = is_alive(conn, st["worker"])
    return st


def list_jobs(
    conn: redis.Redis, states: set[str] | None = None, *, limit: int = LIST_LIMIT, with_config: bool = False
) -> list[dict[str, Any]]:
    """Jobs, newest first, optionally only those in `states`."""
    ids = [i.decode() for i in conn.zrevrange(keys.jobs_index(), 0, max(0, limit - 1))]
    if not ids:
        return []
    with conn.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        raws = pipe.execute()
    out = []
    for job_id, raw in zip(ids, raws):
        if not raw:
            continue
        st = _derive(parse_status(raw))
        if states and st["state"] not in states:
            continue
        if not with_config:
            for k in SUMMARY_EXCLUDE:
                st.pop(k, None)
        out.append(st)
    return out


def cancel_job(conn: redis.Redis, job_id: str, *, wait: float = 0.0) -> str:
    """Cancel a queued, recovering or running job; returns the state it is in afterwards.

    A waiting job is cancelled at once (its RQ entry removed). A running one is stopped by its worker (SIGTERM to
    every rank, SIGKILL after a grace period); `wait` seconds are spent waiting for that. A running job whose
    worker is dead is cancelled directly. A job already final is left as it is.
    """
    result = request_cancel(conn, job_id)
    if result == "missing":
        raise NoSuchJobError(f"no such job {job_id!r}")
    st = read_status(conn, job_id) or {}
    if int(st.get("num_nodes") or 1) > 1:
        gang.discard(conn, job_id)  # out of the gangs ZSET, every reservation for it released
    if result == "cancelled":
        discard_rq_job(conn, st.get("rq_job"))
        if st.get("sweep"):
            trial_ended(conn, st["sweep"], wait=0)  # no worker ends it: its sweep learns now (or at the next scan)
        return JobState.CANCELLED.value
    if result != "requested":
        return result
    owner = st.get("worker") or ""
    if not is_alive(conn, owner):
        mark_final(conn, job_id, owner, JobState.CANCELLED, {"error": "cancelled (its worker was gone)"})
        discard_rq_job(conn, st.get("rq_job"))
        if st.get("sweep"):
            trial_ended(conn, st["sweep"], wait=0)
        return (read_status(conn, job_id) or {}).get("state", "missing")
    deadline = time.monotonic() + wait
    state = JobState.RUNNING.value
    while time.monotonic() < deadline:
        state = (read_status(conn, job_id) or {}).get("state", "missing")
        if state in {s.value for s in FINAL_STATES}:
            return state
        time.sleep(0.2)
    return state


def retry_job(conn: redis.Redis, job_id: str, *, store: ArtifactStore | None = None) -> str:
    """Submit a finished, failed or cancelled job again (same config, GPUs, priority, stored dataset): new job id."""
    st = read_status(conn, job_id)
    if st is None:
        raise NoSuchJobError(f"no such job {job_id!r}")
    if st.get("state") not in {s.value for s in FINAL_STATES}:
        raise InvalidJobStateError(f"job {job_id} is {st.get('state')}; only a finished, failed or cancelled job can "
                                   "be retried")
    new_id = submit_job(st["config"], connection=conn, gpus=int(st.get("gpus") or 1),
                        nodes=int(st.get("num_nodes") or 1), priority=st.get("priority") or "default", store=store, allow_local_paths=True,
                        timeout=st.get("timeout"), name=st.get("name"))
    conn.hset(keys.job(new_id), "retried_from", job_id)
    return new_id


def delete_job(conn: redis.Redis, job_id: str, *, store: ArtifactStore | None = None,
               wait: float = STATUS_WAIT_CANCEL) -> None:
    """Remove a job everywhere: its keys, its RQ records and its artifacts. A job still running is cancelled first
    (InvalidJobStateError when it does not stop within `wait` seconds)."""
    st = read_status(conn, job_id)
    if st is None:
        raise NoSuchJobError(f"no such job {job_id!r}")
    if st.get("state") not in {s.value for s in FINAL_STATES}:
        state = cancel_job(conn, job_id, wait=wait)
        if state not in {s.value for s in FINAL_STATES}:
            raise InvalidJobStateError(f"job {job_id} is still {state}; try again once it has stopped")
    nodes = int(st.get("num_nodes") or 1)
    for attempt in range(int(st.get("attempt") or 0) + 1):
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


def artifact_files(job_id: str, *, store: ArtifactStore | None = None) -> list[str]:
    """Every file of the job's run folder (relative names, the only names open_artifact accepts)."""
    return (store or ArtifactStore()).list_files(job_id)


def open_artifact(job_id: str, name: str, *, store: ArtifactStore | None = None) -> IO[bytes]:
    """Open a file of the job's run folder: `name` from artifact_files, or a short name (onnx, int8, pt, bundle,
    report, labels, config, metrics, log)."""
    return (store or ArtifactStore()).open(job_id, name)


def read_artifact(job_id: str, name: str, *, store: ArtifactStore | None = None) -> bytes:
    """The bytes of one artifact (what a download button serves)."""
    return (store or ArtifactStore()).read_bytes(job_id, name)
