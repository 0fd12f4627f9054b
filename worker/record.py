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

from worker import keys
from worker.errors import NoSuchJobError
from worker.hashcodec import HashCodec, text
from worker.states import JobState

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
        with self.conn.pipeline() as pipe:
            pipe.exists(self.key)
            exists = pipe.execute()[0]
        if exists:
            fields = {**fields, "updated_at": time.time()}
            self.conn.hset(self.key, mapping=encode_fields(fields))
            self.fields.update(fields)


# ------------------------------------------------------------------------------------------- state transitions
def state_script(script: str) -> str:
    """A script with `$RUNNING`-style placeholders filled with the states' values (quoted Lua strings)."""
    return Template(script).substitute({state.name: f"'{state.value}'" for state in JobState})


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
local recoveries = tonumber(redis.call('HGET', KEYS[1], 'recoveries') or '0')
if tonumber(ARGV[2]) >= 0 then
  recoveries = recoveries + 1
  redis.call('HSET', KEYS[1], 'recoveries', recoveries)
  if recoveries > tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[1], 'state', $FAILED, 'ended_at', ARGV[3], 'updated_at', ARGV[3],
               'error', 'its worker died ' .. recoveries .. ' times (' .. ARGV[5] .. '); not retrying again',
               'error_kind', 'WorkerLost')
    return {$FAILED, 0}
  end
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', $RECOVERING, 'worker', '', 'previous_worker', ARGV[1],
           'recovered_at', ARGV[3], 'updated_at', ARGV[3], 'recovery_reason', ARGV[5])
redis.call('SADD', KEYS[3], ARGV[4])
return {$RECOVERING, attempt}
""")


def mark_started(conn: redis.Redis, job_id: str, worker: str, rq_id: str) -> str:
    """queued/recovering → running, owned by `worker`. Returns 'ok' or the state that prevented it."""
    return text(conn.eval(_START, 3, keys.job(job_id), keys.running_set(), keys.recovering_set(), worker,
                          time.time(), rq_id, job_id))


def mark_final(conn: redis.Redis, job_id: str, worker: str, state: JobState, fields: dict[str, Any]) -> str:
    """running (owned by `worker`) → a final state with `fields`. 'ok', or the state that prevented it."""
    args: list[Any] = [worker, state.value, time.time(), job_id]
    for k, v in encode_fields(fields).items():
        args += [k, v]
    return text(conn.eval(_FINISH, 2, keys.job(job_id), keys.running_set(), *args))


def request_cancel(conn: redis.Redis, job_id: str) -> str:
    """$CANCELLED (was waiting), 'requested' (running: its worker stops it) or the final state it already had."""
    return text(conn.eval(_CANCEL, 3, keys.job(job_id), keys.running_set(), keys.recovering_set(), time.time(),
                          job_id))


def claim_for_requeue(
    conn: redis.Redis, job_id: str, owner: str, *, max_recoveries: int, reason: str
) -> tuple[str, int]:
    """running (owned by `owner`) → recovering; ($RECOVERING, new attempt), ($FAILED, 0) past the cap, or
    (current state, 0) when someone else already moved it. `max_recoveries=-1` does not count this one."""
    state, attempt = conn.eval(_REQUEUE, 3, keys.job(job_id), keys.running_set(), keys.recovering_set(), owner,
                               max_recoveries, time.time(), job_id, reason)
    return text(state), int(attempt)
