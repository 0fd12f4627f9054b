"""What a job needs from the worker process running it, handed to the job function as its `ctx` argument.

`TrainerWorker` (worker/worker.py) builds one `WorkerContext` and runs its RQ jobs as its `WorkerJob`, which passes
it to the job functions that take one (`queues.CONTEXT_FUNCTIONS`): explicitly, never through a module global.
Under a plain `rq worker` those functions build one with `rq_job_context`.
"""
from __future__ import annotations

import dataclasses
import threading

import redis

from worker.artifacts import ArtifactStore
from worker.connection import connection_url
from worker.devices import TRAINING, DeviceLedger
from worker.launcher import WarmTrainer
from worker.memlimit import job_memory_limit


@dataclasses.dataclass
class WorkerContext:
    """What a job needs from the worker process running it."""

    connection: redis.Redis
    redis_url: str
    worker_name: str
    devices: list[int] | None
    store: ArtifactStore
    shutdown: threading.Event = dataclasses.field(default_factory=threading.Event)
    """Set when the worker is asked to stop: the running job is stopped and re-queued to resume elsewhere."""
    current_job: str | None = None
    warm: WarmTrainer | None = None
    """The pre-started one-rank trainer (None: every run starts cold)."""
    advertise_addr: str = "127.0.0.1"
    """The address other machines reach this worker at (node 0 of a multi-node job hosts the rendezvous there)."""
    memory_limit: int | None = dataclasses.field(default_factory=job_memory_limit)
    """Bytes a job's process tree may hold (JOB_MEMORY_LIMIT_GB, worker/memlimit.py); None: no bound."""
    ledger: DeviceLedger = dataclasses.field(init=False)
    """Who holds `devices`: the running job (devices.TRAINING) and the deployment replicas this worker hosts."""

    def __post_init__(self) -> None:
        self.ledger = DeviceLedger(self.devices)

    def training_devices(self, count: int) -> list[int]:
        """The GPUs the running job was given (`count` of them: TRAINING's share of the ledger, else the first ones,
        as under a plain `rq worker`)."""
        return self.ledger.held(TRAINING) or (self.devices or [])[:count]


def rq_job_context() -> WorkerContext:
    """Under a plain `rq worker` (no context handed over): one built from RQ's current job, without shutdown handling
    or a pre-started trainer."""
    from rq import get_current_job

    rq_job = get_current_job()
    conn = rq_job.connection
    return WorkerContext(connection=conn, redis_url=connection_url(conn), worker_name=rq_job.worker_name or "rq",
                         devices=None, store=ArtifactStore())
