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

Lua scripts name every key they touch in KEYS (the member names are fields of one hash, not keys).
"""
from __future__ import annotations

import os
import time
from typing import Any

import redis

from worker import keys
from worker.defaults import GANG_RESERVATION_TIMEOUT, PRIORITIES
from worker.hashcodec import text
from worker.record import JobRecord, state_script
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


# KEYS: job hash, gang hash, reservations hash, gangs zset, running set, recovering set, nodes hash.
# ARGV: worker, now, job id, worker slots.
_RESERVE = state_script("""
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= $QUEUED and state ~= $RECOVERING then
  redis.call('ZREM', KEYS[4], ARGV[3])
  return {'gone', 0}
end
local mine = redis.call('HGET', KEYS[3], ARGV[1])
if mine and mine ~= ARGV[3] then return {'busy', 0} end
local nodes = tonumber(redis.call('HGET', KEYS[1], 'num_nodes') or '1')
local gpus = tonumber(redis.call('HGET', KEYS[1], 'gpus') or '1')
if gpus > tonumber(ARGV[4]) then return {'unfit', 0} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  if redis.call('HLEN', KEYS[2]) >= nodes then return {'full', 0} end
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
end
local since = redis.call('HGET', KEYS[1], 'gang_since')
if not since or since == '' then redis.call('HSET', KEYS[1], 'gang_since', ARGV[2]) end
local n = redis.call('HLEN', KEYS[2])
if n < nodes then
  redis.call('HSET', KEYS[1], 'waiting', n .. ' of ' .. nodes .. ' workers reserved', 'updated_at', ARGV[2])
  return {'reserved', n}
end
local flat = redis.call('HGETALL', KEYS[2])
local members = {}
for i = 1, #flat, 2 do table.insert(members, {flat[i], tonumber(flat[i + 1])}) end
table.sort(members, function(a, b) if a[2] ~= b[2] then return a[2] < b[2] end return a[1] < b[1] end)
local names = {}
for i, m in ipairs(members) do names[i] = m[1] end
redis.call('HSET', KEYS[1], 'state', $RUNNING, 'worker', names[1], 'gang', cjson.encode(names),
           'attempt_started_at', ARGV[2], 'updated_at', ARGV[2], 'rq_job', '')
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'waiting', 'error', 'error_kind', 'exit_code', 'log_tail', 'gang_since', 'rendezvous')
redis.call('DEL', KEYS[7])
redis.call('SADD', KEYS[5], ARGV[3])
redis.call('SREM', KEYS[6], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[3])
return {'started', n}
""")

# KEYS: job hash, gang hash, reservations hash. ARGV: now, job id, worker names to drop...
_DROP = state_script("""
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= $QUEUED and state ~= $RECOVERING then return -1 end
for i = 3, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  if redis.call('HGET', KEYS[3], ARGV[i]) == ARGV[2] then redis.call('HDEL', KEYS[3], ARGV[i]) end
end
local n = redis.call('HLEN', KEYS[2])
local nodes = redis.call('HGET', KEYS[1], 'num_nodes') or '1'
if n == 0 then redis.call('HDEL', KEYS[1], 'gang_since') end
redis.call('HSET', KEYS[1], 'waiting', n .. ' of ' .. nodes .. ' workers reserved', 'updated_at', ARGV[1])
return n
""")

# KEYS: job hash, gang hash, reservations hash, gangs zset.
# ARGV: now, timeout (or 'force'), job id, note for `waiting`.
# Timed out: the gang is released (the job keeps waiting); 'force' (cancel, delete): released and out of the ZSET.
_RELEASE = state_script("""
if ARGV[2] ~= 'force' then
  local state = redis.call('HGET', KEYS[1], 'state')
  if state ~= $QUEUED and state ~= $RECOVERING then return 0 end
  local since = tonumber(redis.call('HGET', KEYS[1], 'gang_since') or '')
  if not since or tonumber(ARGV[1]) - since < tonumber(ARGV[2]) then return 0 end
end
for _, name in ipairs(redis.call('HKEYS', KEYS[2])) do
  if redis.call('HGET', KEYS[3], name) == ARGV[3] then redis.call('HDEL', KEYS[3], name) end
end
redis.call('DEL', KEYS[2])
if ARGV[2] == 'force' then
  redis.call('ZREM', KEYS[4], ARGV[3])
  if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HDEL', KEYS[1], 'gang_since', 'waiting') end
else
  redis.call('HDEL', KEYS[1], 'gang_since')
  redis.call('HSET', KEYS[1], 'waiting', ARGV[4], 'updated_at', ARGV[1])
end
return 1
""")

# KEYS: job hash, running set, recovering set, gangs zset, gang hash, reservations hash.
# ARGV: the attempt that failed, max recoveries (-1: do not count), now, job id, reason, ZSET score.
# Exactly one caller wins per attempt (the attempt number must still match): the whole job goes back to waiting for
# a new gang, resuming from its last checkpoint.
_REQUEUE = state_script("""
local state = redis.call('HGET', KEYS[1], 'state')
local attempt = redis.call('HGET', KEYS[1], 'attempt') or '0'
if state ~= $RUNNING or attempt ~= ARGV[1] then return {state or 'missing', 0} end
redis.call('SREM', KEYS[2], ARGV[4])
for _, name in ipairs(redis.call('HKEYS', KEYS[5])) do
  if redis.call('HGET', KEYS[6], name) == ARGV[4] then redis.call('HDEL', KEYS[6], name) end
end
redis.call('DEL', KEYS[5])
local recoveries = tonumber(redis.call('HGET', KEYS[1], 'recoveries') or '0')
if tonumber(ARGV[2]) >= 0 then
  recoveries = recoveries + 1
  redis.call('HSET', KEYS[1], 'recoveries', recoveries)
  if recoveries > tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[1], 'state', $FAILED, 'ended_at', ARGV[3], 'updated_at', ARGV[3],
               'error', 'a node was lost ' .. recoveries .. ' times (' .. ARGV[5] .. '); not retrying again',
               'error_kind', 'WorkerLost')
    return {$FAILED, 0}
  end
end
local new_attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
local nodes = redis.call('HGET', KEYS[1], 'num_nodes') or '1'
redis.call('HSET', KEYS[1], 'state', $RECOVERING, 'previous_worker', redis.call('HGET', KEYS[1], 'worker') or '',
           'worker', '', 'recovered_at', ARGV[3], 'updated_at', ARGV[3], 'recovery_reason', ARGV[5],
           'waiting', '0 of ' .. nodes .. ' workers reserved')
redis.call('HDEL', KEYS[1], 'gang_since', 'rendezvous')
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[4])
return {$RECOVERING, new_attempt}
""")


def waiting_jobs(conn: redis.Redis, limit: int = 50) -> list[str]:
    """Multi-node jobs waiting for a gang, first served first."""
    return [text(j) for j in conn.zrange(keys.gangs(), 0, limit - 1)]


def reserved_job(conn: redis.Redis, worker: str) -> str | None:
    """The multi-node job this worker is reserved for, or None."""
    raw = conn.hget(keys.reservations(), worker)
    return text(raw) if raw else None


def reservations(conn: redis.Redis) -> dict[str, str]:
    """worker name → job id, for every worker holding a reservation."""
    return {text(k): text(v) for k, v in conn.hgetall(keys.reservations()).items()}


def members(conn: redis.Redis, job_id: str) -> list[str]:
    """The workers reserved for a waiting job, in reservation order."""
    raw = conn.hgetall(keys.gang(job_id))
    return [name for name, _ in sorted(((text(k), float(v)) for k, v in raw.items()), key=lambda x: (x[1], x[0]))]


def reserve(conn: redis.Redis, job_id: str, worker: str, slots: int) -> tuple[str, int]:
    """One reservation attempt: ('reserved', members so far), ('started', N) when this worker completed the gang,
    or why not: 'busy' (reserved elsewhere), 'unfit' (needs more slots), 'full', 'gone' (no longer waiting)."""
    result, count = conn.eval(_RESERVE, 7, keys.job(job_id), keys.gang(job_id), keys.reservations(), keys.gangs(),
                              keys.running_set(), keys.recovering_set(), keys.nodes(job_id),
                              worker, time.time(), job_id, int(slots))
    return text(result), int(count)


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
    return int(conn.eval(_DROP, 3, keys.job(job_id), keys.gang(job_id), keys.reservations(), time.time(), job_id,
                         *names))


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
    record = JobRecord.find(conn, job_id, "num_nodes")
    nodes = record.num_nodes if record else 0
    note = (f"{waiting_note(0, nodes)} (the last gang did not complete within "
            f"{timeout:g} s and was released; waiting for {nodes or '?'} free workers)")
    return bool(conn.eval(_RELEASE, 4, keys.job(job_id), keys.gang(job_id), keys.reservations(), keys.gangs(),
                          time.time(), timeout, job_id, note))


def discard(conn: redis.Redis, job_id: str) -> None:
    """A cancelled or deleted multi-node job: out of the ZSET, every reservation for it released."""
    conn.eval(_RELEASE, 4, keys.job(job_id), keys.gang(job_id), keys.reservations(), keys.gangs(), time.time(),
              "force", job_id, "")


def unreserve(conn: redis.Redis, worker: str, job_id: str) -> None:
    """This worker no longer holds a reservation for `job_id` (its node started, or the job is over)."""
    conn.eval("if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end",
              1, keys.reservations(), worker, job_id)


def requeue_running(conn: redis.Redis, job_id: str, attempt: int, *, reason: str,
                    max_recoveries: int) -> tuple[str, int]:
    """The attempt `attempt` of a running multi-node job lost a node (or its worker shuts down): the whole job waits
    for a new gang and resumes from its checkpoint. ('recovering', new attempt), ('failed', 0) past the cap, or
    (the state, 0) when another caller already moved it on."""
    record = JobRecord.find(conn, job_id, "priority", "submitted_at")
    sc = score(record.priority if record else "default", (record and record.get("submitted_at")) or time.time())
    state, new_attempt = conn.eval(_REQUEUE, 6, keys.job(job_id), keys.running_set(), keys.recovering_set(),
                                   keys.gangs(), keys.gang(job_id), keys.reservations(), attempt, max_recoveries,
                                   time.time(), job_id, reason, sc)
    state = text(state)
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
    record = JobRecord.find(conn, job_id, "gang", "attempt")
    state = record.state if record else None
    if state is JobState.RUNNING and worker in record.gang:
        return "start", record.gang.index(worker), record.attempt
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
