"""Rank 0's Redis sink and the log writer against the real test Redis: schema, idempotent epochs, status updates,
reading from a last-seen id, and never blocking training when Redis is away."""
from __future__ import annotations

import json
import time
from typing import Any

import pytest

from core.events import sink_from_env as core_sink_from_env
from worker import api, keys
from worker.connection import connect
from worker.record import encode_fields
from worker.states import JobState
from worker.streaming import LogWriter, RedisEventSink


def make_job(conn: Any, state: JobState = JobState.RUNNING) -> str:
    job_id = keys.new_job_id()
    conn.hset(keys.job(job_id), mapping=encode_fields({"id": job_id, "state": state.value, "epochs": 2,
                                                        "submitted_at": time.time()}))
    conn.zadd(keys.jobs_index(), {job_id: time.time()})
    return job_id


def epoch(n: int, acc: float) -> dict[str, Any]:
    return {"epoch": n, "epochs": 2, "train_loss": 1.0 / n, "train_acc": acc - 0.1, "val_loss": 1.1 / n,
            "val_acc": acc, "val_macro_f1": acc, "lr": 0.01, "seconds": 1.5, "images_per_sec": 100.0,
            "best_val_acc": acc}


def test_sink_streams_each_epoch_once_and_updates_status(redis_conn: Any) -> None:
    job_id = make_job(redis_conn)
    sink = RedisEventSink(redis_conn, job_id)
    sink.emit("start", {"epochs": 2, "world_size": 1, "resumed_from": None})
    sink.emit("step", {"epoch": 1, "step": 5, "global_step": 5, "steps_per_epoch": 10, "loss": 2.0, "lr": 0.01,
                       "images_per_sec": 90.0})
    sink.emit("epoch", epoch(1, 0.5))
    sink.close()

    st = api.job_status(redis_conn, job_id)
    assert st["epoch"] == 1 and st["progress"] == 0.5 and st["best_val_acc"] == 0.5

    # a resumed run re-emits its last epoch: it must not appear twice
    resumed = RedisEventSink(redis_conn, job_id)
    resumed.emit("start", {"epochs": 2, "world_size": 1, "resumed_from": 1})
    resumed.emit("epoch", epoch(1, 0.5))
    resumed.emit("epoch", epoch(2, 0.8))
    resumed.emit("report", {"test": {"accuracy": 0.79}})
    resumed.close()

    events = api.events_since(redis_conn, job_id)
    assert [e["data"]["epoch"] for e in events if e["type"] == "epoch"] == [1, 2]
    assert [e["type"] for e in events] == ["start", "step", "epoch", "start", "epoch", "report"]
    # the raw entries: fields `type` and `data` (a JSON string), as CONTRACTS.md says
    raw = redis_conn.xrange(keys.events(job_id))
    assert set(raw[0][1]) == {b"type", b"data"} and json.loads(raw[2][1][b"data"])["epoch"] == 1

    st = api.job_status(redis_conn, job_id)
    assert st["epoch"] == 2 and st["progress"] == 1.0 and st["best_val_acc"] == 0.8 and st["test_acc"] == 0.79
    assert st["resumed_from"] == 1

    # a live chart asks only for what came after the last id it drew
    last = events[2]["id"]
    assert [e["type"] for e in api.events_since(redis_conn, job_id, last)] == ["start", "epoch", "report"]
    assert api.events_since(redis_conn, job_id, events[-1]["id"]) == []


def test_sink_does_not_resurrect_a_deleted_job(redis_conn: Any) -> None:
    job_id = make_job(redis_conn)
    redis_conn.delete(keys.job(job_id))
    sink = RedisEventSink(redis_conn, job_id)
    sink.emit("epoch", epoch(1, 0.5))
    sink.close()
    assert not redis_conn.exists(keys.job(job_id))


def test_sink_never_blocks_when_redis_is_unreachable() -> None:
    dead = connect("redis://:x@127.0.0.1:9/0")  # port 9 (discard): nothing listens
    sink = RedisEventSink(dead, keys.new_job_id(), close_timeout=1.0)
    t0 = time.monotonic()
    for i in range(5000):
        sink.emit("step", {"epoch": 1, "step": i, "steps_per_epoch": 5000, "loss": 1.0})
    assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    sink.close()
    assert time.monotonic() - t0 < 2.0


def test_core_finds_the_sink_through_the_environment(redis_conn: Any, redis_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = make_job(redis_conn)
    monkeypatch.setenv("CORE_EVENT_SINK", "worker.streaming:sink_from_env")
    monkeypatch.setenv("TRAINER_JOB_ID", job_id)
    monkeypatch.setenv("REDIS_URL", redis_url)
    sink = core_sink_from_env()
    assert isinstance(sink, RedisEventSink)
    sink.emit("phase", {"phase": "data"})
    sink.close()
    assert api.events_since(redis_conn, job_id)[0]["data"] == {"phase": "data"}
    assert api.job_status(redis_conn, job_id)["phase"] == "data"


def test_log_writer_batches_lines_into_a_capped_stream(redis_conn: Any) -> None:
    job_id = make_job(redis_conn)
    log = LogWriter(redis_conn, job_id, maxlen=100)
    for i in range(1000):
        log.write(f"line {i}\n", src="train")
    log.close()
    tail = api.logs_tail(redis_conn, job_id, 5)
    assert [e["line"] for e in tail] == [f"line {i}" for i in range(995, 1000)]
    assert tail[0]["src"] == "train"
    assert redis_conn.xlen(keys.logs(job_id)) < 300  # MAXLEN ~ 100 trims in whole nodes
    assert list(log.tail)[-1] == "line 999"
    newer = api.logs_since(redis_conn, job_id, tail[2]["id"])
    assert [e["line"] for e in newer] == ["line 998", "line 999"]


def test_embedding_progress_is_the_status_phase() -> None:
    from worker.streaming import status_fields_for

    fields = status_fields_for("embed", {"done": 320, "total": 1240, "views": 4, "images_per_sec": 21.5})
    assert fields["phase"] == "embedding 320/1240 images"
