"""Row 3: Redis streaming on vs off (worker.streaming's sink against a real redis-server), overhead ≤ 1 %, and the CPU
the streaming costs per second of training (the sink thread and redis-server above their idle baseline)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch
from torch import nn

from core import distributed
from core.optim import create_optimizer, create_scheduler
from core.runtime import Runtime, TrainState
from core.train import make_loaders, train_one_epoch
from tests.bench.fixtures import CHUNK_STEPS, Chunks, in_memory_bundle, new_model, train_config
from tests.bench.harness import Row, Section, alternate, log, ratio_median


def bench_streaming(quick: bool, url: str) -> list[Row]:
    from core.events import NullSink
    from worker import keys
    from worker.connection import connect
    from worker.streaming import RedisEventSink

    log_every = 5  # the digits preset's value, the chattiest shipped preset
    cfg = train_config(2500 if quick else 5000, train__log_every=log_every)
    bundle = in_memory_bundle(cfg)
    device, info = torch.device("cpu"), distributed.DistInfo()
    loaders = make_loaders(cfg, bundle, info, device)
    model = new_model(cfg, bundle.in_chans, len(bundle.classes), device)
    opt = create_optimizer(cfg, model)
    sched = create_scheduler(cfg, opt, len(loaders.train) * 100)
    state = TrainState(model, opt, sched, nn.CrossEntropyLoss())
    conn = connect(url)
    job_id = keys.new_job_id()
    conn.hset(keys.job(job_id), mapping={"id": job_id, "state": "running"})  # the sink updates an existing job hash
    epoch = [0]
    chunks = Chunks(loaders.train, CHUNK_STEPS)

    def run(sink: Any) -> float:  # a chunk of training, as one "epoch" with its start and epoch events
        epoch[0] += 1
        sink.emit("start", {"epochs": 1000, "world_size": 1})
        t = time.perf_counter()
        train_one_epoch(Runtime.create(cfg, device, info, sink), state, chunks, epoch[0])
        sink.emit("epoch", {"epoch": epoch[0], "epochs": 1000})
        return time.perf_counter() - t

    sink = _TimedSink(RedisEventSink(conn, job_id))
    server = psutil.Process(int(conn.info("server")["process_id"]))
    flusher = sink.inner._thread.native_id
    # CPU seconds of the sink thread and of redis-server during each side's chunks: the "off" chunks give the idle
    # baseline (the sink thread's 4 Hz wake-ups, redis-server's own timers), subtracted from the "on" ones
    cpu = {"on": [0.0, 0.0], "off": [0.0, 0.0]}

    def measured(side: str, inner: Any) -> Callable[[], float]:
        def call() -> float:
            before = (_thread_cpu(flusher), sum(server.cpu_times()[:2]))
            seconds = run(inner)
            cpu[side][0] += _thread_cpu(flusher) - before[0]
            cpu[side][1] += sum(server.cpu_times()[:2]) - before[1]
            return seconds
        return call

    reps = 6 if quick else 30
    log(f"row 3: {len(bundle.train)} images, log_every={log_every}, {reps} alternating pairs of {CHUNK_STEPS} steps")
    try:
        got = alternate({"off": measured("off", NullSink()), "on": measured("on", sink)}, reps)
    finally:
        sink.close()
    scale = sum(got["on"]) / sum(got["off"])
    sink_cpu = max(0.0, cpu["on"][0] - cpu["off"][0] * scale)
    server_cpu = max(0.0, cpu["on"][1] - cpu["off"][1] * scale)
    n_events = conn.xlen(keys.events(job_id))
    conn.delete(*keys.job_keys(job_id))
    conn.close()
    overhead = (ratio_median(got["on"], got["off"]) - 1) * 100
    spread = statistics.pstdev([a / b for a, b in zip(got["on"], got["off"])]) * 100
    on_seconds = sum(got["on"])
    cost = sink.seconds + sink_cpu + server_cpu
    return [Row("Redis streaming on vs off: overhead", overhead, 1.0, "%", higher_is_better=False,
                note=f"time of {CHUNK_STEPS} training steps on/off, median of {reps} alternating pairs (pair spread "
                     f"±{spread:.1f} %); "
                     f"log_every={log_every}, {n_events} events written"),
            Row("Redis streaming: CPU it costs per second of training", cost / on_seconds * 100, 1.0, "%",
                higher_is_better=False,
                note=f"over the {reps} streaming chunks ({on_seconds:.1f} s): emit() calls "
                     f"{sink.seconds * 1000:.1f} ms, "
                     f"sink thread {sink_cpu * 1000:.0f} ms CPU, redis-server {server_cpu * 1000:.0f} ms CPU, each "
                     f"above its idle baseline in the non-streaming chunks ({cpu['off'][0] * 1000:.0f} and "
                     f"{cpu['off'][1] * 1000:.0f} ms); per wall second, not per core: free of row 3's run-to-run "
                     "noise")]


class _TimedSink:
    """An EventSink wrapper adding up the time the training thread spends inside emit()."""

    def __init__(self, inner: Any):
        self.inner, self.seconds = inner, 0.0

    def emit(self, type: str, data: dict[str, Any]) -> None:
        t = time.perf_counter()
        self.inner.emit(type, data)
        self.seconds += time.perf_counter() - t

    def close(self) -> None:
        self.inner.close()


def _thread_cpu(native_id: int | None) -> float:
    """User + system CPU seconds of one thread of this process (0 when it is gone)."""
    for th in psutil.Process().threads():
        if th.id == native_id:
            return th.user_time + th.system_time
    return 0.0


SECTION = Section("streaming", "row 3", bench_streaming,
                  (Row("Redis streaming on vs off: overhead", None, 1.0, "%", higher_is_better=False),), redis=True)
