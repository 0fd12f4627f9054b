"""Throttling wrong sign-in tries (the dashboard's token or password form; README "Dashboard access").

The counters live in Redis, not in the browser session, so that opening a new session (a new tab, a cleared cookie, a
script) does not start over: every wrong try counts against both the session and the client's address. After
FREE_TRIES wrong tries, the next try is not even checked until a delay has passed; the delay doubles with each further
wrong try (FIRST_DELAY, 2×, 4×, … up to MAX_DELAY). A subject's counter is forgotten WINDOW seconds after its last
wrong try, and a successful sign-in clears the counters it was checked against.
"""
from __future__ import annotations

import time

import redis

from worker import keys
from worker.hashcodec import decode_reply

FREE_TRIES = 5
"""Wrong tries allowed before any delay."""

FIRST_DELAY = 2.0
"""Seconds to wait after the FREE_TRIES-th wrong try; each further wrong try doubles it."""

MAX_DELAY = 300.0
"""Longest wait between two checked tries, in seconds."""

WINDOW = 900
"""Seconds after the last wrong try at which a subject's counter is forgotten."""

ANONYMOUS = "anonymous"
"""The audit log's actor for a sign-in try that named no known user."""


def subjects(address: str | None, session_id: str | None) -> list[str]:
    """What a try counts against: the client's address (`local` when it came over loopback) and the session."""
    out = [f"addr:{address or 'local'}"]
    if session_id:
        out.append(f"session:{session_id}")
    return out


def delay_after(failures: int) -> float:
    """Seconds to wait before the next try is checked, after `failures` wrong ones."""
    if failures < FREE_TRIES:
        return 0.0
    return min(MAX_DELAY, FIRST_DELAY * 2 ** (failures - FREE_TRIES))


def wait_left(conn: redis.Redis, subjects_: list[str], now: float | None = None) -> float:
    """Seconds until a try from these subjects may be checked (0: now)."""
    now = time.time() if now is None else now
    pipe = conn.pipeline(transaction=False)
    for s in subjects_:
        pipe.hget(keys.sign_in_failures(s), "until")
    until = [float(decode_reply(u)) for u in pipe.execute() if u is not None]
    return max([0.0, *(u - now for u in until)])


def failed(conn: redis.Redis, subjects_: list[str], now: float | None = None) -> float:
    """Count a wrong try against every subject; the seconds to wait before the next one is checked."""
    now = time.time() if now is None else now
    pipe = conn.pipeline(transaction=True)
    for s in subjects_:
        pipe.hincrby(keys.sign_in_failures(s), "failures", 1)
    counts = pipe.execute()
    wait = delay_after(max(counts))
    pipe = conn.pipeline(transaction=True)
    for s, n in zip(subjects_, counts):
        pipe.hset(keys.sign_in_failures(s), "until", str(now + delay_after(n)))
        pipe.expire(keys.sign_in_failures(s), WINDOW)
    pipe.execute()
    return wait


def succeeded(conn: redis.Redis, subjects_: list[str]) -> None:
    """A checked try was right: its subjects start over."""
    conn.delete(*(keys.sign_in_failures(s) for s in subjects_))
