"""Train an image classifier: `python -m core.train CONFIG --out RUN_DIR [--set k=v ...] [--resume]`.

`train()` is a few named steps, top to bottom, like torchvision's reference script: prepare_run_folder → load_data →
build_training_model → prepare_inputs (what the loop iterates) → create_train_state (+ resume_from) →
wrap_for_training → run_epochs (each epoch: train_one_epoch, evaluate on val, checkpoint, event) → test_and_report
(→ export). What the steps share travels in two small objects: `Runtime` (how and where the run computes, fixed for
the run) and `TrainState` (the model, its optimizer and how far training got). The same entry point runs under
`torchrun --nproc_per_node=N`: DDP with a DistributedSampler, metrics reduced across ranks, only rank 0 writes files
and events.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from core import distributed as D
from core import runfolder as rf
from core.config import Config, choices, load_config, load_yaml, save_config
from core.data.workers import num_workers
from core.errors import Cancelled, ConfigError, CoreError, DataError, TrainingError, exit_code
from core.evaluate import compute_metrics, predict
from core.features import build_feature_loaders, plan_feature_cache
from core.events import EventSink, JsonlSink, MultiSink, NullSink, PrintSink, read_jsonl, sink_from_env
from core.models import set_train_mode, unwrap_model

MISCLASSIFIED_MAX = 48
"""How many misclassified test images are saved as PNGs for the dashboard's gallery."""
SAMPLES_PER_CLASS = 3
"""Test images per class saved under samples/ (the dashboard's "Try it" page offers them)."""


# ---------------------------------------------------------------------------------------------------------- helpers
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


# --------------------------------------------------------------------------------------------- optimizer, schedule
def create_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD. No weight decay on biases and norm weights; a lower lr for a pretrained backbone being fine-tuned."""
    from core.models import split_parameters

    backbone, head = split_parameters(model)
    backbone_scale = cfg.model.backbone_lr_scale if (cfg.model.pretrained and cfg.model.freeze == "none") else 1.0
    groups = []
    for params, scale in ((backbone, backbone_scale), (head, 1.0)):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for ps, wd in ((decay, cfg.optim.weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "weight_decay": wd, "lr": cfg.optim.lr * scale, "lr_scale": scale})
    if not groups:
        raise ConfigError.on("model", None, "no trainable parameters (check model.freeze)")
    name = cfg.optim.name
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.optim.lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    raise ConfigError.on("optim.name", name,
                         f"unknown optimizer {name!r}; choose from {', '.join(choices(Config, 'optim.name'))}")


def create_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """Stepped once per batch. Lengths are in steps, derived from epochs × steps_per_epoch (no magic T_max)."""
    total = cfg.train.epochs * steps_per_epoch
    warmup = min(round(cfg.sched.warmup_epochs * steps_per_epoch), max(total - 1, 0))
    name = cfg.sched.name
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(total, 1),
            pct_start=max(warmup / max(total, 1), 0.05) if warmup else 0.25,
        )
    min_ratio = cfg.sched.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if name == "cosine":
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if name == "step":
            return cfg.sched.gamma ** ((step // max(steps_per_epoch, 1)) // cfg.sched.step_epochs)
        return 1.0  # "none"

    if name not in choices(Config, "sched.name"):
        raise ConfigError.on("sched.name", name,
                             f"unknown schedule {name!r}; choose from {', '.join(choices(Config, 'sched.name'))}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------------- loaders
def make_loaders(cfg: Config, bundle: Any, info: D.DistInfo, device: torch.device) -> dict[str, Any]:
    """DataLoaders for train (sharded, shuffled per epoch) and val/test (sharded without padding, gathered later)."""
    from core.data.shard_loader import make_shard_loaders, use_shards  # issue 20: a prepared form's shards

    if use_shards(cfg, bundle):
        return make_shard_loaders(cfg, bundle, info, device)
    if cfg.data.cache != "off":
        try:
            from core.data.fast import make_fast_loaders  # the tensor-cache path (docs/benchmarks.md)
        except ImportError:
            make_fast_loaders = None
        if make_fast_loaders is not None:
            fast = make_fast_loaders(cfg, bundle, info, device)
            if fast is not None:
                return fast
    pin = cfg.data.pin_memory and device.type == "cuda"
    workers = num_workers(cfg)  # data.num_workers, `auto` resolved (issue 20)
    common = {"num_workers": workers, "pin_memory": pin, "persistent_workers": workers > 0}
    if workers > 0:
        common["prefetch_factor"] = 4
    sampler = None
    if info.enabled:
        sampler = DistributedSampler(bundle.train, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=cfg.train.seed, drop_last=True)
    n_train_local = len(bundle.train) // info.world_size
    drop_last = n_train_local > cfg.train.batch_size  # a last batch of 1 breaks BatchNorm
    generator = torch.Generator().manual_seed(cfg.train.seed)
    train = DataLoader(bundle.train, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                       drop_last=drop_last, generator=generator, **common)
    eval_bs = cfg.train.eval_batch(device.type)

    def shard(ds: Any) -> tuple[DataLoader, list[int]]:
        idx = list(range(info.rank, len(ds), info.world_size))
        return DataLoader(Subset(ds, idx), batch_size=eval_bs, shuffle=False, **common), idx

    val, val_idx = shard(bundle.val)
    test, test_idx = shard(bundle.test)
    return {"train": train, "sampler": sampler, "generator": generator, "val": val, "val_idx": val_idx,
            "test": test, "test_idx": test_idx, "kind": "dataloader"}


def set_epoch(loaders: dict[str, Any], cfg: Config, epoch: int, info: D.DistInfo) -> None:
    """Make epoch `epoch`'s shuffling and augmentation depend only on (seed, epoch, rank) — resumes reproduce it."""
    if loaders.get("sampler") is not None:
        loaders["sampler"].set_epoch(epoch)
    if loaders.get("generator") is not None:
        loaders["generator"].manual_seed(cfg.train.seed * 100_003 + epoch)
    if hasattr(loaders["train"], "set_epoch"):
        loaders["train"].set_epoch(epoch)
    seed_everything(cfg.train.seed * 1_000_003 + epoch * 997 + info.rank)


def cache_features(rt: Runtime, plan: Any, model: nn.Module, bundle: Any, loaders: dict[str, Any]) -> dict[str, Any]:
    """The feature-cache step (core.features): embed train views and val with the frozen backbone, reporting progress
    as `embed` events and on the CLI's progress bar; returns loaders whose train/val batches are features, and the
    head that trains on them."""
    rt.sink.emit("phase", {"phase": "embed"})
    bar = _progress(plan.views * plan.n_train + plan.n_val, f"embedding {plan.views} view(s)", rt.info)
    shown = [0]

    def report(done: int, total: int, images_per_sec: float) -> None:
        bar.update(done - shown[0])
        shown[0] = done
        rt.sink.emit("embed", {"done": done, "total": total, "views": plan.views, "images_per_sec": images_per_sec})

    try:
        return build_feature_loaders(rt.cfg, plan, model, bundle, loaders, rt.info, rt.device, autocast=rt.autocast,
                                     precision=rt.amp or "fp32", channels_last=rt.channels_last, report=report,
                                     check=rt.check_stop)
    finally:
        bar.close()


def gather_predictions(out: dict[str, np.ndarray], idx: list[int], info: D.DistInfo) -> dict[str, np.ndarray]:
    """Each rank evaluated a disjoint shard; put the whole split back together in dataset order."""
    parts = D.all_gather_objects({"idx": idx, **out}, info)
    if len(parts) == 1:
        return out
    order = np.concatenate([np.asarray(p["idx"], dtype=np.int64) for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    probs = np.concatenate([p["probs"] for p in parts if len(p["probs"])], axis=0)
    perm = np.argsort(order)
    return {"loss_sum": np.asarray(sum(float(p["loss_sum"]) for p in parts)), "labels": labels[perm],
            "probs": probs[perm]}


# ----------------------------------------------------------------------------------------------------------- state
@dataclass
class Runtime:
    """Where and how a run computes, fixed for its whole length: config, device, process group, mixed precision,
    where events go, and when to stop (SIGTERM's flag, train.time_limit's deadline)."""

    cfg: Config
    device: torch.device
    info: D.DistInfo = field(default_factory=D.DistInfo)
    sink: EventSink = field(default_factory=NullSink)
    autocast: Any = field(default_factory=nullcontext)
    scaler: torch.amp.GradScaler | None = None
    amp: str | None = None
    """"bf16", "fp16" or None (fp32): what the report's `amp` says."""
    channels_last: bool = False
    stop_flag: dict[str, bool] = field(default_factory=lambda: {"stop": False})
    deadline: float | None = None
    """time.time() past which the run fails as timed out; None = no limit."""

    @classmethod
    def create(cls, cfg: Config, device: torch.device, info: D.DistInfo | None = None, sink: EventSink | None = None,
               *, stop_flag: dict[str, bool] | None = None, deadline: float | None = None) -> Runtime:
        autocast, scaler, amp = autocast_context(cfg, device)
        return cls(cfg, device, info or D.DistInfo(), sink or NullSink(), autocast, scaler, amp,
                   use_channels_last(cfg, device), stop_flag if stop_flag is not None else {"stop": False}, deadline)

    def check_stop(self) -> None:
        """Called between steps (and embedding batches): Cancelled after SIGTERM, TrainingError past
        train.time_limit. Both leave at a point where the last checkpoint is whole."""
        if self.stop_flag.get("stop"):
            raise Cancelled("received SIGTERM: run cancelled")
        if self.deadline is not None and time.time() > self.deadline:
            raise TrainingError(f"timed out: the run exceeded train.time_limit={self.cfg.train.time_limit:g} s")


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
    head: nn.Module | None = None
    """With the feature cache: what trains and what val batches (features) go through, the model's own head."""
    """The epoch event of the checkpoint resumed from, sent again so every sink has seen it."""

    @property
    def stepped(self) -> nn.Module:
        return self.train_model if self.train_model is not None else self.model


def create_train_state(rt: Runtime, model: nn.Module, steps_per_epoch: int) -> TrainState:
    """Optimizer, per-step schedule and loss for `model` (not yet wrapped for DDP or compile)."""
    optimizer = create_optimizer(rt.cfg, model)
    return TrainState(model, optimizer, create_scheduler(rt.cfg, optimizer, steps_per_epoch),
                      nn.CrossEntropyLoss(label_smoothing=rt.cfg.train.label_smoothing))


# ------------------------------------------------------------------------------------------------------ epoch loop
def train_one_epoch(rt: Runtime, state: TrainState, loader: Any, epoch: int) -> dict[str, float]:
    """One pass over `loader`: step events every train.log_every steps; returns the epoch's train stats."""
    cfg, model, optimizer = rt.cfg, state.stepped, state.optimizer
    set_train_mode(model)  # frozen submodules (BatchNorm stats, stochastic depth) stay in eval mode
    steps_per_epoch = len(loader)
    loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
    correct = torch.zeros((), device=rt.device, dtype=torch.int64)
    seen = 0
    window_start, window_images = time.perf_counter(), 0
    epoch_start = time.perf_counter()
    progress = _progress(steps_per_epoch, f"epoch {epoch}/{cfg.train.epochs}", rt.info)
    for step, (x, y) in enumerate(loader, start=1):
        rt.check_stop()
        x = x.to(rt.device, non_blocking=True)
        y = y.to(rt.device, non_blocking=True)
        if rt.channels_last and x.dim() == 4:  # cached features are [B, D]
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast:
            logits = model(x)
            loss = state.criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if rt.scaler is not None:
            rt.scaler.scale(loss).backward()
            if cfg.train.grad_clip:
                rt.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            rt.scaler.step(optimizer)
            rt.scaler.update()
        else:
            loss.backward()
            if cfg.train.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
        state.scheduler.step()
        batch = y.shape[0]
        loss_sum += loss.detach().double() * batch
        correct += (logits.detach().argmax(1) == y).sum()
        seen += batch
        window_images += batch
        state.global_step += 1
        progress.update(1)
        # the run's very first step is reported at once so a watcher sees the job training without waiting log_every
        if step % cfg.train.log_every == 0 or step == steps_per_epoch or state.global_step == 1:
            loss_value = loss.item()  # host sync point, only every log_every steps
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss became {loss_value} at epoch {epoch} step {step}; lower optim.lr, enable train.grad_clip "
                    "or check the data"
                )
            now = time.perf_counter()
            ips = window_images * rt.info.world_size / max(now - window_start, 1e-9)
            window_start, window_images = now, 0
            if rt.info.is_primary:
                rt.sink.emit("step", {"epoch": epoch, "step": step, "global_step": state.global_step,
                                      "steps_per_epoch": steps_per_epoch, "loss": loss_value,
                                      "lr": optimizer.param_groups[-1]["lr"], "images_per_sec": ips})
    progress.close()
    seconds = time.perf_counter() - epoch_start
    totals = D.all_reduce_sum([float(loss_sum.item()), float(correct.item()), float(seen)], rt.device, rt.info)
    if not math.isfinite(totals[0]):
        raise TrainingError(f"loss became non-finite during epoch {epoch}; lower optim.lr or enable train.grad_clip")
    n = max(totals[2], 1.0)
    return {"train_loss": totals[0] / n, "train_acc": totals[1] / n, "seconds": seconds,
            "images_per_sec": totals[2] / max(seconds, 1e-9)}


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, info: D.DistInfo) -> Any:
    if not info.is_primary or not sys.stderr.isatty():
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def evaluate_split(rt: Runtime, model: nn.Module, loaders: dict[str, Any], split: str,
                   classes: list[str], *, fp32: bool = False) -> tuple[dict[str, Any], dict]:
    """Metrics of `model` on a split (each rank predicts its shard; every rank gets the whole split's metrics).
    fp32: without the run's autocast."""
    out = predict(model, loaders[split], rt.device, autocast=nullcontext() if fp32 else rt.autocast,
                  channels_last=rt.channels_last)
    out = gather_predictions(out, loaders[f"{split}_idx"], rt.info)
    return compute_metrics(out["labels"], out["probs"], classes, loss_sum=float(out["loss_sum"])), out


def epoch_event(rt: Runtime, state: TrainState, epoch: int, stats: dict[str, float],
                val_metrics: dict[str, Any]) -> dict[str, Any]:
    """The `epoch` event: train stats, validation metrics, the lr and the best val accuracy so far."""
    return {"epoch": epoch, "epochs": rt.cfg.train.epochs, **stats, "val_loss": val_metrics.get("loss", 0.0),
            "val_acc": val_metrics["accuracy"], "val_macro_f1": val_metrics["macro_f1"],
            "lr": state.optimizer.param_groups[-1]["lr"], "best_val_acc": state.best_val_acc}


def run_epochs(rt: Runtime, state: TrainState, loaders: dict[str, Any], classes: list[str], out: Path) -> None:
    """Epochs state.epoch+1 .. train.epochs: train, validate, checkpoint (rank 0), emit; early stopping."""
    cfg = rt.cfg
    for epoch in range(state.epoch + 1, cfg.train.epochs + 1):
        set_epoch(loaders, cfg, epoch, rt.info)
        stats = train_one_epoch(rt, state, loaders["train"], epoch)
        val_metrics, _ = evaluate_split(rt, state.head or state.model, loaders, "val", classes)
        improved = val_metrics["accuracy"] > state.best_val_acc
        if improved:
            state.best_val_acc, state.stale_epochs = val_metrics["accuracy"], 0
        else:
            state.stale_epochs += 1
        event = epoch_event(rt, state, epoch, stats, val_metrics)
        if rt.info.is_primary:
            save_checkpoint(out / rf.LAST_CHECKPOINT, rt, state, epoch, event, val_metrics)
            if improved:
                rf.save_best_checkpoint(out / rf.BEST_CHECKPOINT, state.model, epoch=epoch, cfg=cfg,
                                        val_metrics=val_metrics)
        D.barrier(rt.info)
        rt.sink.emit("epoch", event)  # after the checkpoint: a crash in between is healed on resume
        state.epoch = epoch
        if cfg.train.early_stopping and state.stale_epochs >= cfg.train.early_stopping:
            rt.sink.emit("phase", {"phase": "early_stop", "epoch": epoch})
            break


# ------------------------------------------------------------------------------------------------------ checkpoint
def save_checkpoint(path: Path, rt: Runtime, state: TrainState, epoch: int, event: dict[str, Any],
                    val_metrics: dict[str, Any]) -> None:
    """checkpoints/last.pt: everything a resume needs to continue exactly where this epoch ended."""
    rf.atomic_torch_save({
        "model": unwrap_model(state.model).state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.scheduler.state_dict(),
        "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
        "epoch": epoch,
        "rng": rng_state(),
        "config": rt.cfg.to_dict(),
        "best_val_acc": state.best_val_acc,
        "stale_epochs": state.stale_epochs,
        "epoch_event": event,
        "val_metrics": val_metrics,
    }, path)


def resume_from(rt: Runtime, state: TrainState, path: Path) -> None:
    """Load checkpoints/last.pt into the state (model, optimizer, schedule, scaler, RNGs, progress), if it exists."""
    if not path.exists():
        return
    ckpt = rf.load_checkpoint(path)
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["lr_scheduler"])
    if rt.scaler is not None and ckpt.get("scaler"):
        rt.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    state.epoch = int(ckpt["epoch"])
    state.best_val_acc = float(ckpt.get("best_val_acc", -1.0))
    state.stale_epochs = int(ckpt.get("stale_epochs", 0))
    state.last_epoch_event = ckpt.get("epoch_event")


# ------------------------------------------------------------------------------------------------------------ steps
def prepare_run_folder(cfg: Config, out: Path, *, resume: bool, sink: EventSink | None) -> list[EventSink]:
    """Rank 0: write config.yaml, clear a previous attempt's report and markers, keep (resume) or drop the events;
    returns the sinks of this run (metrics.jsonl, the console, CORE_EVENT_SINK's, the caller's, TensorBoard/MLflow)."""
    (out / rf.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / rf.CONFIG)
    for stale in (rf.REPORT, *rf.MARKERS):
        (out / stale).unlink(missing_ok=True)
    metrics = out / rf.METRICS
    if resume:
        _truncate_metrics(metrics, _peek_epoch(out / rf.LAST_CHECKPOINT))
    else:
        metrics.unlink(missing_ok=True)
    from core.tracking import tracking_sinks  # TensorBoard, MLflow: imported on their own thread

    return [JsonlSink(metrics), PrintSink(), sink_from_env(), sink,
            *tracking_sinks(cfg.track, cfg.to_dict(), out, resume=resume)]


def load_data(rt: Runtime, out: Path) -> Any:
    """The seeded DataBundle; rank 0 writes labels.json, split.json and preprocess.json."""
    seed_everything(rt.cfg.train.seed)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    from core.data import build_datasets

    bundle = build_datasets(rt.cfg)
    if len(bundle.train) < rt.info.world_size:
        raise DataError(f"the train split has {len(bundle.train)} images, fewer than {rt.info.world_size} ranks")
    if rt.info.is_primary:
        rf.write_json(out / rf.LABELS, list(bundle.classes))
        rf.write_json(out / rf.SPLIT, bundle.split)
        rf.write_json(out / rf.PREPROCESS, {"input_name": "input", **bundle.preprocess})
    return bundle


def build_training_model(rt: Runtime, bundle: Any) -> nn.Module:
    """The config's model for the bundle's images, frozen as asked, on the device in its memory format."""
    from core.models import freeze_backbone

    model = rf.create_run_model(rt.cfg, len(bundle.classes), bundle.preprocess, pretrained=rt.cfg.model.pretrained)
    if rt.cfg.model.freeze == "backbone":
        freeze_backbone(model)
    model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_inputs(rt: Runtime, bundle: Any) -> dict[str, Any]:
    """What the epoch loop iterates: loaders for train (sharded, shuffled per epoch) and val/test (see make_loaders)."""
    loaders = make_loaders(rt.cfg, bundle, rt.info, rt.device)
    if len(loaders["train"]) == 0:
        raise DataError(f"train.batch_size={rt.cfg.train.batch_size} is larger than the train split "
                        f"({len(bundle.train)} images over {rt.info.world_size} rank(s))")
    return loaders


def wrap_for_training(rt: Runtime, model: nn.Module) -> nn.Module:
    """DistributedDataParallel under torchrun, then torch.compile when train.compile is set."""
    wrapped = model
    if rt.info.enabled:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.cfg.train.compile and getattr(model, "head_name", None):  # a bare feature-cache head is not compiled
        wrapped = torch.compile(wrapped)
    return wrapped


def test_and_report(rt: Runtime, state: TrainState, loaders: dict[str, Any], bundle: Any, out: Path,
                    t0: float) -> dict[str, Any]:
    """Test the best checkpoint (last.pt when no epoch improved); rank 0 writes predictions, samples and
    report.json and returns the report (other ranks: {})."""
    D.barrier(rt.info)
    best_path = out / rf.BEST_CHECKPOINT
    best = rf.load_checkpoint(best_path if best_path.exists() else out / rf.LAST_CHECKPOINT)
    model = state.model
    model.load_state_dict(best["model"])
    classes = list(bundle.classes)
    # with the feature cache (maybe bf16 features) the test split goes through the whole model in fp32, as exported
    test_metrics, test_out = evaluate_split(rt, model, loaders, "test", classes, fp32="feature_cache" in loaders)
    if not rt.info.is_primary:
        return {}
    cfg = rt.cfg
    report: dict[str, Any] = {
        "test": test_metrics,
        "val": {**(best.get("val_metrics") or {}), "epoch": int(best.get("epoch", state.epoch))},
        "data": {"name": cfg.data.name, "dataset": cfg.data.dataset, "classes": classes, "counts": bundle.counts,
                 "class_counts": bundle.class_counts, "preprocess": bundle.preprocess},
        "skipped_files": bundle.skipped_files,
        "epochs_completed": state.epoch,
        "world_size": rt.info.world_size,
        "device": str(rt.device),
        "amp": rt.amp,
        "channels_last": rt.channels_last,
        "data_path": loaders.get("kind", "dataloader"),
        "seconds": time.time() - t0,
        "model": {"name": cfg.model.name, "parameters": sum(p.numel() for p in model.parameters())},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    if "feature_cache" in loaders:
        report["feature_cache"] = loaders["feature_cache"]
    report["misclassified"] = write_predictions(out, bundle, test_out, classes)
    report["samples"] = write_samples(out, bundle, classes)
    rf.write_json(out / rf.REPORT, report)
    rt.sink.emit("report", {k: v for k, v in report.items() if k not in ("misclassified",)})
    return report


# ------------------------------------------------------------------------------------------------------------ train
def train(cfg: Config, out_dir: str | Path, *, resume: bool = False, sink: EventSink | None = None) -> dict[str, Any]:
    """Run the whole recipe; returns the report (also written to RUN_DIR/report.json by rank 0)."""
    t0 = time.time()
    out = Path(out_dir)
    info, device = D.init_distributed(cfg.train.device)
    stop_flag = {"stop": False}
    install_sigterm(stop_flag, on_cancel=lambda: _mark_cancelled(out) if info.is_primary else None)
    sinks: list[EventSink] = []
    try:
        if info.is_primary:
            sinks = prepare_run_folder(cfg, out, resume=resume, sink=sink)
        D.barrier(info)
        rt = Runtime.create(cfg, device, info, MultiSink(*sinks) if info.is_primary else NullSink(),
                            stop_flag=stop_flag, deadline=t0 + cfg.train.time_limit if cfg.train.time_limit else None)
        rt.sink.emit("phase", {"phase": "data"})
        bundle = load_data(rt, out)
        model = build_training_model(rt, bundle)
        loaders = prepare_inputs(rt, bundle)
        plan, plan_reason = plan_feature_cache(cfg, model, bundle, info.world_size)
        if plan is not None:
            loaders = cache_features(rt, plan, model, bundle, loaders)
        state = create_train_state(rt, model, len(loaders["train"]))
        state.head = loaders.get("head")
        if resume:
            resume_from(rt, state, out / rf.LAST_CHECKPOINT)
        state.train_model = wrap_for_training(rt, state.head or model)
        state.global_step = state.epoch * len(loaders["train"])

        rt.sink.emit("start", {"epochs": cfg.train.epochs, "world_size": info.world_size,
                               "classes": list(bundle.classes), "counts": bundle.counts, "config": cfg.to_dict(),
                               "device": str(device), "amp": rt.amp, "resumed_from": state.epoch or None,
                               "steps_per_epoch": len(loaders["train"]),
                               "data_path": loaders.get("kind", "dataloader"),
                               "feature_cache": loaders.get("feature_cache") or {"off": plan_reason}})
        if state.last_epoch_event is not None:
            rt.sink.emit("epoch", state.last_epoch_event)  # sinks drop it if already seen: each epoch appears once
        rt.sink.emit("phase", {"phase": "train"})
        run_epochs(rt, state, loaders, list(bundle.classes), out)

        # ---- test with the best checkpoint; from here on SIGTERM stops the run at once (no step checks the flag)
        stop_flag["immediate"] = True
        if stop_flag["stop"]:
            raise Cancelled("received SIGTERM: run cancelled")
        rt.sink.emit("phase", {"phase": "test"})
        report = test_and_report(rt, state, loaders, bundle, out, t0)
        D.barrier(info)
        D.cleanup_distributed()
        if info.is_primary and cfg.export.enabled:
            report = _export(out, report, rt.sink)
        rt.sink.emit("phase", {"phase": "done"})
        return report
    except BaseException as err:
        if info.is_primary:
            try:
                rf.mark(out, rf.marker_for(err), f"{type(err).__name__}: {err}")
                for s in sinks:
                    if s is not None:
                        s.emit("error", {"error": str(err), "kind": type(err).__name__})
            except OSError:
                pass
        raise
    finally:
        for s in sinks:
            if s is not None:
                s.close()
        D.cleanup_distributed()


def _export(out: Path, report: dict[str, Any], sink: EventSink) -> dict[str, Any]:
    sink.emit("phase", {"phase": "export"})
    try:
        from core.export import export_run
    except ImportError:
        return report
    export_run(out)
    return rf.read_json(out / rf.REPORT)


def write_predictions(out: Path, bundle: Any, test_out: dict[str, np.ndarray], classes: list[str]) -> list[dict]:
    """predictions.jsonl (every test sample) and PNGs of the first misclassified ones for the gallery."""
    probs, labels = test_out["probs"], test_out["labels"]
    if len(labels) == 0:
        return []
    preds, conf = probs.argmax(1), probs.max(1)
    (out / rf.MISCLASSIFIED).mkdir(exist_ok=True)
    misclassified = []
    with (out / rf.PREDICTIONS).open("w", encoding="utf-8") as fh:
        for i, (t, p, c) in enumerate(zip(labels, preds, conf)):
            sample_id = bundle.test_ids[i]
            fh.write(json.dumps({"index": i, "id": sample_id, "true": int(t), "pred": int(p),
                                 "confidence": float(c)}) + "\n")
            if t != p and len(misclassified) < MISCLASSIFIED_MAX:
                name = f"{rf.MISCLASSIFIED}/{len(misclassified):04d}.png"
                bundle.eval_image("test", i).save(out / name)
                misclassified.append({"index": i, "id": sample_id, "true": classes[t], "pred": classes[p],
                                      "confidence": float(c), "image": name})
    return misclassified


def write_samples(out: Path, bundle: Any, classes: list[str]) -> list[dict]:
    """A few test images per class as PNGs (what "Try it" offers to classify)."""
    (out / rf.SAMPLES).mkdir(exist_ok=True)
    per_class: dict[int, int] = {}
    samples = []
    labels = bundle.eval_uint8("test")[1].tolist() if hasattr(bundle, "eval_uint8") else []
    for i, label in enumerate(labels):
        if per_class.get(label, 0) >= SAMPLES_PER_CLASS:
            continue
        per_class[label] = per_class.get(label, 0) + 1
        name = f"{rf.SAMPLES}/{len(samples):04d}.png"
        bundle.eval_image("test", i).save(out / name)
        samples.append({"index": i, "label": classes[label], "image": name})
    return samples


def _mark_cancelled(out: Path) -> None:
    with contextlib.suppress(OSError):
        rf.mark(out, rf.CANCELLED, "Cancelled: received SIGTERM after training (test or export phase)")


def _peek_epoch(path: Path) -> int:
    if not path.exists():
        return 0
    return int(rf.load_checkpoint(path).get("epoch", 0))


def _truncate_metrics(path: Path, epoch: int) -> None:
    """On resume, forget events of epochs after the checkpoint (they will be run again)."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path)
            if r.get("type") not in ("step", "epoch") or int(r["data"].get("epoch", 0)) <= epoch]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")


def install_sigterm(flag: dict[str, bool], on_cancel: Any = None) -> None:
    """SIGTERM (cancel) stops at the next step so the run folder is marked CANCELLED instead of torn mid-write.

    Past the training loop (test, export) no step checks the flag, and an exception raised from here could be
    swallowed by library code (the ONNX exporter catches broadly): once `flag["immediate"]` is set, the handler marks
    the run (`on_cancel`) and lets SIGTERM kill the process, leaving `export.partial/`, never a half `export/`.
    """
    def handler(signum: int, frame: Any) -> None:
        flag["stop"] = True
        if flag.get("immediate"):
            if on_cancel is not None:
                on_cancel()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test thread)
        pass


# -------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.train", description="Train an image classifier.")
    p.add_argument("config", help="YAML preset, e.g. configs/digits.yaml")
    p.add_argument("--out", required=True, help="run folder (created); holds config, checkpoints, report, export")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt if present")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        overrides = list(args.overrides)
        raw_path: str | None = args.config
        if args.resume and (Path(args.out) / rf.CONFIG).exists():
            raw_path = str(Path(args.out) / rf.CONFIG)  # resume with the resolved config of the run
            load_yaml(raw_path)
        cfg = load_config(raw_path, overrides)
        report = train(cfg, args.out, resume=args.resume)
    except CoreError as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - anything else is a training failure: exit 1 with the traceback
        if rank == 0:
            traceback.print_exc()
            print("error: training failed (traceback above)", file=sys.stderr)
        return 1
    if rank == 0 and report:
        test = report["test"]
        print(f"done: test accuracy {test['accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f}  "
              f"epochs {report['epochs_completed']}  {report['seconds']:.1f}s  → {args.out}")
        if "export" in report:
            print(f"export: {Path(args.out) / rf.EXPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
