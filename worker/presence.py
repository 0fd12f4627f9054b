"""Worker advertisements: each live worker keeps a hash with a short TTL refreshed by its heartbeat, so a worker that
died (SIGKILL, lost machine) disappears by itself within the TTL, and nobody has to clean up after it.
"""
from __future__ import annotations

import os
import time
from typing import Any

import redis

from worker import keys
from worker.defaults import HEARTBEAT_TTL
from worker.hashcodec import HashCodec, decode_reply

WORKER_CODEC = HashCodec(ints=frozenset({"slots", "pid"}), floats=frozenset({"heartbeat", "started_at"}),
                         jsons=frozenset({"gpus", "queues"}))
"""Field types of a worker's advertisement (docs/redis.md, "Workers"); every other field is text."""


def heartbeat_ttl() -> int:
    """Seconds an advertisement outlives its last heartbeat: env WORKER_HEARTBEAT_TTL or the default (10 s)."""
    raw = os.environ.get("WORKER_HEARTBEAT_TTL", "").strip()
    try:
        return max(2, int(float(raw))) if raw else HEARTBEAT_TTL
    except ValueError:
        return HEARTBEAT_TTL


def advertise(conn: redis.Redis, name: str, fields: dict[str, Any], ttl: int) -> None:
    """(Re)write a worker's advertisement and extend its life by `ttl` seconds."""
    mapping = WORKER_CODEC.encode({**fields, "heartbeat": time.time()})
    with conn.pipeline() as pipe:
        pipe.hset(keys.worker(name), mapping=mapping)
        pipe.expire(keys.worker(name), ttl)
        pipe.sadd(keys.workers_set(), name)
        pipe.execute()


def withdraw(conn: redis.Redis, name: str) -> None:
    """A worker leaving cleanly removes its advertisement at once."""
    with conn.pipeline() as pipe:
        pipe.delete(keys.worker(name))
        pipe.srem(keys.workers_set(), name)
        pipe.execute()


def is_alive(conn: redis.Redis, name: str) -> bool:
    return bool(name) and bool(conn.exists(keys.worker(name)))


def list_workers(conn: redis.Redis) -> list[dict[str, Any]]:
    """Live workers (name, hostname, pid, kind, gpus [{index, name, memory_mb}], slots, torch, cuda, state,
    current_job, heartbeat, started_at, queues), sorted by name; names whose hash expired are pruned."""
    names = sorted(decode_reply(n) for n in conn.smembers(keys.workers_set()))
    if not names:
        return []
    with conn.pipeline() as pipe:
        for n in names:
            pipe.hgetall(keys.worker(n))
        raws = pipe.execute()
    out, dead = [], []
    for name, raw in zip(names, raws):
        if not raw:
            dead.append(name)
            continue
        w = WORKER_CODEC.decode(raw)
        w.update(name=name, gpus=w.get("gpus") or [], queues=w.get("queues") or [])
        out.append(w)
    if dead:
        conn.srem(keys.workers_set(), *dead)
    return out


def max_live_slots(conn: redis.Redis) -> tuple[int, list[dict[str, Any]]]:
    """(largest slot count of any live worker, the live workers); (0, []) when none is alive."""
    workers = list_workers(conn)
    return max((w.get("slots") or 0 for w in workers), default=0), workers
