"""A job's status hash and its state machine. Every state change is one Lua script, so two processes racing
(a cancel and a worker starting the job; two workers recovering the same job) can never both win.

    queued ──start──▶ running ──▶ finished | failed | cancelled
      │                 │  ▲
      │            worker died / shut down
      │                 ▼  │ start
      └──cancel──▶ cancelled   recovering ──cancel──▶ cancelled
"""
from __future__ import annotations

import json
import time
from enum import Enum
from typing import Any

import redis

from worker import keys


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    RECOVERING = "recovering"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PRUNED = "pruned"
    """A sweep's trial that its pruner stopped early (distinct from cancelled and failed)."""

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.FINISHED, JobState.FAILED, JobState.CANCELLED, JobState.PRUNED})

INT_FIELDS = ("epoch", "epochs", "gpus", "num_nodes", "attempt", "recoveries", "exit_code", "resumed_from", "step",
              "global_step", "trial")
FLOAT_FIELDS = (
    "progress", "best_val_acc", "val_acc", "train_acc", "train_loss", "val_loss", "lr", "images_per_sec",
    "submitted_at", "started_at", "ended_at", "updated_at", "attempt_started_at", "timeout", "test_acc",
    "epoch_seconds", "gang_since",
)
JSON_FIELDS = ("config", "dataset", "log_tail", "artifacts", "overrides", "params", "gang", "rendezvous")

# KEYS: job hash, running set, recovering set. ARGV: worker, now, rq job id, job id.
_START = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'recovering' then return state or 'missing' end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'attempt_started_at', ARGV[2],
           'updated_at', ARGV[2], 'rq_job', ARGV[3])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'waiting', 'error', 'error_kind', 'exit_code', 'log_tail')  -- an earlier attempt's
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('SREM', KEYS[3], ARGV[4])
return 'ok'
"""

# KEYS: job hash, running set. ARGV: worker, new state, now, job id, then field/value pairs.
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
local owner = redis.call('HGET', KEYS[1], 'worker')
if state ~= 'running' or owner ~= ARGV[1] then return state or 'missing' end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'ended_at', ARGV[3], 'updated_at', ARGV[3])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SREM', KEYS[2], ARGV[4])
return 'ok'
"""

# KEYS: job hash, running set, recovering set. ARGV: now, job id.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'recovering' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'ended_at', ARGV[1], 'updated_at', ARGV[1],
             'error', 'cancelled before it ran', 'cancel_requested', '1')
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('SREM', KEYS[3], ARGV[2])
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[1])
  return 'requested'
end
return state or 'missing'
"""

# KEYS: job hash, running set, recovering set.
# ARGV: worker that must own it, max recoveries (-1: do not count), now, job id, reason.
# The claim is the recovery's mutual exclusion: only the caller that flips running → recovering re-enqueues.
_REQUEUE = """
local state = redis.call('HGET', KEYS[1], 'state')
local owner = redis.call('HGET', KEYS[1], 'worker')
if state ~= 'running' or owner ~= ARGV[1] then return {state or 'missing', 0} end
redis.call('SREM', KEYS[2], ARGV[4])
local recoveries = tonumber(redis.call('HGET', KEYS[1], 'recoveries') or '0')
if tonumber(ARGV[2]) >= 0 then
  recoveries = recoveries + 1
  redis.call('HSET', KEYS[1], 'recoveries', recoveries)
  if recoveries > tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[1], 'state', 'failed', 'ended_at', ARGV[3], 'updated_at', ARGV[3],
               'error', 'its worker died ' .. recoveries .. ' times (' .. ARGV[5] .. '); not retrying again',
               'error_kind', 'WorkerLost')
    return {'failed', 0}
  end
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'recovering', 'worker', '', 'previous_worker', ARGV[1],
           'recovered_at', ARGV[3], 'updated_at', ARGV[3], 'recovery_reason', ARGV[5])
redis.call('SADD', KEYS[3], ARGV[4])
return {'recovering', attempt}
"""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_status(raw: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    """Hash fields (all strings in Redis) → typed values; empty strings become None."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key, val = _text(k), _text(v)
        if val == "":
            out[key] = None
        elif key in INT_FIELDS:
            try:
                out[key] = int(float(val))
            except ValueError:
                out[key] = None
        elif key in FLOAT_FIELDS:
            try:
                out[key] = float(val)
            except ValueError:
                out[key] = None
        elif key in JSON_FIELDS:
            try:
                out[key] = json.loads(val)
            except json.JSONDecodeError:
                out[key] = val
        else:
            out[key] = val
    return out


def encode_fields(fields: dict[str, Any]) -> dict[str, str]:
    """Typed values → hash strings (dicts/lists as JSON, None as empty)."""
    out = {}
    for k, v in fields.items():
        if v is None:
            out[k] = ""
        elif isinstance(v, bool):
            out[k] = "1" if v else "0"
        elif isinstance(v, (dict, list, tuple)):
            out[k] = json.dumps(v)
        else:
            out[k] = str(v)
    return out


def read_status(conn: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """The parsed status hash, or None when there is no such job."""
    raw = conn.hgetall(keys.job(job_id))
    return parse_status(raw) if raw else None


def update_fields(conn: redis.Redis, job_id: str, fields: dict[str, Any]) -> None:
    """HSET on an existing job only (a deleted job must not come back as a half hash)."""
    with conn.pipeline() as pipe:
        pipe.exists(keys.job(job_id))
        exists = pipe.execute()[0]
    if exists:
        conn.hset(keys.job(job_id), mapping=encode_fields({**fields, "updated_at": time.time()}))


def mark_started(conn: redis.Redis, job_id: str, worker: str, rq_id: str) -> str:
    """queued/recovering → running, owned by `worker`. Returns 'ok' or the state that prevented it."""
    return _text(conn.eval(_START, 3, keys.job(job_id), keys.running_set(), keys.recovering_set(), worker,
                           time.time(), rq_id, job_id))


def mark_final(conn: redis.Redis, job_id: str, worker: str, state: JobState, fields: dict[str, Any]) -> str:
    """running (owned by `worker`) → a final state with `fields`. 'ok', or the state that prevented it."""
    args: list[Any] = [worker, state.value, time.time(), job_id]
    for k, v in encode_fields(fields).items():
        args += [k, v]
    return _text(conn.eval(_FINISH, 2, keys.job(job_id), keys.running_set(), *args))


def request_cancel(conn: redis.Redis, job_id: str) -> str:
    """'cancelled' (was waiting), 'requested' (running: its worker stops it) or the final state it already had."""
    return _text(conn.eval(_CANCEL, 3, keys.job(job_id), keys.running_set(), keys.recovering_set(), time.time(),
                           job_id))


def claim_for_requeue(
    conn: redis.Redis, job_id: str, owner: str, *, max_recoveries: int, reason: str
) -> tuple[str, int]:
    """running (owned by `owner`) → recovering; ('recovering', new attempt), ('failed', 0) past the cap, or
    (current state, 0) when someone else already moved it. `max_recoveries=-1` does not count this one."""
    state, attempt = conn.eval(_REQUEUE, 3, keys.job(job_id), keys.running_set(), keys.recovering_set(), owner,
                               max_recoveries, time.time(), job_id, reason)
    return _text(state), int(attempt)
