"""Every tunable constant of the worker package, in one place. Environment variables override a few (named below)."""
from __future__ import annotations

from core.data.defaults import REPO_ROOT, VAR_DIR  # noqa: F401 - defined once, in core (training uses them too)

# REPO_ROOT: relative default paths (VAR_DIR, ARTIFACTS_DIR) are resolved against it, not the working directory.
# VAR_DIR: local state folder (embedded Redis data, caches), relative to REPO_ROOT; env TRAINER_VAR_DIR overrides.

ARTIFACTS_DIR = f"{VAR_DIR}/artifacts"
"""Default artifact store (a folder relative to REPO_ROOT); env ARTIFACTS_DIR overrides with a path or fsspec URL."""

ARTIFACTS_DIR_ENV = "ARTIFACTS_DIR"
"""Environment variable naming the artifact store (read only by `worker.artifacts.store_url`)."""

REDIS_HOST = "127.0.0.1"
"""Interface the embedded Redis binds to: loopback only, never a public address."""

REDIS_PORT = 6379
"""TCP port of the embedded Redis; env REDIS_PORT overrides."""

REDIS_MAXMEMORY_MB = 2048
"""Memory ceiling of the embedded Redis in MiB (`maxmemory`, policy noeviction: nothing is ever evicted, writes fail
at the ceiling). Event streams are capped per job (EVENT_STREAM_MAXLEN), so ~2 GiB holds thousands of jobs."""

REDIS_MAXMEMORY_MB_ENV = "REDIS_MAXMEMORY_MB"
"""Environment variable overriding REDIS_MAXMEMORY_MB."""

REDIS_PASSWORD_BYTES = 24
"""Entropy of the generated embedded-Redis password, in bytes (token_urlsafe makes it ~32 characters)."""

ALLOW_INSECURE_ENV = "REDIS_ALLOW_INSECURE"
"""Set to 1 to use a Redis off loopback with neither a password nor a TLS client certificate, on purpose (a warning
is printed)."""

REDIS_CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a TCP connection to Redis before giving up."""

FINAL_WRITE_RETRY_SECONDS = 120.0
"""Seconds a worker keeps retrying a final job-state write while Redis is unreachable."""

KEY_PREFIX = "trainer"
"""Prefix of every key this project writes (RQ's own keys keep RQ's `rq:` prefix)."""

QUEUE_PREFIX = "train"
"""RQ queue names are `train:g{N}:{priority}`: N GPUs (or CPU ranks) per job."""

PRIORITIES = ("high", "default", "low")
"""Queue priorities, in the order a worker serves them."""

MAX_GPUS_PER_JOB = 16
"""Largest `--gpus N` a job may ask for (one node); more is refused at submission."""

MAX_NODES_PER_JOB = 64
"""Largest `--nodes N` (workers in one multi-node job's gang)."""

GANG_RESERVATION_TIMEOUT = 60.0
"""Seconds a multi-node job's gang may stay incomplete before its reservations are released; env
GANG_RESERVATION_TIMEOUT overrides."""

GANG_POLL_INTERVAL = 0.5
"""Seconds between an idle or reserved worker's looks at the multi-node jobs (and its blocking dequeue's timeout
is 1 s, so a gang is seen within about a second)."""

RENDEZVOUS_TIMEOUT = 60
"""Seconds every node of a multi-node job waits for the others: node 0's address, torchrun's static rendezvous."""

BOUND_STATIC = "bound-static"
"""torchrun rendezvous backend of a multi-node job's nodes: torchrun's static one with node 0's store listening on the
rendezvous address only (worker/torchrun.py registers it; worker/launcher.py asks for it)."""

MULTINODE_PG_TIMEOUT = 45
"""Seconds a collective of a multi-node job may wait for a peer (the process group's timeout, CORE_DIST_TIMEOUT):
a lost node stops the others within a minute instead of PyTorch's 30 minutes."""

MAX_CPU_SLOTS = 8
"""Upper bound of the default slot count of a CPU-only worker (gloo ranks it can run at once)."""

HEARTBEAT_INTERVAL = 2.0
"""Seconds between a worker's heartbeats (advertisement refresh, RQ heartbeat, recovery scan tick)."""

HEARTBEAT_TTL = 10
"""Seconds a worker's advertisement lives without a heartbeat; env WORKER_HEARTBEAT_TTL overrides (tests shorten it)."""

RECOVERY_SCAN_INTERVAL = 4.0
"""Seconds between a worker's scans for running jobs whose worker has vanished."""

STUCK_RECOVERY_SECONDS = 30.0
"""Seconds a job may sit in `recovering` without its next attempt in a queue before a worker enqueues it again."""

MAX_RECOVERIES = 3
"""Times a job is re-queued after its worker died before it is failed for good."""

CANCEL_POLL_INTERVAL = 0.5
"""Seconds between the job monitor's checks of the cancel flag, time limit and child exit."""

TERMINATE_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL when a job's process tree is stopped (cancel, timeout, shutdown)."""

GUARD_POLL_INTERVAL = 0.3
"""Seconds between the guard process's checks that its parent (the worker) is still alive."""

EVENT_STREAM_MAXLEN = 20_000
"""Approximate cap (entries) of a job's event stream (XADD MAXLEN ~)."""

LOG_STREAM_MAXLEN = 10_000
"""Approximate cap (lines) of a job's log stream (XADD MAXLEN ~)."""

STATUS_LOG_TAIL_LINES = 40
"""Log lines copied into a failed job's status (`log_tail`)."""

FLUSH_INTERVAL = 0.25
"""Seconds between batched XADD flushes of events and log lines."""

FLUSH_BATCH = 200
"""Entries per pipeline round trip when flushing events or log lines."""

SINK_BUFFER = 50_000
"""Events buffered in memory while Redis is unreachable; older step events are dropped beyond it."""

SINK_CLOSE_TIMEOUT = 10.0
"""Seconds `close()` of the Redis sink waits for the last flush before giving up."""

ARTIFACT_SYNC_INTERVAL = 10.0
"""Minimum seconds between uploads of a running job's run folder to a remote artifact store."""

JOB_RESULT_TTL = 7 * 24 * 3600
"""Seconds RQ keeps its own job records; our status hashes stay until the job is deleted."""

STATUS_WAIT_CANCEL = 12.0
"""Seconds `python -m worker cancel` waits for a running job to reach `cancelled` before returning."""

LIST_LIMIT = 500
"""Most jobs `list_jobs` returns (newest first)."""

UPLOAD_MAX_BYTES = 2 * 1024**3
"""Largest dataset (zip or zipped folder) submission or `dataset add` uploads to the artifact store, in bytes; env
UPLOAD_MAX_BYTES overrides (read by `worker.artifacts.upload_max_bytes`). Sources read in place have no cap."""

UPLOAD_MAX_BYTES_ENV = "UPLOAD_MAX_BYTES"
"""Environment variable overriding UPLOAD_MAX_BYTES (a whole number of bytes)."""

DATASET_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
"""What a registered dataset's name may be: lower-case letters, digits, `.`, `_`, `-`; 1-64 characters, starting with
a letter or digit (no `:`, which separates NAME:VERSION, and nothing a key or a URL would need escaped)."""

PREPARED_PREFIX = "prepared"
"""Artifact-store folder of registered datasets' prepared forms: <content hash>/<form key>/ (index.json and the tar
shards); next to `datasets/` (the uploads), keyed by the same content hash (worker/datasets/prepared.py)."""

PREPARE_LOCK_SECONDS = 120
"""Seconds a preparer's Redis lock lives without renewal (renewed at each progress report): a dead preparer's lock
expires and a waiting worker takes over."""

DATASET_SAMPLE_PER_CLASS = 8
"""Images per class (per split folder of a pre-split tree) that registering an in-place source downloads to check
that they decode; counts come from the listing, so the rest is never read at registration."""

DATASET_SAMPLE_THREADS = 8
"""Concurrent downloads of the sampled images (and of a remote in-place source synced to a worker)."""

STORE_FULL_BYTES = 1024**2
"""A failed run whose run folder's file system has less free space than this (bytes) is reported as a full store."""

JOB_TIME_LIMIT_HOURS = 72.0
"""`train.time_limit` a job gets at submission when its config sets none (the run ends as timed out at the limit,
its checkpoints kept). Env JOB_TIME_LIMIT_HOURS overrides; 0 means no limit."""

JOB_TIME_LIMIT_ENV = "JOB_TIME_LIMIT_HOURS"
"""Environment variable overriding JOB_TIME_LIMIT_HOURS (read by worker.submit.default_time_limit)."""

USER_MAX_ACTIVE_JOBS_ENV = "USER_MAX_ACTIVE_JOBS"
"""Environment variable: the most jobs (queued or running) a user without an explicit limit may have at once (unset
or empty: no limit; admins are never limited). Read by worker.users.effective_limits."""

USER_MAX_GPUS_ENV = "USER_MAX_GPUS"
"""Environment variable: the most GPUs (or CPU ranks) a user's queued and running jobs may ask for together, for users
without an explicit limit (unset or empty: no limit; admins are never limited)."""

JOB_MEMORY_FRACTION = 0.9
"""Default memory bound of a job's process tree, as a fraction of the machine's RAM (a worker runs one job at a time;
the rest is for the worker, Redis and the system). Several workers on one machine: set JOB_MEMORY_LIMIT_GB to each
one's share."""

JOB_MEMORY_LIMIT_ENV = "JOB_MEMORY_LIMIT_GB"
"""Environment variable of the worker: a job's memory bound in GiB (fractional allowed; 0 = none), overriding
JOB_MEMORY_FRACTION (read only by worker.memlimit.job_memory_limit)."""

JOB_OOM_SCORE_ADJ = 500
"""`oom_score_adj` of a job's processes (set by the guard): if a spike outruns the memory watch and the kernel's
OOM killer must pick a process, it picks the job's, not the worker, Redis or the dashboard."""

USER_SUBMIT_LOCK_TTL = 30.0
"""Seconds a user's submission lock (keys.user_submit_lock) lives at most (a submission that died holding it)."""

USER_SUBMIT_LOCK_WAIT = 20.0
"""Seconds a submission waits for the same user's other submission to finish counting and enqueuing."""

MAX_SWEEP_TRIALS = 1000
"""Most trials one sweep may ask for (each is a job record, a stream and an Optuna trial in Redis)."""

MAX_SWEEP_PARALLEL = 64
"""Most trials of one sweep queued or running at once."""

SWEEP_LOCK_TTL = 30.0
"""Seconds a sweep's lock lives when its holder dies (telling Optuna and enqueuing trials takes milliseconds)."""

SWEEP_LOCK_WAIT = 10.0
"""Seconds a process that ended a trial waits for the sweep's lock (the heartbeat scan retries when it gives up)."""

SWEEP_SCAN_INTERVAL = 5.0
"""Seconds between a worker's scans of the active sweeps (heals a sweep whose advancing process died)."""

DOWNLOAD_CACHE_GB = 40.0
"""GB (10**9 bytes): budget of a machine's cache of downloaded datasets (zips fetched from a remote store, in-place
sources synced from a URL); least recently used entries no running job holds go first (worker/caches.py)."""

DOWNLOAD_CACHE_GB_ENV = "DOWNLOAD_CACHE_GB"
"""Environment variable overriding DOWNLOAD_CACHE_GB."""

DISK_MIN_FREE_GB = 2.0
"""Free disk floor in GiB on var/ and a local artifact store: below it submission and dataset uploads are refused,
workers take no job, and `worker doctor`'s disk check fails. Env DISK_MIN_FREE_GB overrides."""

DISK_MIN_FREE_GB_ENV = "DISK_MIN_FREE_GB"
"""Environment variable overriding DISK_MIN_FREE_GB (read only by worker.storage.min_free_bytes)."""

RETENTION_CHECKPOINT_DAYS = 7.0
"""`worker gc`: a finished job's last.pt is removed this many days after it ended (best.pt and export/ stay)."""

RETENTION_ORPHAN_DAYS = 1.0
"""`worker gc`: a stored dataset zip that no version and no job refers to is removed after this many days (a
submission may be uploading one right now)."""

RETENTION_LOCAL_RUN_DAYS = 2.0
"""`worker gc`: this machine's copy of a remote store's run folder is removed this many days after its job ended
(at once when the job was deleted); the store keeps the files."""

DISK_CHECK_INTERVAL = 10.0
"""Seconds between an idle worker's looks at its free disk (below DISK_MIN_FREE_GB it takes no job)."""

GC_CHECK_INTERVAL = 600.0
"""Seconds between a worker's looks at whether the daily retention run is due (the claim keys decide)."""

GC_INTERVAL = 24 * 3600.0
"""Seconds between the retention runs a worker starts by itself (one per artifact store and per machine)."""

DOCTOR_DISK_WARN_GB = 20.0
"""`worker doctor`: less free disk than this (GiB) is a warning (a CIFAR-sized job needs a few GiB with checkpoints)."""

DOCTOR_PROBE_TIMEOUT = 90.0
"""`worker doctor`: seconds the distributed-backend probe (a one-rank gloo/NCCL all-reduce) may take."""

MIN_REDIS_VERSION = (5, 0)
"""Oldest Redis the worker supports (streams, Lua scripts, RQ's commands)."""

NODE_FINISH_GRACE = 30.0
"""Seconds a node's ranks may take to exit after another node of the attempt recorded the job finished (they are
leaving the last collective); still running after that, the node counts as lost."""
PEER_END_WAIT = 10.0
"""Seconds node 0 of a failed multi-node attempt waits for the other nodes to record how they ended, so that the
job's error can name what they said (worker/multinode.py `peer_errors`)."""
