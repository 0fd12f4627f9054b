"""The audit log: who did what, when, from where (README "Users and roles").

Every change made through `worker.api` or the CLI (submit, cancel, retry, delete, register, alias, deploy, undeploy,
user and setting changes) and every sign-in, failed sign-in and log-out is appended to one capped Redis stream
(`trainer:audit`). Admins read it on the dashboard and export it as JSON lines (`python -m worker audit --json`).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import logging
import time
from collections.abc import Iterator
from typing import IO, Any

import redis

from worker import keys
from worker.errors import PermissionDeniedError
from worker.hashcodec import decode_reply
from worker.users import Action, Actor, acting

log = logging.getLogger(__name__)

AUDIT_MAXLEN = 200_000
"""Entries kept (approximately; about 250 bytes each): older ones are trimmed."""


class AuditAction(str, enum.Enum):
    """Every action the log records (the `action` field)."""

    JOB_SUBMIT = "job.submit"
    JOB_CANCEL = "job.cancel"
    JOB_RETRY = "job.retry"
    JOB_DELETE = "job.delete"
    SWEEP_CREATE = "sweep.create"
    SWEEP_CANCEL = "sweep.cancel"
    DATASET_REGISTER = "dataset.register"
    DATASET_REMOVE = "dataset.remove"
    MODEL_REGISTER = "model.register"
    MODEL_ALIAS = "model.alias"
    MODEL_REMOVE = "model.remove"
    DEPLOY = "deployment.create"
    UNDEPLOY = "deployment.stop"
    DEPLOY_TOKEN = "deployment.token"
    HOOK_ADD = "hook.add"
    HOOK_REMOVE = "hook.remove"
    USER_ADD = "user.add"
    USER_ROLE = "user.role"
    USER_LIMITS = "user.limits"
    USER_TOKEN = "user.token"
    USER_REMOVE = "user.remove"
    SETTING = "setting.change"
    GC = "storage.gc"
    SIGN_IN = "session.sign_in"
    SIGN_IN_FAILED = "session.sign_in_failed"
    SIGN_OUT = "session.sign_out"
    DENIED = "permission.denied"


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    """One line of the log (what the JSON-lines export writes, one object per line)."""

    id: str
    """The stream entry id (time-ordered)."""
    ts: float
    actor: str
    role: str
    action: str
    target: str
    source: str
    address: str | None = None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


def record(conn: redis.Redis, actor: Actor, action: AuditAction, target: str = "", **detail: Any) -> None:
    """Append one entry. A failure to write is logged, not raised: the change it records has already happened."""
    entry = {"ts": time.time(), "actor": actor.name, "role": actor.role.value, "action": AuditAction(action).value,
             "target": target, "source": actor.source, "address": actor.address, "detail": detail}
    try:
        conn.xadd(keys.audit(), {"entry": json.dumps(entry, default=str)}, maxlen=AUDIT_MAXLEN, approximate=True)
    except redis.RedisError as err:
        log.warning("audit log not written (%s): %s", err, entry)


def authorize(conn: redis.Redis, actor: Actor | None, action: Action, what: str, owner: str | None = None) -> Actor:
    """The convention every changing function follows (README "Users and roles"): the actor it runs as
    (`users.acting`), checked for `action` on a thing made by `owner`. A refusal is logged (`permission.denied`, with
    `what`) and raised as PermissionDeniedError; nothing was changed."""
    actor = acting(conn, actor)
    try:
        actor.require(action, what, owner=owner)
    except PermissionDeniedError as err:
        record(conn, actor, AuditAction.DENIED, what, reason=str(err))
        raise
    return actor


def _entry(entry_id: Any, fields: dict[Any, Any]) -> AuditEntry:
    raw = fields.get(b"entry", fields.get("entry"))
    data = json.loads(decode_reply(raw)) if raw is not None else {}
    return AuditEntry(id=decode_reply(entry_id), ts=float(data.get("ts", 0.0)), actor=data.get("actor", ""),
                      role=data.get("role", ""), action=data.get("action", ""), target=data.get("target", ""),
                      source=data.get("source", ""), address=data.get("address"), detail=data.get("detail") or {})


def entries(conn: redis.Redis, *, since: float | None = None, actor: str | None = None, limit: int | None = None,
            batch: int = 1000) -> Iterator[AuditEntry]:
    """The log oldest first, from `since` (unix seconds), only `actor`'s entries if given; with `limit`, the newest
    `limit` of those (what a tail of the log shows)."""
    start = f"{int(since * 1000)}-0" if since else "-"
    if limit is not None:
        yield from reversed(list(_newest(conn, start, actor, limit, batch)))
        return
    while True:
        chunk = conn.xrange(keys.audit(), min=start, max="+", count=batch)
        for entry_id, fields in chunk:
            e = _entry(entry_id, fields)
            if actor is None or e.actor == actor:
                yield e
        if len(chunk) < batch:
            return
        start = "(" + decode_reply(chunk[-1][0])


def _newest(conn: redis.Redis, start: str, actor: str | None, limit: int, batch: int) -> Iterator[AuditEntry]:
    """Newest first, down to `start`, at most `limit` entries (of `actor` only if given)."""
    top, sent = "+", 0
    while sent < limit:
        count = batch if actor else min(batch, limit - sent)
        chunk = conn.xrevrange(keys.audit(), max=top, min=start, count=count)
        for entry_id, fields in chunk:
            e = _entry(entry_id, fields)
            if actor is None or e.actor == actor:
                yield e
                sent += 1
                if sent >= limit:
                    return
        if len(chunk) < count:
            return
        top = "(" + decode_reply(chunk[-1][0])


def export_jsonl(conn: redis.Redis, out: IO[str], *, since: float | None = None, actor: str | None = None,
                 limit: int | None = None) -> int:
    """Write the log as JSON lines (one AuditEntry per line); how many were written."""
    n = 0
    for e in entries(conn, since=since, actor=actor, limit=limit):
        out.write(json.dumps(dataclasses.asdict(e), default=str) + "\n")
        n += 1
    return n


def newest(conn: redis.Redis, *, limit: int, actor: str | None = None, actions: set[str] | None = None,
           batch: int = 1000) -> list[AuditEntry]:
    """At most `limit` entries, newest first, only `actor`'s and only `actions` if given (the dashboard's Audit
    page: it reads backwards from the end, so a filter on a long log stops as soon as it has enough)."""
    out: list[AuditEntry] = []
    end = "+"
    while len(out) < limit:
        chunk = conn.xrevrange(keys.audit(), max=end, min="-", count=batch)
        for entry_id, fields in chunk:
            e = _entry(entry_id, fields)
            if (actor is None or e.actor == actor) and (not actions or e.action in actions):
                out.append(e)
                if len(out) >= limit:
                    break
        if len(chunk) < batch:
            break
        end = "(" + decode_reply(chunk[-1][0])
    return out
