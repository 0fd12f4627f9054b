"""RQ queues: one per (GPU count, priority), e.g. `train:g2:high`; payloads through RQ's JSONSerializer only.

A worker with G devices listens to the queues for 1..G devices, so it only ever dequeues jobs it can run. The job
functions are named by import path (`JOB_FUNCTION`, `NODE_FUNCTION`): jobs already queued keep working as long as
those paths do.
"""
from __future__ import annotations

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from worker import keys
from worker.defaults import JOB_RESULT_TTL

JOB_FUNCTION = "worker.attempt.run_attempt"
"""The RQ job function, by import path (its only argument is the job id: plain JSON, nothing pickled)."""

NODE_FUNCTION = "worker.multinode.train_node"
"""The RQ job function of one node of a multi-node job (arguments: the job id and the attempt number)."""

JOB_FUNCTIONS = frozenset({JOB_FUNCTION, NODE_FUNCTION})
"""Every function a worker runs: an RQ job naming anything else is refused before it is imported (worker/worker.py,
`foreign_job_refusal`)."""

CONTEXT_FUNCTIONS = JOB_FUNCTIONS
"""The job functions that take the running worker's context as their keyword argument `ctx` (worker/worker.py's
`WorkerJob` passes it)."""


def get_queue(conn: redis.Redis, name: str) -> Queue:
    return Queue(name, connection=conn, serializer=JSONSerializer)


def enqueue_attempt(
    conn: redis.Redis,
    job_id: str,
    *,
    gpus: int,
    priority: str,
    attempt: int,
    at_front: bool = False,
    pipeline: redis.client.Pipeline | None = None,
) -> Job:
    """Enqueue one attempt of a job (RQ id `keys.rq_job_id`); a recovered attempt goes to the front of its queue.

    No RQ timeout (-1): the worker enforces the job's own time limit and stops the whole process tree itself.
    """
    queue = get_queue(conn, keys.queue_name(gpus, priority))
    return queue.enqueue_call(
        JOB_FUNCTION,
        args=[job_id],
        job_id=keys.rq_job_id(job_id, attempt),
        timeout=-1,
        result_ttl=JOB_RESULT_TTL,
        failure_ttl=JOB_RESULT_TTL,
        description=f"train {job_id} (attempt {attempt})",
        at_front=at_front,
        pipeline=pipeline,
    )


def fetch_rq_job(conn: redis.Redis, rq_id: str) -> Job | None:
    """RQ's job record, or None when it is gone (expired, deleted)."""
    try:
        return Job.fetch(rq_id, connection=conn, serializer=JSONSerializer)
    except Exception:  # noqa: BLE001 - NoSuchJobError and undecodable leftovers both mean "nothing to act on"
        return None


def discard_rq_job(conn: redis.Redis, rq_id: str | None) -> None:
    """Remove an attempt's RQ record from its queue and registries (a cancelled, recovered or deleted job)."""
    if not rq_id:
        return
    job = fetch_rq_job(conn, rq_id)
    if job is not None:
        try:
            job.delete(remove_from_queue=True)
        except redis.exceptions.RedisError:
            pass
