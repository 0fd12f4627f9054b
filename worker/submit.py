"""Submission: the one function the CLI and the dashboard both call. Everything is checked before anything is
written; a refused job leaves no trace in Redis or the queue.

GPU semantics: `gpus=N` asks for N devices on one worker: N GPUs on a GPU worker, N gloo ranks on a CPU-only worker
(which advertises `slots`, default min(CPU count, 8)). A job asking more than the largest live worker has is refused;
when no worker is alive at all the job is accepted and waits (its status says what it waits for), because workers
are often started after the jobs (`honcho start`, tests, autoscaling).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from worker import audit, datasets, gang, keys, users
from worker.artifacts import DATASET_REF_PREFIX, ArtifactStore
from worker.connection import check
from worker.defaults import (
    JOB_TIME_LIMIT_ENV,
    JOB_TIME_LIMIT_HOURS,
    MAX_GPUS_PER_JOB,
    MAX_NODES_PER_JOB,
    PRIORITIES,
    USER_SUBMIT_LOCK_TTL,
    USER_SUBMIT_LOCK_WAIT,
)
from worker.diskspace import low_disk
from worker.errors import ArtifactError, PermissionDeniedError, SubmissionError
from worker.hashcodec import decode_reply
from worker.presence import list_workers, max_live_slots
from worker.queues import enqueue_attempt
from worker.record import JobRecord
from worker.states import ACTIVE_STATES, JobState


@dataclasses.dataclass(frozen=True)
class Submitted:
    """What submission decided."""

    job_id: str
    waiting: str | None = None
    """What the job waits for when no worker was alive to run it (its status says the same); None otherwise."""


def validate_config(config: dict[str, Any] | str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The resolved config as a plain dict (every default filled in); SubmissionError naming key and value."""
    from core.config import config_from_dict, load_yaml
    from core.errors import ConfigError

    try:
        raw = load_yaml(config) if isinstance(config, (str, Path)) else config
        return config_from_dict(raw, list(overrides or [])).to_dict()
    except ConfigError as err:
        raise SubmissionError(str(err), err.errors) from None


def check_dataset(path: str | Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """core's dataset health report (without thumbnails); SubmissionError with its reason when unusable."""
    from core.data import inspect_dataset
    from core.errors import DataError

    try:
        report = inspect_dataset(path, color_mode=cfg["data"]["color_mode"],
                                 max_image_pixels=cfg["data"]["max_image_pixels"], thumbnails_per_class=0)
    except DataError as err:
        raise SubmissionError.on("dataset", str(path), str(err)) from None
    return {k: v for k, v in report.items() if k != "thumbnails"}


def train_images(cfg: dict[str, Any], report: dict[str, Any] | None = None) -> int | None:
    """About how many images the train split will hold (None when unknown, e.g. a stored dataset being retried)."""
    data = cfg["data"]
    frac = data["split"][0]
    if data["name"] == "imagefolder":
        if report is None:
            return None
        by_split = report.get("counts_by_split") or {}
        if "train" in by_split:  # a pre-split tree keeps its own train/ folder
            return int(sum(by_split["train"].values()))
        return math.ceil(int(report.get("num_images") or 0) * frac)
    from core.data.builtin import expected_train_images

    return expected_train_images(data)


def check_batch_size(cfg: dict[str, Any], n_train: int | None, gpus: int) -> None:
    """Refuse a per-rank batch larger than each rank's share of the train split (it would train on one short batch
    per epoch, or on nothing at all)."""
    if n_train is None:
        return
    per_rank = n_train // max(gpus, 1)
    batch = int(cfg["train"]["batch_size"])
    if batch > per_rank:
        ranks = f" over {gpus} ranks" if gpus > 1 else ""
        raise SubmissionError.on(
            "train.batch_size", batch, f"{batch} is larger than the train split (about {n_train} images{ranks}, "
            f"{per_rank} per rank); use at most {max(per_rank, 1)}, or a bigger dataset"
        )


def check_gpus(conn: redis.Redis, gpus: int) -> str | None:
    """None when a live worker can run `gpus` devices; a waiting note when no worker is alive; else refuse."""
    if not isinstance(gpus, int) or isinstance(gpus, bool) or not 1 <= gpus <= MAX_GPUS_PER_JOB:
        raise SubmissionError.on("gpus", gpus, f"must be a whole number from 1 to {MAX_GPUS_PER_JOB}, got {gpus!r}")
    largest, workers = max_live_slots(conn)
    if not workers:
        return f"waiting for a worker with at least {gpus} GPU(s) or CPU slot(s); none is running"
    if gpus > largest:
        best = max(workers, key=lambda w: w.get("slots") or 0)
        raise SubmissionError.on(
            "gpus", gpus, f"no live worker can run {gpus} device(s); the largest has {largest} "
            f"({best.get('kind')} worker {best.get('name')} on {best.get('hostname')}). "
            f"Ask for at most {largest}, or start a bigger worker: python -m worker run --gpus 0,1,..."
        )
    return None


def check_nodes(conn: redis.Redis, nodes: int, gpus: int) -> str | None:
    """None for a one-node job; for N > 1 nodes the waiting note, or refuse when fewer than N live workers could
    each host a node of `gpus` devices."""
    if not isinstance(nodes, int) or isinstance(nodes, bool) or not 1 <= nodes <= MAX_NODES_PER_JOB:
        raise SubmissionError.on("nodes", nodes,
                                 f"must be a whole number from 1 to {MAX_NODES_PER_JOB}, got {nodes!r}")
    if nodes == 1:
        return None
    able = [w for w in list_workers(conn) if (w.get("slots") or 0) >= gpus]
    if len(able) < nodes:
        names = ", ".join(f"{w['name']} ({w.get('slots')} slot(s))" for w in able) or "none"
        raise SubmissionError.on(
            "nodes", nodes, f"{nodes} nodes of {gpus} GPU(s) or CPU slot(s) each need {nodes} live workers that can "
            f"each host {gpus}; {len(able)} can ({names}). Start more workers (python -m worker run on each machine), "
            f"or ask for fewer nodes"
        )
    return gang.waiting_note(0, nodes)


def resolve_dataset(
    cfg: dict[str, Any], *, dataset_path: str | Path | None, store: ArtifactStore, allow_local_paths: bool, gpus: int
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Check and upload a local dataset (its `data.path` in `cfg` becomes the stored `artifact:` reference), or check
    that a stored one exists. Returns (the job's `dataset` field, the dataset's health report when one was made)."""
    data_path = cfg["data"].get("path")
    if cfg["data"].get("dataset"):  # registered: submit_job pins it per job (worker/datasets.resolve_for_job)
        return None, None
    if data_path and str(data_path).startswith(DATASET_REF_PREFIX):
        try:  # a clone/retry of a stored job: the dataset is already in the store
            if not store.exists(str(data_path).removeprefix(DATASET_REF_PREFIX)):
                raise SubmissionError.on("data.path", data_path,
                                         f"{data_path} is not in the artifact store {store.url}")
        except ArtifactError as err:
            raise SubmissionError.on("data.path", data_path, str(err)) from None
        return {"ref": data_path}, None
    if cfg["data"]["name"] == "imagefolder":
        if dataset_path is None and not allow_local_paths:
            raise SubmissionError.on("data.path", data_path,
                                     "a local path is not accepted here; upload the dataset as a .zip")
        report = check_dataset(data_path, cfg)
        check_batch_size(cfg, train_images(cfg, report), gpus)  # before the upload: a refusal writes nothing
        try:
            dataset = {**store.upload_dataset(data_path), "classes": report.get("classes"),
                       "counts": report.get("counts"), "warnings": report.get("warnings", [])}
        except ArtifactError as err:
            raise SubmissionError.on("dataset upload", str(data_path), str(err)) from None
        cfg["data"]["path"] = dataset["ref"]
        return dataset, report
    if data_path and not allow_local_paths:
        raise SubmissionError.on("data.path", data_path,
                                 f"{cfg['data']['name']} reads its files on the worker; leave data.path empty")
    return None, None


def active_usage(conn: redis.Redis, owner: str) -> tuple[int, int]:
    """(jobs, GPUs) of `owner`'s queued, running and recovering jobs (a job's GPUs: gpus × nodes). Reads every job's
    owner and state in one round trip (jobs made before users belong to the operator)."""
    ids = [decode_reply(i) for i in conn.zrange(keys.jobs_index(), 0, -1)]
    jobs = devices = 0
    for record in JobRecord.fetch_many(conn, ids, "owner", "gpus", "num_nodes").values():
        if record is None or record.state not in ACTIVE_STATES or record.get("owner", users.OPERATOR) != owner:
            continue
        jobs += 1
        devices += record.gpus * record.num_nodes
    return jobs, devices


def check_limits(conn: redis.Redis, actor: users.Actor, *, jobs: int, gpus: int, priority: str) -> None:
    """The actor's per-user limits (users.effective_limits) for `jobs` more jobs of `gpus` GPUs in all at `priority`:
    PermissionDeniedError naming the limit, the use now and who can change it; nothing is enqueued."""
    if actor.is_system:
        return
    limits = users.effective_limits(actor)
    change = f"an admin can change it: python -m worker user limits {actor.name}"
    if priority == "high" and not limits.high_priority:
        raise PermissionDeniedError(f"{actor.name} ({actor.role.value}) may not submit with priority high: only admins "
                                    f"and users allowed high priority may ({change} --high-priority); use default")
    if limits.max_active_jobs is None and limits.max_gpus is None:
        return
    active, used = active_usage(conn, actor.name)
    if limits.max_active_jobs is not None and active + jobs > limits.max_active_jobs:
        raise PermissionDeniedError(
            f"{actor.name} may have at most {limits.max_active_jobs} job(s) queued or running at once and has {active}"
            f"; this needs {jobs} more. Wait for one to end or cancel one ({change} --max-jobs N)")
    if limits.max_gpus is not None and used + gpus > limits.max_gpus:
        raise PermissionDeniedError(
            f"{actor.name} may use at most {limits.max_gpus} GPU(s) in queued and running jobs and uses {used}; "
            f"this asks for {gpus} more. Ask for fewer, or wait for a job to end ({change} --max-gpus G)")


@contextlib.contextmanager
def limits_held(conn: redis.Redis, actor: users.Actor, *, jobs: int, gpus: int, priority: str) -> Iterator[None]:
    """`check_limits`, still true when the block (the enqueue) ends: for a user with jobs or GPUs to count, the count
    and the block run under the user's submission lock, so concurrent submissions cannot all pass the same count."""
    limits = None if actor.is_system else users.effective_limits(actor)
    if limits is None or (limits.max_active_jobs is None and limits.max_gpus is None):
        check_limits(conn, actor, jobs=jobs, gpus=gpus, priority=priority)
        yield
        return
    lock = conn.lock(keys.user_submit_lock(actor.name), timeout=USER_SUBMIT_LOCK_TTL,
                     blocking_timeout=USER_SUBMIT_LOCK_WAIT)
    if not lock.acquire():
        raise SubmissionError(f"another submission of {actor.name}'s has been counting their jobs for "
                              f"{USER_SUBMIT_LOCK_WAIT:.0f} s; nothing was enqueued: try again")
    try:
        check_limits(conn, actor, jobs=jobs, gpus=gpus, priority=priority)
        yield
    finally:
        with contextlib.suppress(redis.exceptions.LockError):  # expired meanwhile: nothing left to release
            lock.release()


@dataclasses.dataclass(frozen=True)
class Checked:
    """A request that passed submission's own checks (`check_request`): a job's, or a sweep's base config, so both
    are refused alike."""

    config: dict[str, Any]
    """The resolved config, every default filled in."""
    overrides: list[str]
    """The caller's `dotted.key=value` overrides, then the two that point the config at `dataset_path`."""
    name: str
    """The name asked for, or the default: `<model> on <dataset>`."""
    waiting: str | None
    """What the job waits for when no worker is alive to run it (check_gpus, check_nodes); None otherwise."""


def default_time_limit() -> float | None:
    """Seconds a job may train when its config sets no `train.time_limit`: env JOB_TIME_LIMIT_HOURS (0: none), else
    JOB_TIME_LIMIT_HOURS."""
    raw = os.environ.get(JOB_TIME_LIMIT_ENV, "").strip()
    try:
        hours = float(raw) if raw else JOB_TIME_LIMIT_HOURS
    except ValueError:
        raise SubmissionError.on("timeout", raw, f"{JOB_TIME_LIMIT_ENV} must be a number of hours, got {raw!r}"
                                 ) from None
    return hours * 3600.0 if hours > 0 else None


def check_request(
    config: dict[str, Any] | str | Path,
    overrides: list[str] | None = None,
    *,
    connection: redis.Redis,
    gpus: int,
    nodes: int = 1,
    priority: str,
    dataset_path: str | Path | None = None,
    timeout: float | None = None,
    name: str | None = None,
    actor: users.Actor | None = None,
) -> Checked:
    """The checks that need neither the dataset nor the artifact store, in the order a user hears of them: the
    priority, the timeout, the config (with `dataset_path` as overrides), Redis, the GPUs and nodes asked for against
    the live workers, then (given an `actor`) their role and per-user limits. SubmissionError (RedisUnavailableError,
    PermissionDeniedError) on the first that fails: the dashboard runs them before it registers an upload, so a refused
    form leaves nothing behind."""
    if priority not in PRIORITIES:
        raise SubmissionError.on("priority", priority, f"unknown {priority!r}; choose from {', '.join(PRIORITIES)}")
    if timeout is not None and not timeout > 0:
        raise SubmissionError.on("timeout", timeout, f"must be a positive number of seconds, got {timeout!r}")
    overrides = list(overrides or [])
    if dataset_path is not None:
        overrides += ["data.name=imagefolder", f"data.path={Path(dataset_path)}"]
    cfg = validate_config(config, overrides)
    if not cfg["train"].get("time_limit") and default_time_limit():
        cfg["train"]["time_limit"] = default_time_limit()  # no job runs forever unless the operator says so
    check(connection)
    waiting = check_gpus(connection, gpus)
    waiting = check_nodes(connection, nodes, gpus) or waiting
    if actor is not None:  # (submit_job makes these two checks itself, with the actor it resolved)
        actor = audit.authorize(connection, actor, users.Action.SUBMIT, "submit jobs")
        check_limits(connection, actor, jobs=1, gpus=gpus * nodes, priority=priority)
    return Checked(cfg, overrides, name or f"{cfg['model']['name']} on {cfg['data']['name']}", waiting)


def submit_job(
    config: dict[str, Any] | str | Path,
    overrides: list[str] | None = None,
    *,
    connection: redis.Redis,
    gpus: int = 1,
    nodes: int = 1,
    priority: str = "default",
    dataset_path: str | Path | None = None,
    store: ArtifactStore | None = None,
    allow_local_paths: bool = False,
    timeout: float | None = None,
    name: str | None = None,
    extra: dict[str, Any] | None = None,
    actor: users.Actor | None = None,
) -> Submitted:
    """Validate, upload the dataset if local, enqueue; returns the job id and whether it waits for a worker.
    SubmissionError: nothing was enqueued.

    config: a dict (dashboard) or a YAML path (CLI); overrides: `dotted.key=value` strings.
    dataset_path: an uploaded zip/folder the *program* saved (the dashboard's upload); it becomes data.path.
    allow_local_paths: accept a `data.path` from the config itself (the CLI: the user's own machine). The dashboard
        leaves it False, so no path a browser user typed is ever read from this machine's disk.
    nodes: workers the job spans (N > 1: one DDP job of N × gpus ranks, gang-scheduled; see worker/gang.py).
    timeout: wall-clock seconds for the whole job (the worker fails it as timed out); default: none, or
        train.time_limit + 300 s when that is set (core enforces time_limit itself; this is the backstop).
    extra: more status fields, typed (a sweep's trial: `sweep`, `trial`, `params`; a retry: `retried_from`).
    actor: who submits (README "Users and roles"); the job's `owner`. PermissionDeniedError (nothing enqueued) for a
        viewer, or past the actor's per-user limits (jobs, GPUs, priority high).
    """
    actor = audit.authorize(connection, actor, users.Action.SUBMIT, "submit jobs")
    checked = check_request(config, overrides, connection=connection, gpus=gpus, nodes=nodes, priority=priority,
                            dataset_path=dataset_path, timeout=timeout, name=name)
    cfg = checked.config
    store = store or ArtifactStore()
    ranks = gpus * nodes
    check_limits(connection, actor, jobs=1, gpus=ranks, priority=priority)
    full = low_disk(store)  # before any upload, extraction or enqueue
    if full:
        raise SubmissionError(full)

    if cfg["data"]["name"] != "imagefolder":
        check_batch_size(cfg, train_images(cfg), ranks)
    registered = datasets.resolve_for_job(connection, cfg) if cfg["data"].get("dataset") else None
    if registered is not None:  # a registered dataset (worker/datasets): pinned to its version, nothing uploaded
        check_batch_size(cfg, train_images(cfg, registered.report), ranks)
        dataset = datasets.job_field(registered)
    else:
        dataset, _ = resolve_dataset(cfg, dataset_path=dataset_path, store=store,
                                     allow_local_paths=allow_local_paths, gpus=ranks)

    if timeout is None and cfg["train"].get("time_limit"):
        timeout = float(cfg["train"]["time_limit"]) + 300.0

    job_id = keys.new_job_id()
    now = time.time()
    fields = {
        "id": job_id,
        "state": JobState.QUEUED,
        "name": checked.name,
        "config": cfg,
        "overrides": checked.overrides,
        "dataset": dataset,
        "gpus": gpus,
        "num_nodes": nodes,
        "priority": priority,
        "queue": keys.queue_name(gpus, priority) if nodes == 1 else keys.gangs(),
        "submitted_at": now,
        "updated_at": now,
        "attempt": 0,
        "recoveries": 0,
        "progress": 0.0,
        "epoch": 0,
        "epochs": cfg["train"]["epochs"],
        "timeout": timeout,
        "rq_job": keys.rq_job_id(job_id, 0),
        "waiting": checked.waiting,
        "artifacts": {"run": store.uri(store.run_key(job_id))},
        "owner": actor.name,
        **(extra or {}),
    }
    with (
        limits_held(connection, actor, jobs=1, gpus=ranks, priority=priority),  # still true when the job lands
        connection.pipeline() as pipe,  # MULTI/EXEC: the status hash, the index and the RQ job land together
    ):
        pipe.multi()  # explicitly: RQ's enqueue joins a transaction only when it is already open
        JobRecord.create(pipe, fields)
        pipe.zadd(keys.jobs_index(), {job_id: now})
        if registered is not None:
            datasets.record_job(pipe, registered, job_id, now)
        if nodes == 1:
            enqueue_attempt(connection, job_id, gpus=gpus, priority=priority, attempt=0, pipeline=pipe)
        else:  # a multi-node job waits for its gang (worker/gang.py), not in an RQ queue
            pipe.zadd(keys.gangs(), {job_id: gang.score(priority, now)})
        pipe.execute()
    if not actor.is_system:
        audit.record(connection, actor, audit.AuditAction.JOB_SUBMIT, job_id, name=checked.name, gpus=gpus,
                     nodes=nodes, priority=priority, **{k: v for k, v in (extra or {}).items() if k == "retried_from"})
    return Submitted(job_id, checked.waiting)
