"""A job's status hash `trainer:job:<id>` (fields in docs/redis.md): the one module that reads and writes it.

`JobRecord` is modelled on rq's `Job`: `JobRecord.fetch(conn, id)` reads the hash into typed fields, `refresh()`
re-reads it (or a few fields), `save(...)` writes fields back, and `status()` adds the values computed on read.
Every state change is one Lua script below, so two processes racing (a cancel and a worker starting the job; two
workers recovering the same job) can never both win. The states and their diagram: worker/states.py.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from string import Template
from typing import Any

import redis

from worker import keys, notify
from worker.errors import NoSuchJobError
from worker.hashcodec import HashCodec, decode_reply
from worker.states import JobState
from worker.users import OPERATOR

JOB_CODEC = HashCodec(
    ints=frozenset({"epoch", "epochs", "gpus", "num_nodes", "attempt", "recoveries", "exit_code", "resumed_from",
                    "step", "global_step", "trial"}),
    floats=frozenset({"progress", "best_val_acc", "val_acc", "train_acc", "train_loss", "val_loss", "lr",
                      "images_per_sec", "submitted_at", "started_at", "ended_at", "updated_at", "attempt_started_at",
                      "timeout", "test_acc", "epoch_seconds", "recovered_at", "gang_since"}),
    jsons=frozenset({"config", "dataset", "log_tail", "artifacts", "overrides", "params", "gang", "rendezvous"}),
)
"""Field types of the status hash; every other field is text."""

encode_fields = JOB_CODEC.encode

GUARANTEED = ("state", "progress", "epoch", "epochs", "error", "artifacts", "best_val_acc", "worker", "submitted_at",
              "started_at", "ended_at")
"""Keys `JobRecord.status()` always has (None when the hash lacks them)."""


class JobRecord:
    """One job's status hash, typed. `fields` holds what was read (all fields, or the few a caller asked for)."""

    def __init__(self, conn: redis.Redis, job_id: str, fields: dict[str, Any] | None = None):
        self.conn = conn
        self.id = keys.check_job_id(job_id)
        self.key = keys.job(self.id)
        self.fields: dict[str, Any] = dict(fields or {})

    def __repr__(self) -> str:
        return f"JobRecord({self.id!r}, state={self.fields.get('state')!r})"

    # ----------------------------------------------------------------------------------------------------- reading
    @staticmethod
    def _ask(client: Any, key: str, names: tuple[str, ...]) -> Any:
        """Queue (pipeline) or send the read: every field, or `state` plus the named ones."""
        return client.hmget(key, ["state", *names]) if names else client.hgetall(key)

    @staticmethod
    def _parse(reply: Any, names: tuple[str, ...]) -> dict[str, Any] | None:
        """The typed fields of a reply; None when the job does not exist (every job has a `state`)."""
        if names:
            values = dict(zip(("state", *names), reply))
            if values["state"] is None:
                return None
            return {k: None if v is None else JOB_CODEC.decode_value(k, v) for k, v in values.items()}
        return JOB_CODEC.decode(reply) if reply else None

    @classmethod
    def find(cls, conn: redis.Redis, job_id: str, *names: str) -> JobRecord | None:
        """The job's record (every field, or only `names` and `state`), or None when there is no such job."""
        record = cls(conn, job_id)
        return record if record.refresh(*names) else None

    @classmethod
    def fetch(cls, conn: redis.Redis, job_id: str, *names: str) -> JobRecord:
        """Like `find`, but a missing job raises NoSuchJobError (as rq's `Job.fetch`)."""
        record = cls.find(conn, job_id, *names)
        if record is None:
            raise NoSuchJobError(f"no such job {job_id!r}")
        return record

    @classmethod
    def fetch_many(cls, conn: redis.Redis, job_ids: Iterable[str], *names: str) -> dict[str, JobRecord | None]:
        """Records of many jobs in one round trip, in the order given; None for a job that does not exist."""
        records = [cls(conn, job_id) for job_id in job_ids]
        if not records:
            return {}
        with conn.pipeline(transaction=False) as pipe:
            for record in records:
                cls._ask(pipe, record.key, names)
            replies = pipe.execute()
        out: dict[str, JobRecord | None] = {}
        for record, reply in zip(records, replies):
            fields = cls._parse(reply, names)
            record.fields = fields or {}
            out[record.id] = record if fields is not None else None
        return out

    def refresh(self, *names: str) -> bool:
        """Re-read every field (or `state` and `names` only, keeping the others); False when the job is gone."""
        fields = self._parse(self._ask(self.conn, self.key, names), names)
        if fields is None:
            self.fields = {}
            return False
        self.fields = {**self.fields, **fields} if names else fields
        return True

    def exists(self) -> bool:
        """Whether the job's hash is still there (writers check it: a deleted job must not come back in part)."""
        return bool(self.conn.exists(self.key))

    def get(self, name: str, default: Any = None) -> Any:
        value = self.fields.get(name)
        return default if value is None else value

    @property
    def state(self) -> JobState | None:
        return JobState.parse(self.fields.get("state"))

    @property
    def worker(self) -> str:
        """The worker running it; '' while queued or recovering."""
        return self.get("worker", "")

    @property
    def attempt(self) -> int:
        """Attempts started after the first (0 for the first)."""
        return int(self.get("attempt", 0))

    @property
    def gpus(self) -> int:
        return int(self.get("gpus", 1))

    @property
    def priority(self) -> str:
        return self.get("priority", "default")

    @property
    def num_nodes(self) -> int:
        """Workers (machines) the job spans; 1 for a one-node job."""
        return int(self.get("num_nodes", 1))

    @property
    def gang(self) -> list[str]:
        """A running multi-node job's workers, by node rank (node 0 first); [] otherwise."""
        return list(self.get("gang", []))

    @property
    def rq_job(self) -> str | None:
        """RQ's id of the current attempt."""
        return self.get("rq_job")

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config (a dict; empty when missing)."""
        return dict(self.get("config", {}))

    @property
    def timeout(self) -> float | None:
        """Wall-clock limit of one attempt in seconds (None: none)."""
        return self.get("timeout")

    @property
    def epoch(self) -> int:
        """The last completed epoch (0 before the first)."""
        return int(self.get("epoch", 0))

    @property
    def cancel_requested(self) -> bool:
        return self.get("cancel_requested") == "1"

    def status(self, now: float | None = None) -> dict[str, Any]:
        """Every field plus the values computed on read: a guaranteed set of keys, `duration`, `eta`, `final`."""
        now = now or time.time()
        st = dict(self.fields)
        for key in GUARANTEED:
            st.setdefault(key, None)
        st["progress"] = float(st["progress"] or 0.0)
        st["epoch"] = int(st["epoch"] or 0)
        st["owner"] = st.get("owner") or OPERATOR  # who submitted it; jobs made before users are the operator's
        start, end = st.get("started_at"), st.get("ended_at")
        st["duration"] = round((end or now) - start, 1) if start else None
        st["eta"] = None
        if self.state is JobState.RUNNING and start and 0 < st["progress"] < 1:
            began = st.get("attempt_started_at") or start
            # progress made in this attempt only (a resumed attempt starts from its checkpoint's progress)
            base = (st.get("resumed_from") or 0) / st["epochs"] if st.get("epochs") else 0.0
            done = st["progress"] - base
            if done > 0:
                st["eta"] = round((now - began) * (1 - st["progress"]) / done, 1)
        st["final"] = self.state is not None and self.state.is_final
        return st

    # ----------------------------------------------------------------------------------------------------- writing
    @staticmethod
    def create(pipe: Any, fields: dict[str, Any]) -> None:
        """Write a new job's hash (submission; `pipe` is its MULTI/EXEC pipeline, so the job lands whole)."""
        pipe.hset(keys.job(fields["id"]), mapping=encode_fields(fields))

    def save(self, **fields: Any) -> None:
        """HSET `fields` (and `updated_at`) on an existing job only: a deleted job must not come back as a half hash."""
        if self.exists():
            fields = {**fields, "updated_at": time.time()}
            self.conn.hset(self.key, mapping=encode_fields(fields))
            self.fields.update(fields)


# ------------------------------------------------------------------------------------------- state transitions
def state_script(script: str) -> str:
    """A script with `$RUNNING`-style placeholders filled with the states' values (quoted Lua strings)."""
    return Template(script).substitute({state.name: f"'{state.value}'" for state in JobState})


def _count_recovery(what: str) -> str:
    """Lua lines of both re-queue scripts: count this recovery unless ARGV[2] (the cap) is -1; past the cap the job
    fails as WorkerLost, its error saying `what` happened how often (ARGV[3]: now, ARGV[5]: the reason)."""
    return '''local recoveries = tonumber(redis.call('HGET', KEYS[1], 'recoveries') or '0')
if tonumber(ARGV[2]) >= 0 then
  recoveries = recoveries + 1
  redis.call('HSET', KEYS[1], 'recoveries', recoveries)
  if recoveries > tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[1], 'state', $FAILED, 'ended_at', ARGV[3], 'updated_at', ARGV[3],
               'error', 'WHAT ' .. recoveries .. ' times (' .. ARGV[5] .. '); not retrying again',
               'error_kind', 'WorkerLost')
    return {$FAILED, 0}
  end
end
'''.replace("WHAT", what)


# KEYS: job hash, running set, recovering set. ARGV: worker, now, rq job id, job id.
_START = state_script("""
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= $QUEUED and state ~= $RECOVERING then return state or 'missing' end
redis.call('HSET', KEYS[1], 'state', $RUNNING, 'worker', ARGV[1], 'attempt_started_at', ARGV[2],
           'updated_at', ARGV[2], 'rq_job', ARGV[3])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'waiting', 'error', 'error_kind', 'exit_code', 'log_tail')  -- an earlier attempt's
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('SREM', KEYS[3], ARGV[4])
return 'ok'
""")

# KEYS: job hash, running set. ARGV: worker, new state, now, job id, then field/value pairs.
_FINISH = state_script("""
local state = redis.call('HGET', KEYS[1], 'state')
local owner = redis.call('HGET', KEYS[1], 'worker')
if state ~= $RUNNING or owner ~= ARGV[1] then return state or 'missing' end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'ended_at', ARGV[3], 'updated_at', ARGV[3])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SREM', KEYS[2], ARGV[4])
return 'ok'
""")

# KEYS: job hash, running set, recovering set. ARGV: now, job id.
_CANCEL = state_script("""
local state = redis.call('HGET', KEYS[1], 'state')
if state == $QUEUED or state == $RECOVERING then
  redis.call('HSET', KEYS[1], 'state', $CANCELLED, 'ended_at', ARGV[1], 'updated_at', ARGV[1],
             'error', 'cancelled before it ran', 'cancel_requested', '1')
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('SREM', KEYS[3], ARGV[2])
  return $CANCELLED
end
if state == $RUNNING then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[1])
  return 'requested'
end
return state or 'missing'
""")

# KEYS: job hash, running set, recovering set.
# ARGV: worker that must own it, max recoveries (-1: do not count), now, job id, reason.
# The claim is the recovery's mutual exclusion: only the caller that flips running → recovering re-enqueues.
_REQUEUE = state_script("""
local state = redis.call('HGET', KEYS[1], 'state')
local owner = redis.call('HGET', KEYS[1], 'worker')
if state ~= $RUNNING or owner ~= ARGV[1] then return {state or 'missing', 0} end
redis.call('SREM', KEYS[2], ARGV[4])
""" + _count_recovery("its worker died") + """local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', $RECOVERING, 'worker', '', 'previous_worker', ARGV[1],
           'recovered_at', ARGV[3], 'updated_at', ARGV[3], 'recovery_reason', ARGV[5])
redis.call('SADD', KEYS[3], ARGV[4])
return {$RECOVERING, attempt}
""")


def mark_started(conn: redis.Redis, job_id: str, worker: str, rq_id: str) -> str:
    """queued/recovering → running, owned by `worker`. Returns 'ok' or the state that prevented it."""
    return decode_reply(conn.eval(_START, 3, keys.job(job_id), keys.running_set(), keys.recovering_set(), worker,
                          time.time(), rq_id, job_id))


def mark_final(conn: redis.Redis, job_id: str, worker: str, state: JobState, fields: dict[str, Any]) -> str:
    """running (owned by `worker`) → a final state with `fields`. 'ok', or the state that prevented it."""
    args: list[Any] = [worker, state.value, time.time(), job_id]
    for k, v in encode_fields(fields).items():
        args += [k, v]
    result = decode_reply(conn.eval(_FINISH, 2, keys.job(job_id), keys.running_set(), *args))
    if result == "ok":
        notify.job_event(conn, job_id)
    return result


def request_cancel(conn: redis.Redis, job_id: str) -> str:
    """$CANCELLED (was waiting), 'requested' (running: its worker stops it) or the final state it already had."""
    result = decode_reply(conn.eval(_CANCEL, 3, keys.job(job_id), keys.running_set(), keys.recovering_set(), time.time(),
                            job_id))
    if result == JobState.CANCELLED:
        notify.job_event(conn, job_id)
    return result


def claim_for_requeue(
    conn: redis.Redis, job_id: str, owner: str, *, max_recoveries: int, reason: str
) -> tuple[str, int]:
    """running (owned by `owner`) → recovering; ($RECOVERING, new attempt), ($FAILED, 0) past the cap, or
    (current state, 0) when someone else already moved it. `max_recoveries=-1` does not count this one."""
    state, attempt = conn.eval(_REQUEUE, 3, keys.job(job_id), keys.running_set(), keys.recovering_set(), owner,
                               max_recoveries, time.time(), job_id, reason)
    if decode_reply(state) == JobState.FAILED:  # past the recovery cap
        notify.job_event(conn, job_id)
    return decode_reply(state), int(attempt)


# ---------------------------------------------------------------------------------- multi-node gang transitions
# The atomic steps of worker/gang.py (which holds the rules and says why): reserve, drop, release, re-queue.

# KEYS: job hash, gang hash, reservations hash, gangs zset, running set, recovering set, nodes hash.
# ARGV: worker, now, job id, worker slots.
_GANG_RESERVE = state_script("""
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
_GANG_DROP = state_script("""
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
_GANG_RELEASE = state_script("""
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
_GANG_REQUEUE = state_script("""
local state = redis.call('HGET', KEYS[1], 'state')
local attempt = redis.call('HGET', KEYS[1], 'attempt') or '0'
if state ~= $RUNNING or attempt ~= ARGV[1] then return {state or 'missing', 0} end
redis.call('SREM', KEYS[2], ARGV[4])
for _, name in ipairs(redis.call('HKEYS', KEYS[5])) do
  if redis.call('HGET', KEYS[6], name) == ARGV[4] then redis.call('HDEL', KEYS[6], name) end
end
redis.call('DEL', KEYS[5])
""" + _count_recovery("a node was lost") + """local new_attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
local nodes = redis.call('HGET', KEYS[1], 'num_nodes') or '1'
redis.call('HSET', KEYS[1], 'state', $RECOVERING, 'previous_worker', redis.call('HGET', KEYS[1], 'worker') or '',
           'worker', '', 'recovered_at', ARGV[3], 'updated_at', ARGV[3], 'recovery_reason', ARGV[5],
           'waiting', '0 of ' .. nodes .. ' workers reserved')
redis.call('HDEL', KEYS[1], 'gang_since', 'rendezvous')
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[4])
return {$RECOVERING, new_attempt}
""")


def gang_reserve(conn: redis.Redis, job_id: str, worker: str, slots: int) -> tuple[str, int]:
    """One reservation: ('reserved', members so far), ('started', N) when it completed the gang (queued/recovering →
    running, node ranks in reservation order), or why not: 'busy', 'unfit', 'full', 'gone'."""
    result, count = conn.eval(_GANG_RESERVE, 7, keys.job(job_id), keys.gang(job_id), keys.reservations(),
                              keys.gangs(), keys.running_set(), keys.recovering_set(), keys.nodes(job_id),
                              worker, time.time(), job_id, int(slots))
    return decode_reply(result), int(count)


def gang_drop(conn: redis.Redis, job_id: str, names: list[str]) -> int:
    """Remove workers from a gang still gathering; the members left, or -1 when the job no longer gathers."""
    return int(conn.eval(_GANG_DROP, 3, keys.job(job_id), keys.gang(job_id), keys.reservations(), time.time(),
                         job_id, *names))


def gang_release(conn: redis.Redis, job_id: str, *, timeout: float | None, note: str = "") -> bool:
    """Release a gathering gang whose first reservation is `timeout` s old (`waiting` becomes `note`); with
    timeout None (cancel, delete) release it whatever its age and take the job out of the waiting ZSET."""
    return bool(conn.eval(_GANG_RELEASE, 4, keys.job(job_id), keys.gang(job_id), keys.reservations(), keys.gangs(),
                          time.time(), "force" if timeout is None else timeout, job_id, note))


def gang_requeue(conn: redis.Redis, job_id: str, attempt: int, *, max_recoveries: int, reason: str,
                 score: float) -> tuple[str, int]:
    """Attempt `attempt` of a running multi-node job → recovering, back in the waiting ZSET at `score`:
    ($RECOVERING, new attempt), ($FAILED, 0) past the cap, or (the state, 0) when another caller moved it on."""
    state, new_attempt = conn.eval(_GANG_REQUEUE, 6, keys.job(job_id), keys.running_set(), keys.recovering_set(),
                                   keys.gangs(), keys.gang(job_id), keys.reservations(), attempt, max_recoveries,
                                   time.time(), job_id, reason, score)
    if decode_reply(state) == JobState.FAILED:
        notify.job_event(conn, job_id)
    return decode_reply(state), int(new_attempt)
