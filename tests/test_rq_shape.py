"""The RQ code the worker overrides or relies on, pinned: an RQ upgrade that changes it fails here, with what to
re-check, instead of being discovered in production.

worker/worker.py's `TrainerWorker` overrides RQ's `dequeue_job_and_maintain_ttl` (it calls RQ's own loop as one round
of at most a second, between its looks at the multi-node gangs), wraps `work`, `execute_job` and
`handle_warm_shutdown_request`, and runs its jobs as `WorkerJob`, which overrides `Job._execute` to hand the job
function the worker's context. Each pinned source is hashed as `inspect.getsource` gives it; on a mismatch, read the
new RQ source of that method, re-check what the entry's note says, then update the hash (and rq's pin in
requirements.txt).
"""
from __future__ import annotations

import hashlib
import inspect
import time
from typing import Any

import pytest
import rq
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker, SimpleWorker

PINNED: dict[str, tuple[Any, str, str]] = {
    "BaseWorker.dequeue_job_and_maintain_ttl": (
        BaseWorker.dequeue_job_and_maintain_ttl, "2715cf34d9e3af3b",
        "TrainerWorker calls it as one round: with timeout=1 and max_idle_time=1 it must return None after about a "
        "second on empty queues (DequeueTimeout ends the loop once the idle time is used up), with timeout=None look "
        "once without blocking, and heartbeat, run maintenance, reorder the queues and set redis_server_version as "
        "our old copy did; and it must dequeue from self._ordered_queues, which TrainerWorker cuts each round to the "
        "queues of jobs that fit the GPUs its deployment replicas leave"),
    "BaseWorker.reorder_queues": (
        BaseWorker.reorder_queues, "03ea7d537f7e3a54",
        "with the default dequeue strategy it must leave self._ordered_queues as TrainerWorker set it"),
    "BaseWorker.work": (
        BaseWorker.work, "04b5cdf8e554d8a2",
        "it must still call dequeue_job_and_maintain_ttl(timeout, max_idle_time) with timeout None in burst mode, "
        "then execute_job(job, queue); TrainerWorker.work wraps it (heartbeat thread, pre-started trainer)"),
    "SimpleWorker.execute_job": (
        SimpleWorker.execute_job, "eae0f23110aeb280",
        "it must still run the job in this process (TrainerWorker.execute_job sets WorkerJob.context before it)"),
    "BaseWorker.perform_job": (
        BaseWorker.perform_job, "1f0e40678ae519cf", "it must still run the job through job.perform()"),
    "Job.perform": (Job.perform, "c8f482e08e17d34c", "it must still call self._execute() (WorkerJob overrides it)"),
    "Job._execute": (
        Job._execute, "653df714a38f7818",
        "WorkerJob._execute calls self.func(*self.args, ctx=..., **self.kwargs): re-check it does what RQ's does"),
    "BaseWorker.handle_warm_shutdown_request": (
        BaseWorker.handle_warm_shutdown_request, "25d331e215916915",
        "TrainerWorker's override calls it, then sets its context's shutdown flag"),
    "BaseWorker.heartbeat": (
        BaseWorker.heartbeat, "63b1089fd146d19c",
        "called while a worker waits for its gang; it must keep RQ's worker key alive"),
    "BaseWorker.maintain_heartbeats": (
        BaseWorker.maintain_heartbeats, "b73451c9b97f7247",
        "TrainerWorker.beat calls it from the heartbeat thread while a job runs (RQ's main loop is busy then)"),
    "Queue.dequeue_any": (
        Queue.dequeue_any, "2452e56ad5197396",
        "TrainerWorker._gang_turn calls it on the worker's private node queue (timeout None: no blocking)"),
}
"""RQ method → (the method, the first 16 hex digits of the sha256 of its source, what to re-check when it changes)."""


def source_hash(func: Any) -> str:
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_rq_code_the_worker_relies_on_has_not_changed(name: str) -> None:
    func, expected, recheck = PINNED[name]
    assert source_hash(func) == expected, (
        f"rq {rq.__version__}: {name} changed since rq 3.0.0 (sha256 {source_hash(func)}, pinned {expected}). "
        f"Re-check worker/worker.py against it: {recheck}. Then update its hash in tests/test_rq_shape.py.")


def test_rqs_own_loop_is_one_round_of_at_most_a_second(redis_conn: Any) -> None:
    """What TrainerWorker.dequeue_job_and_maintain_ttl relies on, by behaviour: RQ's loop asked for one second
    returns None after about one second on empty queues, and the job at once when one is queued."""
    queue = Queue("shape-test", connection=redis_conn, serializer=JSONSerializer)
    worker = SimpleWorker([queue], connection=redis_conn, serializer=JSONSerializer, name="shape-test")
    started = time.monotonic()
    assert SimpleWorker.dequeue_job_and_maintain_ttl(worker, 1, 1) is None
    assert 0.9 <= time.monotonic() - started < 5, "one round must block about a second, then give up"
    assert SimpleWorker.dequeue_job_and_maintain_ttl(worker, None) is None, "no timeout: look once, do not block"

    queued = queue.enqueue_call("os.getcwd", job_id="shape-test-job")
    started = time.monotonic()
    result = SimpleWorker.dequeue_job_and_maintain_ttl(worker, 1, 1)
    assert result is not None and time.monotonic() - started < 1
    job, from_queue = result
    assert (job.id, from_queue.name) == (queued.id, queue.name)
    assert isinstance(job, Job)
