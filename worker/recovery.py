"""Recovery of jobs whose worker died: every live worker scans, the Lua claim lets exactly one of them re-queue.

A job is orphaned when it is `running` but its worker's advertisement (TTL'd, refreshed every few seconds) is gone.
The claim flips it to `recovering` and counts the recovery; past MAX_RECOVERIES it fails instead of looping.
The next attempt resumes from the run folder's last checkpoint (`core.train --resume`).
"""
from __future__ import annotations

import logging
import time

import redis
from rq.job import JobStatus

from worker import gang, keys
from worker.defaults import MAX_RECOVERIES, STUCK_RECOVERY_SECONDS
from worker.queues import discard_rq_job, enqueue_attempt, fetch_rq_job
from worker.record import JobRecord, claim_for_requeue
from worker.states import JobState
from worker.sweeps import trial_ended

log = logging.getLogger("worker.recovery")


def find_orphans(conn: redis.Redis) -> list[tuple[str, str]]:
    """(job id, dead worker name) of running jobs whose worker stopped heartbeating; for a multi-node job, any
    worker of its gang (the first dead one is named)."""
    job_ids = sorted(j.decode() for j in conn.smembers(keys.running_set()))
    candidates, stale = [], []
    for job_id, record in JobRecord.fetch_many(conn, job_ids, "worker", "gang").items():
        if record is None:
            stale.append(job_id)  # deleted job
        elif record.state is JobState.RUNNING and record.gang:
            candidates += [(job_id, name) for name in record.gang]
        elif record.state is JobState.RUNNING and record.worker:
            candidates.append((job_id, record.worker))
    if stale:
        conn.srem(keys.running_set(), *stale)
    if not candidates:
        return []
    with conn.pipeline(transaction=False) as pipe:
        for _, owner in candidates:
            pipe.exists(keys.worker(owner))
        alive = pipe.execute()
    out: dict[str, str] = {}
    for (job_id, name), a in zip(candidates, alive):
        if not a:
            out.setdefault(job_id, name)
    return list(out.items())


def recover_orphans(conn: redis.Redis, *, by: str, max_recoveries: int = MAX_RECOVERIES) -> list[str]:
    """Re-queue every orphaned job this caller wins the claim for; returns their ids."""
    recovered = []
    for job_id, owner in find_orphans(conn):
        reason = f"worker {owner} stopped heartbeating"
        record = JobRecord.find(conn, job_id, "gang", "attempt")
        if record is not None and record.gang:  # a multi-node job: the whole gang waits again (one scanner wins)
            state, attempt = gang.requeue_running(conn, job_id, record.attempt,
                                                  reason=f"{reason}; recovered by {by}", max_recoveries=max_recoveries)
            if state == JobState.RECOVERING:
                log.warning("job %s: %s; the gang waits again as attempt %d", job_id, reason, attempt)
                recovered.append(job_id)
            continue
        state, attempt = claim_for_requeue(conn, job_id, owner, max_recoveries=max_recoveries, reason=reason)
        if state == JobState.RECOVERING:
            requeue_recovered(conn, job_id, attempt, f"{reason}; recovered by {by}")
            log.warning("job %s: %s; re-queued as attempt %d", job_id, reason, attempt)
            recovered.append(job_id)
        elif state == JobState.FAILED:
            record = JobRecord.find(conn, job_id, "rq_job", "sweep")
            discard_rq_job(conn, record.rq_job if record else None)
            log.warning("job %s: %s too many times; failed", job_id, reason)
            if record is not None and record.get("sweep"):
                trial_ended(conn, record.get("sweep"))
    return recovered


def heal_stuck_recoveries(conn: redis.Redis, *, by: str, after: float = STUCK_RECOVERY_SECONDS) -> list[str]:
    """Re-enqueue `recovering` jobs whose next attempt never reached a queue (the claimer died between its claim
    and its enqueue, or Redis went away in between). A short lock keeps two workers from both doing it."""
    healed = []
    now = time.time()
    for raw in conn.smembers(keys.recovering_set()):
        job_id = raw.decode()
        record = JobRecord.find(conn, job_id, "recovered_at", "attempt", "num_nodes", "priority", "submitted_at")
        if record is None or record.state is not JobState.RECOVERING:
            conn.srem(keys.recovering_set(), job_id)
            continue
        if record.num_nodes > 1:  # a multi-node job waits in the gangs ZSET, not in an RQ queue
            conn.zadd(keys.gangs(), {job_id: gang.score(record.priority, record.get("submitted_at", 0.0))}, nx=True)
            continue
        if now - record.get("recovered_at", 0.0) < after:
            continue
        attempt_no = record.attempt
        rq_job = fetch_rq_job(conn, keys.rq_job_id(job_id, attempt_no))
        if rq_job is not None and rq_job.get_status() in (JobStatus.QUEUED, JobStatus.STARTED):
            continue
        if not conn.set(keys.heal_lock(job_id), by, nx=True, ex=int(after)):
            continue
        requeue_recovered(conn, job_id, attempt_no, f"its re-queue was lost; re-enqueued by {by}")
        log.warning("job %s: recovering without a queued attempt; re-enqueued attempt %d", job_id, attempt_no)
        healed.append(job_id)
    return healed


def enqueue_next_attempt(conn: redis.Redis, job_id: str, attempt: int) -> None:
    """After a successful claim (`claim_for_requeue`): the next attempt goes to the front of the job's queue, and its
    RQ id into the job's record. Nothing is enqueued for a job deleted in the meantime."""
    record = JobRecord.find(conn, job_id, "gpus", "priority")
    if record is None:
        return
    enqueue_attempt(conn, job_id, gpus=record.gpus, priority=record.priority, attempt=attempt, at_front=True)
    record.save(rq_job=keys.rq_job_id(job_id, attempt))


def requeue_recovered(conn: redis.Redis, job_id: str, attempt: int, reason: str) -> None:
    """After another worker's job was claimed: drop the dead attempt's RQ record, enqueue the next attempt in front."""
    record = JobRecord.find(conn, job_id, "rq_job")
    discard_rq_job(conn, record.rq_job if record else None)
    enqueue_next_attempt(conn, job_id, attempt)
    conn.xadd(keys.logs(job_id), {"line": f"[worker] re-queued as attempt {attempt}: {reason}", "src": "worker"})
