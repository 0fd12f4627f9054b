"""Operations on one job that more than the door needs: `cancel_job` (the CLI and the dashboard through
`worker.api`, a sweep cancelling its trials). It knows nothing of sweeps: whoever must hear that a cancel itself ended a
job (no worker will report that end) passes `ended`; the door (worker/api.py) tells the job's sweep that way.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import redis

from worker import gang
from worker.errors import NoSuchJobError
from worker.presence import is_alive
from worker.queues import discard_rq_job
from worker.record import JobRecord, mark_final, request_cancel
from worker.states import FINAL_STATES, JobState


def cancel_job(conn: redis.Redis, job_id: str, *, wait: float = 0.0,
               ended: Callable[[JobRecord], None] | None = None) -> str:
    """Cancel a queued, recovering or running job; returns the state it is in afterwards.

    A waiting job is cancelled at once (its RQ entry removed). A running one is stopped by its worker (SIGTERM to
    every rank, SIGKILL after a grace period); `wait` seconds are spent waiting for that. A running job whose
    worker is dead is cancelled directly. A job already final is left as it is. `ended(record)` is called when this
    call made the job final itself (waiting, or its worker dead): no worker ends such a job, so nobody else says so.
    """
    result = request_cancel(conn, job_id)
    if result == "missing":
        raise NoSuchJobError(f"no such job {job_id!r}")
    record = JobRecord(conn, job_id)
    record.refresh("worker", "rq_job", "num_nodes")
    if record.num_nodes > 1:
        gang.discard(conn, job_id)  # out of the gangs ZSET, every reservation for it released
    if result == JobState.CANCELLED:
        discard_rq_job(conn, record.rq_job)
        if ended is not None:
            ended(record)
        return JobState.CANCELLED.value
    if result != "requested":
        return result
    if not is_alive(conn, record.worker):
        mark_final(conn, job_id, record.worker, JobState.CANCELLED, {"error": "cancelled (its worker was gone)"})
        discard_rq_job(conn, record.rq_job)
        if ended is not None:
            ended(record)
        return _state_now(record)
    deadline = time.monotonic() + wait
    state = JobState.RUNNING.value
    while time.monotonic() < deadline:
        state = _state_now(record)
        if state in FINAL_STATES:
            return state
        time.sleep(0.2)
    return state


def _state_now(record: JobRecord) -> str:
    """The job's state as text, re-read; 'missing' once it was deleted."""
    return record.fields["state"] if record.refresh() else "missing"
