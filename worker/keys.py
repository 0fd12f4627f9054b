"""The Redis key layout (documented in docs/redis.md). Every key this project writes is built here.

Job ids are validated before they become part of a key or a path, so a typed id can never address anything else.
"""
from __future__ import annotations

import re
import secrets
import time

from worker.defaults import DATASET_NAME_PATTERN, KEY_PREFIX, MAX_GPUS_PER_JOB, PRIORITIES, QUEUE_PREFIX
from worker.errors import DatasetError, ModelError, NoSuchJobError

JOB_ID_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}\Z")
WORKER_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}\Z")
DATASET_NAME_RE = re.compile(rf"^{DATASET_NAME_PATTERN}\Z")


def new_job_id() -> str:
    """Time-sortable, URL- and path-safe id, e.g. `20250101-120000-3fa9c2`."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def check_job_id(job_id: str) -> str:
    """The id itself if well-formed, else NoSuchJobError: ids come from users (CLI, URLs) and end up in paths."""
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise NoSuchJobError(f"no such job {job_id!r} (job ids look like 20250101-120000-3fa9c2)")
    return job_id


def check_worker_name(name: str) -> str:
    """The name itself if it can be part of a key (letters, digits, `_.-`), else ValueError."""
    if not WORKER_NAME_RE.match(name):
        raise ValueError(f"invalid worker name {name!r}")
    return name


def _key(*parts: str) -> str:
    """`trainer:<part>:<part>...`: every key below is one of these (the queue names have their own prefix)."""
    return ":".join((KEY_PREFIX, *parts))


def _job_key(job_id: str, *parts: str) -> str:
    """A key of one job, `trainer:job:<checked id>[:<part>...]`."""
    return _key("job", check_job_id(job_id), *parts)


def jobs_index() -> str:
    """ZSET job id → submission time (unix seconds): every job, for listing."""
    return _key("jobs")


def running_set() -> str:
    """SET of job ids in state running: what the recovery scan checks."""
    return _key("running")


def recovering_set() -> str:
    """SET of job ids in state recovering: a re-queue that was claimed but never enqueued is healed from it."""
    return _key("recovering")


def job(job_id: str) -> str:
    """HASH: the job's status (state, progress, epoch, ..., config JSON). See docs/redis.md."""
    return _job_key(job_id)


def events(job_id: str) -> str:
    """STREAM of core's events for the job: fields `type` and `data` (JSON)."""
    return _job_key(job_id, "events")


def epochs_seen(job_id: str) -> str:
    """SET of epoch numbers already in the event stream (idempotency across resumes)."""
    return _job_key(job_id, "epochs")


def logs(job_id: str) -> str:
    """STREAM of stdout/stderr lines of every rank plus the worker's own notes: fields `line`, `src`."""
    return _job_key(job_id, "logs")


def heal_lock(job_id: str) -> str:
    """STRING with a TTL: one worker at a time re-enqueues a recovery whose enqueue was lost."""
    return _job_key(job_id, "heal")


def gang(job_id: str) -> str:
    """HASH worker name → reservation time (unix s): the workers reserved for a multi-node job's next attempt."""
    return _job_key(job_id, "gang")


def nodes(job_id: str) -> str:
    """HASH node rank → JSON {worker, host, addr, ranks, state, attempt}: the nodes of a multi-node job's attempt."""
    return _job_key(job_id, "nodes")


def job_keys(job_id: str) -> list[str]:
    """Every key of one job (what delete removes)."""
    return [job(job_id), events(job_id), epochs_seen(job_id), logs(job_id), heal_lock(job_id), gang(job_id),
            nodes(job_id)]


def gangs() -> str:
    """ZSET of multi-node job ids waiting for their gang, scored by priority, then submission time (lowest first)."""
    return _key("gangs")


def reservations() -> str:
    """HASH worker name → the multi-node job id it is reserved for (a worker holds at most one reservation)."""
    return _key("reservations")


def workers_set() -> str:
    """SET of worker names that advertised themselves; stale names are pruned when their hash is gone."""
    return _key("workers")


def worker(name: str) -> str:
    """HASH with a TTL: a live worker's advertisement (host, GPUs, state, current job, heartbeat)."""
    return _key("worker", check_worker_name(name))


def queue_name(gpus: int, priority: str) -> str:
    """RQ queue for jobs needing `gpus` devices (or CPU ranks) at `priority`."""
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; choose from {', '.join(PRIORITIES)}")
    if not 1 <= gpus <= MAX_GPUS_PER_JOB:
        raise ValueError(f"gpus must be between 1 and {MAX_GPUS_PER_JOB}, got {gpus}")
    return f"{QUEUE_PREFIX}:g{gpus}:{priority}"


def queues_for_slots(slots: int) -> list[str]:
    """Queues a worker with `slots` devices listens to, in serving order: priority first, then bigger jobs first."""
    slots = max(1, min(slots, MAX_GPUS_PER_JOB))
    return [queue_name(g, p) for p in PRIORITIES for g in range(slots, 0, -1)]


def node_queue(worker_name: str) -> str:
    """A worker's private RQ queue: it enqueues its own node of a multi-node job there and dequeues it at once."""
    return f"{QUEUE_PREFIX}:node:{check_worker_name(worker_name)}"


def rq_node_job_id(job_id: str, attempt: int, node_rank: int) -> str:
    """RQ's id for one node of one attempt of a multi-node job."""
    return f"{check_job_id(job_id)}_a{attempt}_n{node_rank}"


def rq_job_id(job_id: str, attempt: int) -> str:
    """RQ's id for one attempt: the job id itself first, `{id}_r{n}` after the n-th recovery (RQ ids: [A-Za-z0-9_-]).

    A fresh RQ id per attempt keeps the dead attempt's RQ bookkeeping from ever touching the live one.
    """
    return job_id if attempt == 0 else f"{job_id}_r{attempt}"


# ----------------------------------------------------------------------------------------------------------- sweeps
def check_sweep_id(sweep_id: str) -> str:
    """The id itself if well-formed (same shape as a job id), else NoSuchSweepError."""
    from worker.errors import NoSuchSweepError

    if not isinstance(sweep_id, str) or not JOB_ID_RE.match(sweep_id):
        raise NoSuchSweepError(f"no such sweep {sweep_id!r} (sweep ids look like 20250101-120000-3fa9c2)")
    return sweep_id


def _sweep_key(sweep_id: str, *parts: str) -> str:
    """A key of one sweep, `trainer:sweep:<checked id>[:<part>...]`."""
    return _key("sweep", check_sweep_id(sweep_id), *parts)


def sweeps_index() -> str:
    """ZSET sweep id → creation time (unix seconds): every sweep, for listing."""
    return _key("sweeps")


def active_sweeps() -> str:
    """SET of ids of sweeps still running: what every worker's sweep scan advances."""
    return _key("sweeps", "active")


def sweep(sweep_id: str) -> str:
    """HASH: the sweep's record (settings, base config, space, state, counts, best trial). See docs/sweeps.md."""
    return _sweep_key(sweep_id)


def sweep_trials(sweep_id: str) -> str:
    """HASH trial number → job id: the job that runs each trial the sweep asked Optuna for."""
    return _sweep_key(sweep_id, "trials")


def sweep_lock(sweep_id: str) -> str:
    """STRING with a TTL: held while one process tells Optuna, asks for trials and enqueues them."""
    return _sweep_key(sweep_id, "lock")


def sweep_journal(sweep_id: str) -> str:
    """Key prefix of the sweep's Optuna journal (`<prefix>:log_number`, `<prefix>:log:<n>`)."""
    return _sweep_key(sweep_id, "optuna")


# --------------------------------------------------------------------------------------------------------- datasets
def _check_name(name: str, what: str, error: type[Exception], example: str) -> str:
    """`name` if it follows DATASET_NAME_PATTERN (datasets, models and aliases share the rule), else `error`."""
    if not isinstance(name, str) or not DATASET_NAME_RE.match(name):
        raise error(f"invalid {what} {name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-', starting with a "
                    f"letter or digit (e.g. {example})")
    return name


def check_dataset_name(name: str) -> str:
    """The name itself if it is a valid dataset name (DATASET_NAME_PATTERN), else DatasetError saying the rule."""
    return _check_name(name, "dataset name", DatasetError, "flowers-2024")


def _dataset_key(name: str, *parts: str) -> str:
    """A key of one registered dataset, `trainer:dataset:<checked name>[:<part>...]`."""
    return _key("dataset", check_dataset_name(name), *parts)


def datasets_index() -> str:
    """ZSET dataset name → creation time of its first version (unix seconds): every registered dataset."""
    return _key("datasets")


def dataset_versions(name: str) -> str:
    """HASH version number → JSON of that version (source, hash, classes, counts, report, ...): written once."""
    return _dataset_key(name)


def dataset_seq(name: str) -> str:
    """STRING: the last version number handed out for the name (kept after removals: numbers are never reused)."""
    return _dataset_key(name, "seq")


def dataset_jobs(name: str, version: int) -> str:
    """ZSET job id → submission time: the jobs submitted on one version."""
    return _dataset_key(name, str(int(version)), "jobs")


def dataset_prepared(name: str, version: int) -> str:
    """HASH form key → JSON: one version's prepared forms (shards), written by whoever prepares them."""
    return _dataset_key(name, str(int(version)), "prepared")


def dataset_prepare_lock(name: str, version: int, form: str) -> str:
    """STRING (a redis-py Lock, with expiry): held by the one worker preparing form `form` (e.g. 224-RGB)."""
    return _dataset_key(name, str(int(version)), "prepare-lock", form)


def gc_claim(scope: str) -> str:
    """STRING with a TTL of GC_INTERVAL: the retention policy ran for this scope (a store id, or a store id and a
    machine) and runs again when it expires (worker/retention.py)."""
    return _key("gc", scope)


# ----------------------------------------------------------------------------------------------------------- models
def check_model_name(name: str, what: str = "model name") -> str:
    """The name itself if valid (the dataset name rule, DATASET_NAME_PATTERN: also for aliases), else ModelError."""
    return _check_name(name, what, ModelError, "flowers-classifier")


def _model_key(name: str, *parts: str) -> str:
    return _key("model", check_model_name(name), *parts)


def models_index() -> str:
    """ZSET model name → creation time of its first version: every registered model."""
    return _key("models")


def model_versions(name: str) -> str:
    """HASH version number → JSON of that version (job, dataset, files, metrics, deploy choice): written once."""
    return _model_key(name)


def model_seq(name: str) -> str:
    """STRING: the last version number handed out (kept after removals: numbers are never reused)."""
    return _model_key(name, "seq")


def model_aliases(name: str) -> str:
    """HASH alias → version number (`production`, `staging`, any name)."""
    return _model_key(name, "aliases")


# ---------------------------------------------------------------------------------------------------- notifications
def hooks() -> str:
    """HASH hook id → JSON {id, url, events, secret, created_at} (worker/notify.py)."""
    return _key("hooks")


def hook_log(hook_id: str) -> str:
    """STREAM of one hook's delivery attempts (field `entry`: JSON), capped."""
    return _key("hook", hook_id, "log")


def notify_events() -> str:
    """STREAM of events waiting for delivery (fields `event`, `data`), read by the workers' consumer group."""
    return _key("notify", "events")


# ------------------------------------------------------------------------------------------------------ deployments
def deployments() -> str:
    """ZSET deployment id → creation time: every deployment listed (stopped ones until their record expires)."""
    return _key("deployments")


def deployments_active() -> str:
    """SET of the deployment ids the workers tend (neither stopped nor failed past the grace period)."""
    return _key("deployments", "active")


def deployment(dep_id: str) -> str:
    """STRING: JSON of one deployment (worker/deployments.py `Deployment`: ref, replicas, batching, state)."""
    return _key("deployment", dep_id)


def deployment_tokens(dep_id: str) -> str:
    """HASH `user` → SHA-256 hex of the users' bearer token, `internal` → the dashboard's token ("" when revoked)."""
    return _key("deployment", dep_id, "tokens")


def deployment_hosts(dep_id: str) -> str:
    """HASH replica index → JSON {worker, state, url, pid, version_ref, error, since}: who serves each replica."""
    return _key("deployment", dep_id, "hosts")


# ------------------------------------------------------------------------------------------------- users and audit
def users() -> str:
    """HASH user name → JSON of worker/users.py `User` (role, e-mail, limits, token hash, created_at)."""
    return _key("users")


def user_tokens() -> str:
    """HASH sha256 of a user's token → user name: how a CLI or dashboard token finds its user (tokens are not kept)."""
    return _key("user-tokens")


def user_submit_lock(name: str) -> str:
    """STRING (redis-py Lock, USER_SUBMIT_LOCK_TTL): held while one submission of a user with limits counts their
    active jobs and enqueues, so concurrent submissions cannot all pass the same count (worker/submit.py)."""
    return _key("user", name, "submit-lock")


def audit() -> str:
    """STREAM of the audit log (field `entry`: JSON of worker/audit.py `AuditEntry`), capped at AUDIT_MAXLEN."""
    return _key("audit")


def sign_in_failures(subject: str) -> str:
    """HASH {failures, until} of wrong sign-in tries by one subject (`addr:IP` or `session:ID`; worker/signin.py),
    expiring SIGN_IN_WINDOW seconds after the last failure."""
    return _key("signin", subject)
