"""Streams into Redis: core's events (rank 0's sink) and every rank's log lines, plus the readers the CLI and the
dashboard use.

Writers never block the caller: `emit()`/`write()` append to an in-memory buffer and a background thread flushes it
in batches (one pipeline round trip per batch). When Redis is unreachable the buffer keeps the newest entries and
the flusher retries, so training never waits on Redis.
"""
from __future__ import annotations

import collections
import json
import math
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis

from core.events import append_bounded
from worker import keys
from worker.defaults import (
    EVENT_STREAM_MAXLEN,
    FLUSH_BATCH,
    FLUSH_INTERVAL,
    LOG_STREAM_MAXLEN,
    SINK_BUFFER,
    SINK_CLOSE_TIMEOUT,
)
from worker.record import encode_fields

ENV_JOB_ID = "TRAINER_JOB_ID"
"""Environment variable naming the job whose stream rank 0's sink writes (set by the worker)."""

# KEYS: events stream, epochs-seen set, job hash. ARGV: maxlen, type, data JSON, epoch ('' if none), field/value...
# An epoch already in the set is dropped: a resumed run re-emits its last epoch, and each epoch must appear once.
_EMIT = """
if ARGV[4] ~= '' then
  if redis.call('SADD', KEYS[2], ARGV[4]) == 0 then return 0 end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'type', ARGV[2], 'data', ARGV[3])
if #ARGV > 4 and redis.call('EXISTS', KEYS[3]) == 1 then
  for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
end
return 1
"""


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def status_fields_for(type_: str, data: dict[str, Any]) -> dict[str, Any]:
    """What an event changes in the job's status hash (the fields `status` shows)."""
    now = time.time()
    if type_ == "start":
        return {"epochs": data.get("epochs"), "world_size": data.get("world_size"),
                "resumed_from": data.get("resumed_from"), "device": data.get("device"), "updated_at": now}
    if type_ == "step":
        epochs = data.get("epochs") or 0
        steps = data.get("steps_per_epoch") or 0
        fields: dict[str, Any] = {"step": data.get("step"), "global_step": data.get("global_step"),
                                  "images_per_sec": _finite(data.get("images_per_sec")), "updated_at": now}
        if epochs and steps:
            fields["progress"] = round(min(1.0, (data.get("epoch", 1) - 1 + data.get("step", 0) / steps) / epochs), 4)
        return fields
    if type_ == "epoch":
        epochs = data.get("epochs") or 0
        fields = {k: _finite(data.get(k)) for k in ("epoch", "epochs", "train_loss", "train_acc", "val_loss",
                                                    "val_acc", "lr", "best_val_acc", "images_per_sec")}
        fields["epoch_seconds"] = _finite(data.get("seconds"))
        if epochs:
            fields["progress"] = round(min(1.0, data["epoch"] / epochs), 4)
        fields["updated_at"] = now
        return fields
    if type_ == "phase":
        return {"phase": data.get("phase"), "updated_at": now}
    if type_ == "embed":  # the feature cache's embedding pass (core.features): its progress is the phase text
        return {"phase": f"embedding {data.get('done')}/{data.get('total')} images", "updated_at": now}
    if type_ == "report":
        test = data.get("test") or {}
        return {"test_acc": _finite(test.get("accuracy")), "progress": 1.0, "updated_at": now}
    if type_ == "error":
        return {"error": data.get("error"), "error_kind": data.get("kind"), "updated_at": now}
    return {}


class RedisEventSink:
    """core's EventSink for one job: batched XADD into the job's event stream + status-hash updates."""

    def __init__(self, conn: redis.Redis, job_id: str, *, maxlen: int = EVENT_STREAM_MAXLEN,
                 close_timeout: float = SINK_CLOSE_TIMEOUT):
        self.conn = conn
        self.job_id = keys.check_job_id(job_id)
        self.maxlen = maxlen
        self.close_timeout = close_timeout
        self._keys = [keys.events(job_id), keys.epochs_seen(job_id), keys.job(job_id)]
        self._script = conn.register_script(_EMIT)
        self._buf: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._epochs = 0
        self._stepped = False
        self._thread = threading.Thread(target=self._run, name=f"redis-sink-{job_id}", daemon=True)
        self._thread.start()

    def emit(self, type: str, data: dict[str, Any]) -> None:
        if type == "start":
            self._epochs = int(data.get("epochs") or 0)
        if type == "step" and self._epochs and "epochs" not in data:
            data = {**data, "epochs": self._epochs}
        with self._lock:  # Redis away for long: the oldest step events are shed
            append_bounded(self._buf, (type, data), SINK_BUFFER)
        if type != "step" or not self._stepped:
            self._stepped = self._stepped or type == "step"
            self._wake.set()  # everything but steps goes out at once (and the first step: "it is training");
            # later steps ride the next tick

    def close(self) -> None:
        """Flush what is buffered (up to `close_timeout` s: a run must end even when Redis is gone)."""
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=self.close_timeout)

    def _take(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            n = min(len(self._buf), FLUSH_BATCH)
            return [self._buf.popleft() for _ in range(n)]

    def _put_back(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        with self._lock:
            self._buf.extendleft(reversed(batch))

    def _send(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        with self.conn.pipeline(transaction=False) as pipe:
            for type_, data in batch:
                epoch = str(data.get("epoch", "")) if type_ == "epoch" else ""
                args: list[Any] = [self.maxlen, type_, json.dumps(data, default=str), epoch]
                for k, v in encode_fields(status_fields_for(type_, data)).items():
                    args += [k, v]
                self._script(keys=self._keys, args=args, client=pipe)
            pipe.execute()

    def _run(self) -> None:
        deadline = None
        backoff = FLUSH_INTERVAL
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            failed = False
            while batch := self._take():
                try:
                    self._send(batch)
                    backoff = FLUSH_INTERVAL
                except redis.exceptions.RedisError:
                    self._put_back(batch)  # a half-applied batch may repeat a non-epoch event; epochs stay unique
                    failed = True
                    break
            if self._closed.is_set():
                deadline = deadline or time.monotonic() + self.close_timeout * 0.9
                if not self._buf or time.monotonic() > deadline:
                    return
            if failed:
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


def sink_from_env() -> RedisEventSink | None:
    """The `CORE_EVENT_SINK=worker.streaming:sink_from_env` factory: REDIS_URL (or the embedded server) and
    TRAINER_JOB_ID from the environment the worker gave rank 0. None when no job id is set."""
    from worker.connection import connect

    job_id = os.environ.get(ENV_JOB_ID, "").strip()
    if not job_id:
        return None
    return RedisEventSink(connect(), job_id)


class LogWriter:
    """Batched, non-blocking writer of log lines into a job's log stream (fields `line`, `src`)."""

    def __init__(self, conn: redis.Redis, job_id: str, *, maxlen: int = LOG_STREAM_MAXLEN, tail: int = 200):
        self.conn = conn
        self.key = keys.logs(job_id)
        self.maxlen = maxlen
        self.tail: collections.deque[str] = collections.deque(maxlen=tail)
        self._buf: collections.deque[tuple[str, str]] = collections.deque(maxlen=SINK_BUFFER)
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"log-writer-{job_id}", daemon=True)
        self._thread.start()

    def write(self, line: str, src: str = "train") -> None:
        line = line.rstrip("\n")
        self.tail.append(line)
        self._buf.append((line, src))

    def close(self, timeout: float = SINK_CLOSE_TIMEOUT) -> None:
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        deadline = None
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            while self._buf:
                batch = []
                while self._buf and len(batch) < FLUSH_BATCH:
                    batch.append(self._buf.popleft())
                try:
                    with self.conn.pipeline(transaction=False) as pipe:
                        for line, src in batch:
                            pipe.xadd(self.key, {"line": line, "src": src}, maxlen=self.maxlen, approximate=True)
                        pipe.execute()
                except redis.exceptions.RedisError:
                    self._buf.extendleft(reversed(batch))
                    time.sleep(1.0)
                    break
            if self._closed.is_set():
                deadline = deadline or time.monotonic() + SINK_CLOSE_TIMEOUT - 1.0
                if not self._buf or time.monotonic() > deadline:
                    return


# ------------------------------------------------------------------------------------------------------- readers
def _text(b: bytes | str) -> str:
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else b


def _event(entry_id: bytes | str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    f = {_text(k): _text(v) for k, v in fields.items()}
    try:
        data = json.loads(f.get("data", "{}"))
    except json.JSONDecodeError:
        data = {"raw": f.get("data")}
    return {"id": _text(entry_id), "type": f.get("type", ""), "data": data}


def events_since(
    conn: redis.Redis, job_id: str, last_id: str = "0", *, count: int | None = None, types: set[str] | None = None
) -> list[dict[str, Any]]:
    """Events after stream id `last_id` ("0": from the start), oldest first: `{"id", "type", "data"}`.

    A live chart keeps the last id it drew and asks only for what came after it.
    """
    start = "(" + last_id if last_id not in ("0", "0-0", "-") else "-"
    entries = conn.xrange(keys.events(job_id), min=start, max="+", count=count)
    out = [_event(i, f) for i, f in entries]
    return [e for e in out if types is None or e["type"] in types]


def wait_events(conn: redis.Redis, job_id: str, last_id: str = "$", *, block_ms: int = 1000) -> list[dict[str, Any]]:
    """Blocking read (XREAD BLOCK) of events after `last_id` ("$": only new ones)."""
    res = conn.xread({keys.events(job_id): last_id}, block=block_ms)
    return [_event(i, f) for _, entries in res for i, f in entries]


def logs_tail(conn: redis.Redis, job_id: str, n: int = 200) -> list[dict[str, str]]:
    """The last `n` log lines, oldest first: `{"id", "line", "src"}`."""
    entries = conn.xrevrange(keys.logs(job_id), count=n)
    out = []
    for entry_id, fields in reversed(entries):
        f = {_text(k): _text(v) for k, v in fields.items()}
        out.append({"id": _text(entry_id), "line": f.get("line", ""), "src": f.get("src", "")})
    return out


def logs_since(conn: redis.Redis, job_id: str, last_id: str = "0", *, count: int = 1000) -> list[dict[str, str]]:
    """Log lines after stream id `last_id`, oldest first."""
    start = "(" + last_id if last_id not in ("0", "0-0", "-") else "-"
    out = []
    for entry_id, fields in conn.xrange(keys.logs(job_id), min=start, max="+", count=count):
        f = {_text(k): _text(v) for k, v in fields.items()}
        out.append({"id": _text(entry_id), "line": f.get("line", ""), "src": f.get("src", "")})
    return out


def follow_logs(conn: redis.Redis, job_id: str, *, block_ms: int = 1000) -> Iterator[dict[str, str]]:
    """Every log line from the start, then new ones as they come (XREAD BLOCK), until the caller stops."""
    last = "0"
    while True:
        res = conn.xread({keys.logs(job_id): last}, block=block_ms, count=500)
        if not res:
            yield {}  # a tick: lets the caller check whether the job has ended
            continue
        for _, entries in res:
            for entry_id, fields in entries:
                last = _text(entry_id)
                f = {_text(k): _text(v) for k, v in fields.items()}
                yield {"id": last, "line": f.get("line", ""), "src": f.get("src", "")}
