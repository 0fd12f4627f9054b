"""How and where a run computes, and what its epoch loop advances: `Runtime` and `TrainState`, the two small objects
the steps of core.train and core.prune share.

`Runtime` is fixed for the run's whole length: config, device, process group, the precision policy (autocast, grad
scaler, channels_last), where events go, and when to stop (`StopFlag`, set by SIGTERM; train.time_limit's deadline).
`TrainState` is the model, its optimizer and how far training got. The RNG helpers seed a run and save/restore every
generator in a checkpoint so a resume reproduces the epochs it runs again.
"""
from __future__ import annotations

import ctypes
import os
import platform
import random
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from core.config import Config
from core.distributed import DistInfo
from core.errors import Cancelled, TrainingError
from core.events import EventSink, NullSink


# ------------------------------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors/lists only, so checkpoints load with `weights_only=True`."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _to_lists(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate(_to_tuples(state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# ------------------------------------------------------------------------------------------------------ allocator
HEAP_KEEP_BYTES = 2**30
"""Bytes glibc's malloc serves from its heap and keeps once freed (M_MMAP_THRESHOLD and M_TRIM_THRESHOLD) in a
training process: a run's big tensors (a 224 px batch as floats is 38 MB, a convolution's output hundreds of MB)
are allocated and freed every step at the same sizes."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
"""mallopt parameters, from glibc's malloc.h."""

_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse the memory of freed big tensors instead of returning it to the kernel; True if set.
    Called by every run whose device is the CPU (core.train.open_run), where the activations live in this memory.

    By default glibc maps every allocation over 32 MB afresh and unmaps it when freed, so each step's big CPU tensors
    pay a page fault and the kernel's zeroing for every 4 KB page: converting one 64-image 224 px batch to floats ran
    26x slower into fresh memory than into reused memory here. Measured on 2 cores (docs/benchmarks.md,
    "Optimisations"): SimpleCNN trained 2.0-2.7x faster at 112 px and 1.3-2.2x at 224 px. The price is memory: what
    a step freed stays in the process for the next, and pieces of different sizes do not always fit each other's
    holes, so the peak RSS grew 1.07x on the digits preset, 1.1-1.4x at 112 px and 1.4-1.7x at 224 px (batch 64).
    Retaining freed memory is what jemalloc and tcmalloc do too, the allocators PyTorch's CPU performance guide
    suggests. Process-wide. Left alone where the environment already chose (GLIBC_TUNABLES with glibc.malloc,
    MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_: `GLIBC_TUNABLES=glibc.malloc.check=0` keeps glibc's defaults) and
    where the C library is not glibc."""
    if any(name in os.environ for name in _MALLOC_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_KEEP_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                       HEAP_KEEP_BYTES))
    except (OSError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------------------- precision
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX512-BF16/AMX). Without them bf16 autocast is emulated and
    much slower than fp32 (SimpleCNN on a 2-core AVX2 EPYC: 59 vs 432 images/s, see docs/benchmarks.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    """`train.channels_last` resolved for `device`. `auto` means on for the CPU, where oneDNN's NHWC convolutions
    were faster for every model measured on a 2-core AVX-512 EPYC (fwd+bwd+step, channels_last / NCHW: SimpleCNN 1.57-
    1.68×, dsconv_cnn 1.41-1.56×, MobileNetV3-S 1.66×, EfficientNet-Lite0 1.74×, ResNet-18 1.06-1.13×; see
    docs/benchmarks.md), and on for CUDA with mixed precision, where tensor cores work in NHWC (PyTorch's
    guidance; not measured here, no GPU). Off for CUDA in fp32."""
    value = cfg.train.channels_last
    if value != "auto":
        return bool(value)
    return device.type == "cpu" or (device.type == "cuda" and cfg.train.amp)


def autocast_context(cfg: Config, device: torch.device) -> tuple[Any, torch.amp.GradScaler | None, str | None]:
    """On CUDA bf16 when supported, else fp16 with a GradScaler; on CPU bf16 only where it is faster (native bf16),
    else fp32 (the report's `amp` then says None)."""
    if not cfg.train.amp:
        return nullcontext(), None, None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16), None, "bf16"
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda"), "fp16"
    if not cpu_has_native_bf16():
        return nullcontext(), None, None
    return torch.autocast("cpu", dtype=torch.bfloat16), None, "bf16"


# ------------------------------------------------------------------------------------------------------------ stop
@dataclass
class StopFlag:
    """What SIGTERM (a cancel) tells the run. While steps run, the handler only sets `stop` and the next
    `Runtime.check_stop` raises Cancelled at a point where the last checkpoint is whole. Past the training loop (test,
    export) no step checks it, and an exception raised from a signal handler could be swallowed by library code (the
    ONNX exporter catches broadly): once `immediate` is set the handler marks the run (`on_cancel`) and lets SIGTERM
    kill the process, leaving `export.partial/`, never a half `export/`."""

    stop: bool = False
    immediate: bool = False
    on_cancel: Callable[[], None] | None = None

    def handle_sigterm(self) -> None:
        """Install this flag's handler for SIGTERM (a no-op outside the main thread, e.g. in a test thread)."""
        try:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:
            pass

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop = True
        if self.immediate:
            if self.on_cancel is not None:
                self.on_cancel()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_immediately_from_now(self) -> None:
        """From here on SIGTERM ends the process at once; a SIGTERM that came already cancels the run now."""
        self.immediate = True
        if self.stop:
            raise Cancelled("received SIGTERM: run cancelled")


# --------------------------------------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    """Where and how a run computes, fixed for its whole length: config, device, process group, mixed precision,
    where events go, and when to stop (SIGTERM's flag, train.time_limit's deadline)."""

    cfg: Config
    device: torch.device
    info: DistInfo = field(default_factory=DistInfo)
    sink: EventSink = field(default_factory=NullSink)
    autocast: Any = field(default_factory=nullcontext)
    scaler: torch.amp.GradScaler | None = None
    amp: str | None = None
    """"bf16", "fp16" or None (fp32): what the report's `amp` says."""
    channels_last: bool = False
    stop_flag: StopFlag = field(default_factory=StopFlag)
    deadline: float | None = None
    """time.time() past which the run fails as timed out; None = no limit."""
    started: float = field(default_factory=time.time)
    """time.time() when the run started (the report's `seconds` count from here)."""

    @classmethod
    def create(cls, cfg: Config, device: torch.device, info: DistInfo | None = None, sink: EventSink | None = None,
               *, stop_flag: StopFlag | None = None, deadline: float | None = None,
               started: float | None = None) -> Runtime:
        autocast, scaler, amp = autocast_context(cfg, device)
        return cls(cfg, device, info or DistInfo(), sink or NullSink(), autocast, scaler, amp,
                   use_channels_last(cfg, device), stop_flag if stop_flag is not None else StopFlag(), deadline,
                   started if started is not None else time.time())

    def check_stop(self) -> None:
        """Called between steps (and embedding batches): Cancelled after SIGTERM, TrainingError past
        train.time_limit. Both leave at a point where the last checkpoint is whole."""
        if self.stop_flag.stop:
            raise Cancelled("received SIGTERM: run cancelled")
        if self.deadline is not None and time.time() > self.deadline:
            raise TrainingError(f"timed out: the run exceeded train.time_limit={self.cfg.train.time_limit:g} s")


# ------------------------------------------------------------------------------------------------------ train state
@dataclass
class TrainState:
    """What the epoch loop advances: the model and its optimizer, and how far training got.

    `model` is the bare model (evaluated and checkpointed); `train_model` is the one stepped: the same object, or
    DistributedDataParallel and/or torch.compile around it.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: nn.Module
    train_model: nn.Module | None = None
    global_step: int = 0
    epoch: int = 0
    """The last completed epoch (0 before the first)."""
    best_val_acc: float = -1.0
    stale_epochs: int = 0
    """Epochs since val accuracy last improved (train.early_stopping)."""
    last_epoch_event: dict[str, Any] | None = None
    """The epoch event of the checkpoint resumed from, sent again so every sink has seen it."""
    head: nn.Module | None = None
    """With the feature cache: what trains and what val batches (features) go through, the model's own head."""

    @property
    def stepped(self) -> nn.Module:
        return self.train_model if self.train_model is not None else self.model
