"""Gang reservation for multi-node jobs: which workers form a job's gang, decided atomically in Redis.

A multi-node job (`num_nodes` N > 1) is not in an RQ queue: it waits in the `trainer:gangs` ZSET, ordered by
priority, then submission time. An idle worker looks at that ZSET before its RQ queues and reserves itself for the
first waiting job it can host (`gpus` ≤ its slots) with one Lua call, which also checks that the worker holds no
other reservation (`trainer:reservations`: worker → job). The call that brings the gang to N members starts the
attempt in the same script: state `running`, the members in reservation order become node ranks 0..N-1 (`gang`),
and the job leaves the ZSET. Each member then runs its own node (worker/multinode.py).

Rules (docs/multinode.md says why):
- **Order.** Every worker reserves for the *first* waiting job it can host, so two gangs never split the workers
  between them (no deadlock): the earlier job of the higher priority fills first.
- **Timeout.** A gang still incomplete `GANG_RESERVATION_TIMEOUT` s (60) after its first reservation is released
  by whichever member notices first; the members go back to other work.
- **Single-node jobs are not starved.** A worker released by a timeout takes one queued single-node job (if any)
  before it reserves again, so a gang that cannot complete holds each worker for at most one timeout in turn.
- **Dead members.** A reserved worker whose advertisement expired is dropped from the gang (before the start);
  another worker takes its place. After the start a lost member re-queues the whole job (`requeue_running`).

The atomic steps are Lua scripts in worker/record.py (the job hash's one owner); each names every key it touches in
KEYS (the member names are fields of one hash, not keys).
"""
from __future__ import annotations

import os
import time
from typing import Any

import redis

from worker import keys, record
from worker.defaults import GANG_RESERVATION_TIMEOUT, PRIORITIES
from worker.hashcodec import decode_reply
from worker.record import JobRecord
from worker.states import WAITING_STATES, JobState


def reservation_timeout() -> float:
    """Seconds an incomplete gang is held: env GANG_RESERVATION_TIMEOUT or the default (60 s)."""
    raw = os.environ.get("GANG_RESERVATION_TIMEOUT", "").strip()
    try:
        return max(1.0, float(raw)) if raw else GANG_RESERVATION_TIMEOUT
    except ValueError:
        return GANG_RESERVATION_TIMEOUT


def score(priority: str, submitted_at: float) -> float:
    """ZSET score: priority first (high < default < low), then submission time."""
    return PRIORITIES.index(priority) * 1e10 + float(submitted_at)


def waiting_note(reserved: int, nodes: int) -> str:
    """What a waiting multi-node job's status says."""
    return f"{reserved} of {nodes} workers reserved"




def waiting_jobs(conn: redis.Redis, limit: int = 50) -> list[str]:
    """Multi-node jobs waiting for a gang, first served first."""
    return [decode_reply(j) for j in conn.zrange(keys.gangs(), 0, limit - 1)]


def reserved_job(conn: redis.Redis, worker: str) -> str | None:
    """The multi-node job this worker is reserved for, or None."""
    raw = conn.hget(keys.reservations(), worker)
    return decode_reply(raw) if raw else None


def reservations(conn: redis.Redis) -> dict[str, str]:
    """worker name → job id, for every worker holding a reservation."""
    return {decode_reply(k): decode_reply(v) for k, v in conn.hgetall(keys.reservations()).items()}


def members(conn: redis.Redis, job_id: str) -> list[str]:
    """The workers reserved for a waiting job, in reservation order."""
    raw = conn.hgetall(keys.gang(job_id))
    joined = sorted(((decode_reply(k), float(v)) for k, v in raw.items()), key=lambda x: (x[1], x[0]))
    return [name for name, _ in joined]


def reserve(conn: redis.Redis, job_id: str, worker: str, slots: int) -> tuple[str, int]:
    """One reservation attempt: ('reserved', members so far), ('started', N) when this worker completed the gang,
    or why not: 'busy' (reserved elsewhere), 'unfit' (needs more slots), 'full', 'gone' (no longer waiting)."""
    return record.gang_reserve(conn, job_id, worker, slots)


def try_reserve(conn: redis.Redis, worker: str, slots: int) -> str | None:
    """Reserve this worker for the first waiting multi-node job it can host; the job id, or None."""
    for job_id in waiting_jobs(conn):
        try:
            drop_dead(conn, job_id, but=worker)  # a gang never starts with a worker already known dead
            result, _ = reserve(conn, job_id, worker, slots)
        except ValueError:  # a malformed id in the ZSET: not ours to serve
            conn.zrem(keys.gangs(), job_id)
            continue
        if result in ("reserved", "started"):
            return job_id
        if result == "busy":
            return reserved_job(conn, worker)
    return None


def drop(conn: redis.Redis, job_id: str, names: list[str]) -> int:
    """Remove these workers from a gang that has not started (they died); the members left, or -1."""
    if not names:
        return -1
    return record.gang_drop(conn, job_id, names)


def drop_dead(conn: redis.Redis, job_id: str, *, but: str = "") -> list[str]:
    """Drop the reserved workers of a gathering gang whose advertisement expired (they died); their names."""
    dead = dead_workers(conn, [m for m in members(conn, job_id) if m != but])
    if dead and drop(conn, job_id, dead) >= 0:
        conn.xadd(keys.logs(job_id), {"line": f"[worker] dropped {', '.join(dead)} from the gang: its worker stopped "
                                              "heartbeating before the start; waiting for another", "src": "worker"})
    return dead


def dead_workers(conn: redis.Redis, names: list[str]) -> list[str]:
    """The names whose advertisement is gone."""
    if not names:
        return []
    with conn.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.exists(keys.worker(name))
        alive = pipe.execute()
    return [n for n, a in zip(names, alive) if not a]


def release_if_stale(conn: redis.Redis, job_id: str, timeout: float) -> bool:
    """Release an incomplete gang whose first reservation is `timeout` s old; True when this call released it."""
    job = JobRecord.find(conn, job_id, "num_nodes")
    nodes = job.num_nodes if job is not None else 0
    note = (f"{waiting_note(0, nodes)} (the last gang did not complete within {timeout:g} s and was released; "
            f"waiting for {nodes} free workers)")
    return record.gang_release(conn, job_id, timeout=timeout, note=note)


def discard(conn: redis.Redis, job_id: str) -> None:
    """A cancelled or deleted multi-node job: out of the ZSET, every reservation for it released."""
    record.gang_release(conn, job_id, timeout=None)


def unreserve(conn: redis.Redis, worker: str, job_id: str) -> None:
    """This worker no longer holds a reservation for `job_id` (its node started, or the job is over)."""
    conn.eval("if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end",
              1, keys.reservations(), worker, job_id)


def requeue_running(conn: redis.Redis, job_id: str, attempt: int, *, reason: str,
                    max_recoveries: int) -> tuple[str, int]:
    """The attempt `attempt` of a running multi-node job lost a node (or its worker shuts down): the whole job waits
    for a new gang and resumes from its checkpoint. (recovering, new attempt), (failed, 0) past the cap, or
    (the state, 0) when another caller already moved it on."""
    job = JobRecord.find(conn, job_id, "priority", "submitted_at")
    if job is None:
        return "missing", 0
    sc = score(job.priority, float(job.get("submitted_at") or time.time()))
    state, new_attempt = record.gang_requeue(conn, job_id, attempt, max_recoveries=max_recoveries, reason=reason,
                                             score=sc)
    if state == JobState.RECOVERING:
        conn.xadd(keys.logs(job_id), {"line": f"[worker] re-queued as attempt {new_attempt} ({reason}); "
                                              "it waits for a new gang and resumes from its last checkpoint",
                                      "src": "worker"})
    return state, int(new_attempt)


def poll(conn: redis.Redis, job_id: str, worker: str, *, timeout: float) -> tuple[str, int, int]:
    """What a reserved worker does next: ('start', node rank, attempt) once the gang started with it, ('wait', 0, 0)
    while it gathers (dead members are dropped, a stale gang released), ('released', 0, 0) when this worker is no
    longer reserved (timed out, cancelled, dropped)."""
    if reserved_job(conn, worker) != job_id:
        return "released", 0, 0
    job = JobRecord.find(conn, job_id, "gang", "attempt")
    state = job.state if job is not None else None
    if job is not None and state is JobState.RUNNING and worker in job.gang:
        return "start", job.gang.index(worker), job.attempt
    if state not in WAITING_STATES:
        unreserve(conn, worker, job_id)
        return "released", 0, 0
    drop_dead(conn, job_id, but=worker)
    if release_if_stale(conn, job_id, timeout):
        conn.xadd(keys.logs(job_id), {"line": f"[worker] the gang did not complete within {timeout:g} s: "
                                              "reservations released", "src": "worker"})
        return "released", 0, 0
    return "wait", 0, 0


def gang_of(status: dict[str, Any]) -> list[str]:
    """The node-rank-ordered workers of a running multi-node job's attempt (from its parsed status)."""
    gang = status.get("gang")
    return list(gang) if isinstance(gang, list) else []
