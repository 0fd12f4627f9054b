"""Notifications: webhooks told when a job ends, a sweep finishes, a model version is registered or an alias moves.

- `emit(conn, event, data)` appends an event to one Redis stream (`trainer:notify:events`); the code that changes a
  state calls it right after the change (worker/record.py for jobs, the sweep driver, the model registry). It never
  blocks and never fails its caller.
- Every worker runs a `Deliverer` thread: a consumer of that stream in one consumer group, so each event is
  delivered once however many workers run. It POSTs the event's JSON to every hook subscribed to it, with a timeout,
  retrying with backoff (1, 2, 4, 8 s), and keeps a capped delivery log per hook. An event whose deliverer died is
  claimed by another after DELIVERY_CLAIM_IDLE seconds.
- A hook with a secret gets `X-Trainer-Signature: sha256=HEX`, the HMAC-SHA256 of the body with the secret. A Slack
  incoming-webhook URL (hooks.slack.com) gets Slack's `{"text": ...}` form instead of the JSON event.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import redis

from worker import audit, keys, users
from worker.errors import WorkerError
from worker.hashcodec import decode_reply

log = logging.getLogger(__name__)

EVENTS = ("job.finished", "job.failed", "job.cancelled", "sweep.finished", "model.registered", "alias.moved",
          "deployment.failed")
"""Every event a hook can subscribe to (`--events`; default: all)."""

GROUP = "delivery"
"""The consumer group of the deliverers (one delivery per event, whichever worker takes it)."""

STREAM_MAXLEN = 10_000
"""Events kept in the stream (approximately): older ones are trimmed, delivered or not."""

LOG_MAXLEN = 200
"""Delivery attempts kept per hook."""

RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)
"""Seconds between a failed delivery and the next try (five tries in all)."""

POST_TIMEOUT = 5.0
"""Seconds a hook may take to answer one POST."""

DELIVERY_CLAIM_IDLE = 60.0
"""Seconds an event may sit with a deliverer that took it before another deliverer claims it."""

DASHBOARD_URL_ENV = "DASHBOARD_URL"
"""Base URL of the dashboard for the links in events (default http://127.0.0.1:8501)."""


class HookError(WorkerError):
    """A hook could not be added or removed (bad URL or event, unknown id); nothing changed. CLI exit 2."""


@dataclasses.dataclass
class Hook:
    id: str
    url: str
    events: list[str]
    secret: str | None
    created_at: float

    @property
    def slack(self) -> bool:
        return (urlsplit(self.url).hostname or "").endswith("hooks.slack.com")

    def public(self) -> dict[str, Any]:
        """What `notify list` shows: everything but the secret."""
        return {"id": self.id, "url": self.url, "events": self.events, "signed": bool(self.secret),
                "slack": self.slack, "created_at": self.created_at}


# ----------------------------------------------------------------------------------------------------- hooks
def add_hook(conn: redis.Redis, url: str, events: list[str] | None = None, secret: str | None = None, *,
             actor: users.Actor | None = None) -> Hook:
    """A new webhook (admins only: a hook sees every job's events)."""
    actor = audit.authorize(conn, actor, users.Action.ADMIN, "add webhooks")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HookError(f"invalid hook URL {url!r}: give an http:// or https:// URL")
    chosen = list(events or EVENTS)
    unknown = [e for e in chosen if e not in EVENTS]
    if unknown:
        raise HookError(f"unknown event(s) {', '.join(unknown)}; choose from {', '.join(EVENTS)}")
    hook = Hook(secrets.token_hex(4), url, chosen, secret or None, time.time())
    conn.hset(keys.hooks(), hook.id, json.dumps(dataclasses.asdict(hook)))
    # the host only: a hook URL often carries its own secret (Slack's do)
    audit.record(conn, actor, audit.AuditAction.HOOK_ADD, hook.id, host=parts.hostname, events=chosen)
    return hook


def list_hooks(conn: redis.Redis) -> list[Hook]:
    return sorted((Hook(**json.loads(decode_reply(v))) for v in conn.hvals(keys.hooks())), key=lambda h: h.created_at)


def remove_hook(conn: redis.Redis, hook_id: str, *, actor: users.Actor | None = None) -> None:
    actor = audit.authorize(conn, actor, users.Action.ADMIN, "remove webhooks")
    if not conn.hdel(keys.hooks(), hook_id):
        raise HookError(f"no hook {hook_id!r} (hooks: {', '.join(h.id for h in list_hooks(conn)) or 'none'})")
    conn.delete(keys.hook_log(hook_id))
    audit.record(conn, actor, audit.AuditAction.HOOK_REMOVE, hook_id)


def delivery_log(conn: redis.Redis, hook_id: str, count: int = 50) -> list[dict[str, Any]]:
    """The hook's latest delivery attempts, newest first."""
    return [json.loads(decode_reply(fields[b"entry"])) for _, fields in conn.xrevrange(keys.hook_log(hook_id), count=count)]


# ----------------------------------------------------------------------------------------------------- events
def dashboard_link(page: str, **query: str) -> str:
    base = os.environ.get(DASHBOARD_URL_ENV, "").strip().rstrip("/") or "http://127.0.0.1:8501"
    return f"{base}/{page}" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


def emit(conn: redis.Redis, event: str, data: dict[str, Any]) -> None:
    """Queue an event for the hooks; a failure is logged, never raised (a notification must not fail a job)."""
    try:
        if conn.hlen(keys.hooks()):  # nobody listens: no stream grows
            payload = {"event": event, "at": time.time(), **data}
            conn.xadd(keys.notify_events(), {"event": event, "data": json.dumps(payload, default=str)},
                      maxlen=STREAM_MAXLEN, approximate=True)
    except redis.exceptions.RedisError as err:
        log.warning("notification %s not queued: %s", event, err)


def job_event(conn: redis.Redis, job_id: str) -> None:
    """The event of a job that just reached a final state, with its name, error and final metrics."""
    fields = {decode_reply(k): decode_reply(v) for k, v in conn.hgetall(keys.job(job_id)).items()}
    state = fields.get("state", "")
    if f"job.{state}" not in EVENTS:
        return
    metrics = {k: float(fields[k]) for k in ("best_val_acc", "val_acc", "test_acc", "val_loss") if fields.get(k)}
    emit(conn, f"job.{state}", {"id": job_id, "name": fields.get("name"), "state": state,
                                "error": fields.get("error") or None, "metrics": metrics,
                                "url": dashboard_link("job", job=job_id)})


# --------------------------------------------------------------------------------------------------- delivery
def _body(hook: Hook, payload: dict[str, Any]) -> bytes:
    if hook.slack:
        what = payload.get("name") or payload.get("id") or payload.get("model") or ""
        line = f"*{payload['event']}* {what}"
        if payload.get("metrics"):
            line += " — " + ", ".join(f"{k} {v:.4g}" for k, v in payload["metrics"].items())
        if payload.get("error"):
            line += f" — {payload['error']}"
        if payload.get("url"):
            line += f" <{payload['url']}|open>"
        return json.dumps({"text": line}).encode()
    return json.dumps(payload, default=str).encode()


def post(hook: Hook, payload: dict[str, Any]) -> tuple[int | None, str | None]:
    """One POST: (HTTP status or None, error or None)."""
    body = _body(hook, payload)
    headers = {"Content-Type": "application/json", "User-Agent": "image-classifier-notify",
               "X-Trainer-Event": payload["event"]}
    if hook.secret:
        headers["X-Trainer-Signature"] = "sha256=" + hmac.new(hook.secret.encode(), body, hashlib.sha256).hexdigest()
    try:
        with urllib.request.urlopen(urllib.request.Request(hook.url, data=body, headers=headers, method="POST"),
                                    timeout=POST_TIMEOUT) as resp:
            return resp.status, None
    except urllib.error.HTTPError as err:
        return err.code, f"HTTP {err.code}"
    except (OSError, ValueError) as err:
        return None, f"{type(err).__name__}: {err}"


class Deliverer(threading.Thread):
    """The worker's delivery thread (module docstring). `stop()` ends it within a couple of seconds."""

    def __init__(self, conn: redis.Redis, consumer: str) -> None:
        super().__init__(name="notify", daemon=True)
        self.conn, self.consumer = conn, consumer
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.step(block_ms=2000)
            except Exception as err:  # noqa: BLE001 - Redis away, a bad entry: the thread outlives it
                log.warning("notifications: %s: %s", type(err).__name__, err)
                self._halt.wait(2.0)

    def step(self, block_ms: int = 0) -> int:
        """Deliver what is waiting (claimed from a dead deliverer first); returns how many events were handled."""
        stream = keys.notify_events()
        try:
            self.conn.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError:
            pass  # BUSYGROUP: it exists
        reply = self.conn.xautoclaim(stream, GROUP, self.consumer, int(DELIVERY_CLAIM_IDLE * 1000), count=10)
        entries = list(reply[1])  # (next id, entries[, deleted ids since Redis 7])
        if not entries:
            got = self.conn.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=10, block=block_ms or None)
            entries = [e for _, batch in (got or []) for e in batch]
        for entry_id, fields in entries:
            payload = json.loads(decode_reply(fields[b"data"]))
            for hook in list_hooks(self.conn):
                if payload["event"] in hook.events:
                    self.deliver(hook, payload)
            self.conn.xack(stream, GROUP, entry_id)
        return len(entries)

    def deliver(self, hook: Hook, payload: dict[str, Any]) -> bool:
        for attempt, delay in enumerate((*RETRY_DELAYS, None), start=1):
            status, error = post(hook, payload)
            ok = error is None and status is not None and 200 <= status < 300
            entry = {"event": payload["event"], "id": payload.get("id"), "attempt": attempt, "status": status,
                     "error": error, "ok": ok, "at": time.time()}
            self.conn.xadd(keys.hook_log(hook.id), {"entry": json.dumps(entry)}, maxlen=LOG_MAXLEN,
                           approximate=True)
            if ok:
                return True
            if delay is None or self._halt.wait(delay):
                return False
        return False
