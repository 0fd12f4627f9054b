"""Recovery of jobs whose worker died: every live worker scans, the Lua claim lets exactly one of them re-queue.

A job is orphaned when it is `running` but its worker's advertisement (TTL'd, refreshed every few seconds) is gone.
The claim flips it to `recovering` and counts the recovery; past MAX_RECOVERIES it fails instead of looping.
The next attempt resumes from the run folder's last checkpoint (`core.train --resume`).
"""
from __future__ import annotations

import json
import logging
import time

import redis
from rq.job import JobStatus

from worker import gang, keys
from worker.defaults import MAX_RECOVERIES, STUCK_RECOVERY_SECONDS
from worker.jobs import requeue_recovered
from worker.queues import discard_rq_job, fetch_rq_job
from worker.status import claim_for_requeue
from worker.sweeps import trial_ended

log = logging.getLogger("worker.recovery")


def find_orphans(conn: redis.Redis) -> list[tuple[str, str]]:
    """(job id, dead worker name) of running jobs whose worker stopped heartbeating; for a multi-node job, any
    worker of its gang (the first dead one is named)."""
    job_ids = sorted(j.decode() for j in conn.smembers(keys.running_set()))
    if not job_ids:
        return []
    with conn.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), "state", "worker", "gang")
        rows = pipe.execute()
    candidates, stale = [], []
    for job_id, (state, owner, members) in zip(job_ids, rows):
        if state is None:
            stale.append(job_id)  # deleted job
        elif state == b"running" and members:
            candidates += [(job_id, name) for name in json.loads(members)]
        elif state == b"running" and owner:
            candidates.append((job_id, owner.decode()))
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
        members, attempt_raw = conn.hmget(keys.job(job_id), "gang", "attempt")
        if members:  # a multi-node job: the whole gang goes back to waiting (exactly one scanner wins the attempt)
            state, attempt = gang.requeue_running(conn, job_id, int(attempt_raw or 0),
                                                  reason=f"{reason}; recovered by {by}", max_recoveries=max_recoveries)
            if state == "recovering":
                log.warning("job %s: %s; the gang waits again as attempt %d", job_id, reason, attempt)
                recovered.append(job_id)
            continue
        state, attempt = claim_for_requeue(conn, job_id, owner, max_recoveries=max_recoveries, reason=reason)
        if state == "recovering":
            requeue_recovered(conn, job_id, attempt, f"{reason}; recovered by {by}")
            log.warning("job %s: %s; re-queued as attempt %d", job_id, reason, attempt)
            recovered.append(job_id)
        elif state == "failed":
            rq_id, sweep = conn.hmget(keys.job(job_id), "rq_job", "sweep")
            discard_rq_job(conn, rq_id.decode() if rq_id else None)
            log.warning("job %s: %s too many times; failed", job_id, reason)
            if sweep:
                trial_ended(conn, sweep.decode())
    return recovered


def heal_stuck_recoveries(conn: redis.Redis, *, by: str, after: float = STUCK_RECOVERY_SECONDS) -> list[str]:
    """Re-enqueue `recovering` jobs whose next attempt never reached a queue (the claimer died between its claim
    and its enqueue, or Redis went away in between). A short lock keeps two workers from both doing it."""
    healed = []
    now = time.time()
    for raw in conn.smembers(keys.recovering_set()):
        job_id = raw.decode()
        state, recovered_at, attempt, nodes, priority, submitted = conn.hmget(
            keys.job(job_id), "state", "recovered_at", "attempt", "num_nodes", "priority", "submitted_at")
        if state != b"recovering":
            conn.srem(keys.recovering_set(), job_id)
            continue
        if int(nodes or 1) > 1:  # a multi-node job waits in the gangs ZSET, not in an RQ queue
            conn.zadd(keys.gangs(), {job_id: gang.score((priority or b"default").decode(), float(submitted or 0))},
                      nx=True)
            continue
        if now - float(recovered_at or 0) < after:
            continue
        attempt_no = int(attempt or 0)
        rq_job = fetch_rq_job(conn, keys.rq_job_id(job_id, attempt_no))
        if rq_job is not None and rq_job.get_status() in (JobStatus.QUEUED, JobStatus.STARTED):
            continue
        if not conn.set(keys.heal_lock(job_id), by, nx=True, ex=int(after)):
            continue
        requeue_recovered(conn, job_id, attempt_no, f"its re-queue was lost; re-enqueued by {by}")
        log.warning("job %s: recovering without a queued attempt; re-enqueued attempt %d", job_id, attempt_no)
        healed.append(job_id)
    return healed
