"""Train an image classifier: `python -m core.train CONFIG --out RUN_DIR [--set k=v ...] [--resume]`.

The loop is written out top to bottom: build data → model → optimizer/scheduler → for each epoch train, evaluate on
val, checkpoint → test the best checkpoint → report (→ export). The same entry point runs under
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from core import distributed as D
from core.config import Config, load_config, load_yaml, save_config
from core.errors import Cancelled, ConfigError, CoreError, DataError, TrainingError, exit_code
from core.evaluate import compute_metrics, predict
from core.features import build_feature_loaders, plan_feature_cache
from core.events import EventSink, JsonlSink, MultiSink, NullSink, PrintSink, read_jsonl, sink_from_env
from core.models import set_train_mode

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


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temp file then rename, so a crash never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
        raise ConfigError("model: no trainable parameters (check model.freeze)")
    name = cfg.optim.name
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.optim.lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    raise ConfigError(f"optim.name: unknown optimizer {name!r}; choose from adamw, sgd")


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

    if name not in ("cosine", "step", "none"):
        raise ConfigError(f"sched.name: unknown schedule {name!r}; choose from cosine, onecycle, step, none")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------------- loaders
def make_loaders(cfg: Config, bundle: Any, info: D.DistInfo, device: torch.device) -> dict[str, Any]:
    """DataLoaders for train (sharded, shuffled per epoch) and val/test (sharded without padding, gathered later)."""
    if cfg.data.cache != "off":
        try:
            from core.data.fast import make_fast_loaders  # the tensor-cache path (Performance issue)
        except ImportError:
            make_fast_loaders = None
        if make_fast_loaders is not None:
            fast = make_fast_loaders(cfg, bundle, info, device)
            if fast is not None:
                return fast
    pin = cfg.data.pin_memory and device.type == "cuda"
    workers = cfg.data.num_workers
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
    eval_bs = cfg.train.eval_batch_size or max(cfg.train.batch_size, 256)

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


def cache_features(cfg: Config, plan: Any, model: nn.Module, bundle: Any, loaders: dict[str, Any],
                   info: D.DistInfo, device: torch.device, sink: EventSink, autocast: Any, amp: str | None,
                   stop: Any = None) -> dict[str, Any]:
    """The feature-cache step (core.features): embed train views and val with the frozen backbone, reporting progress
    as `embed` events and on the CLI's progress bar; returns loaders whose train/val batches are features."""
    sink.emit("phase", {"phase": "embed"})
    total = plan.views * plan.n_train + plan.n_val
    bar = _progress(total, f"embedding {plan.views} view(s)", info)

    def report(done: int, total: int, images_per_sec: float) -> None:
        bar.update(done - report.shown)
        report.shown = done
        sink.emit("embed", {"done": done, "total": total, "views": plan.views, "images_per_sec": images_per_sec})
    report.shown = 0

    try:
        return build_feature_loaders(cfg, plan, model, bundle, loaders, info, device, autocast=autocast,
                                     precision=amp or "fp32", channels_last=use_channels_last(cfg, device),
                                     report=report, stop=stop)
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


# ------------------------------------------------------------------------------------------------------ epoch loop
def train_one_epoch(
    model: nn.Module, loader: Any, criterion: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    scaler: torch.amp.GradScaler | None, autocast: Any, cfg: Config, device: torch.device, epoch: int,
    info: D.DistInfo, sink: EventSink, global_step: int, deadline: float | None, stop_flag: dict[str, bool],
) -> tuple[dict[str, float], int]:
    set_train_mode(model)  # frozen submodules (BatchNorm stats, stochastic depth) stay in eval mode
    steps_per_epoch = len(loader)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    window_start, window_images = time.perf_counter(), 0
    epoch_start = time.perf_counter()
    progress = _progress(steps_per_epoch, f"epoch {epoch}/{cfg.train.epochs}", info)
    channels_last = use_channels_last(cfg, device)
    for step, (x, y) in enumerate(loader, start=1):
        if stop_flag.get("stop"):
            raise Cancelled("received SIGTERM: run cancelled")
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:  # cached features are [B, D]
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if cfg.train.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if cfg.train.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
        scheduler.step()
        batch = y.shape[0]
        loss_sum += loss.detach().double() * batch
        correct += (logits.detach().argmax(1) == y).sum()
        seen += batch
        window_images += batch
        global_step += 1
        progress.update(1)
        # the run's very first step is reported at once so a watcher sees the job training without waiting log_every
        if step % cfg.train.log_every == 0 or step == steps_per_epoch or global_step == 1:
            loss_value = loss.item()  # host sync point, only every log_every steps
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss became {loss_value} at epoch {epoch} step {step}; lower optim.lr, enable train.grad_clip "
                    "or check the data"
                )
            now = time.perf_counter()
            ips = window_images * info.world_size / max(now - window_start, 1e-9)
            window_start, window_images = now, 0
            if info.is_primary:
                sink.emit("step", {"epoch": epoch, "step": step, "global_step": global_step,
                                   "steps_per_epoch": steps_per_epoch, "loss": loss_value,
                                   "lr": optimizer.param_groups[-1]["lr"], "images_per_sec": ips})
            if deadline is not None and time.time() > deadline:
                raise TrainingError(f"timed out: the run exceeded train.time_limit={cfg.train.time_limit:g} s")
    progress.close()
    seconds = time.perf_counter() - epoch_start
    totals = D.all_reduce_sum([float(loss_sum.item()), float(correct.item()), float(seen)], device, info)
    if not math.isfinite(totals[0]):
        raise TrainingError(f"loss became non-finite during epoch {epoch}; lower optim.lr or enable train.grad_clip")
    n = max(totals[2], 1.0)
    return {"train_loss": totals[0] / n, "train_acc": totals[1] / n, "seconds": seconds,
            "images_per_sec": totals[2] / max(seconds, 1e-9)}, global_step


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


def evaluate_split(model: nn.Module, loaders: dict[str, Any], split: str, autocast: Any, cfg: Config,
                   device: torch.device, info: D.DistInfo, classes: list[str]) -> tuple[dict[str, Any], dict]:
    out = predict(model, loaders[split], device, autocast=autocast, channels_last=use_channels_last(cfg, device))
    out = gather_predictions(out, loaders[f"{split}_idx"], info)
    return compute_metrics(out["labels"], out["probs"], classes, loss_sum=float(out["loss_sum"])), out


# ------------------------------------------------------------------------------------------------------ checkpoint
def save_checkpoint(path: Path, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, epoch: int,
                    cfg: Config, extra: dict[str, Any]) -> None:
    atomic_torch_save({
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "rng": rng_state(),
        "config": cfg.to_dict(),
        **extra,
    }, path)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


# ------------------------------------------------------------------------------------------------------------ train
def train(cfg: Config, out_dir: str | Path, *, resume: bool = False, sink: EventSink | None = None) -> dict[str, Any]:
    """Run the whole recipe; returns the report (also written to RUN_DIR/report.json by rank 0)."""
    t0 = time.time()
    out = Path(out_dir)
    info, device = D.init_distributed(cfg.train.device)
    stop_flag = {"stop": False}
    install_sigterm(stop_flag, on_cancel=lambda: _mark_cancelled(out) if info.is_primary else None)
    ckpt_dir = out / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    sinks: list[EventSink] = []
    try:
        if info.is_primary:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
            for stale in ("report.json", "CANCELLED", "FAILED"):
                (out / stale).unlink(missing_ok=True)
            resume_epoch = _peek_epoch(last_path) if resume else 0
            if not resume:
                (out / "metrics.jsonl").unlink(missing_ok=True)
            else:
                _truncate_metrics(out / "metrics.jsonl", resume_epoch)
            from core.tracking import tracking_sinks  # TensorBoard, MLflow: imported on their own thread

            sinks = [JsonlSink(out / "metrics.jsonl"), PrintSink(), sink_from_env(), sink,
                     *tracking_sinks(cfg.track, cfg.to_dict(), out, resume=resume)]
        D.barrier(info)
        sink_all: EventSink = MultiSink(*sinks) if info.is_primary else NullSink()
        sink_all.emit("phase", {"phase": "data"})

        seed_everything(cfg.train.seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        from core.data import build_datasets
        from core.models import create_model, freeze_backbone

        bundle = build_datasets(cfg)
        classes = list(bundle.classes)
        if len(bundle.train) < info.world_size:
            raise DataError(f"the train split has {len(bundle.train)} images, fewer than {info.world_size} ranks")
        if info.is_primary:
            write_json(out / "labels.json", classes)
            write_json(out / "split.json", bundle.split)
            write_json(out / "preprocess.json", {"input_name": "input", **bundle.preprocess})

        image_size = int(bundle.preprocess["input_size"][0])
        model = create_model(cfg.model.name, len(classes), in_chans=bundle.in_chans, pretrained=cfg.model.pretrained,
                             image_size=image_size, small_input=cfg.model.small_input, dropout=cfg.model.dropout)
        if cfg.model.freeze == "backbone":
            freeze_backbone(model)
        model.to(device)
        if use_channels_last(cfg, device):
            model = model.to(memory_format=torch.channels_last)
        plan, plan_reason = plan_feature_cache(cfg, model, bundle, info.world_size)
        loaders = make_loaders(cfg, bundle, info, device)
        autocast, scaler, amp_dtype = autocast_context(cfg, device)
        if plan is not None:
            loaders = cache_features(cfg, plan, model, bundle, loaders, info, device, sink_all, autocast, amp_dtype,
                                     stop=lambda: stop_flag["stop"])
        steps_per_epoch = len(loaders["train"])
        if steps_per_epoch == 0:
            raise DataError(f"train.batch_size={cfg.train.batch_size} is larger than the train split "
                            f"({len(bundle.train)} images over {info.world_size} rank(s))")
        optimizer = create_optimizer(cfg, model)
        scheduler = create_scheduler(cfg, optimizer, steps_per_epoch)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

        start_epoch, best_val_acc, stale_epochs, last_epoch_event = 1, -1.0, 0, None
        if resume and last_path.exists():
            ckpt = load_checkpoint(last_path)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["lr_scheduler"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
            start_epoch = int(ckpt["epoch"]) + 1
            best_val_acc = float(ckpt.get("best_val_acc", -1.0))
            stale_epochs = int(ckpt.get("stale_epochs", 0))
            last_epoch_event = ckpt.get("epoch_event")
        # with the feature cache only the head steps (and is what val batches, being features, go through)
        train_model: nn.Module = loaders.get("head", model)
        eval_model = train_model
        if info.enabled:
            train_model = nn.parallel.DistributedDataParallel(
                train_model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.train.compile and plan is None:
            train_model = torch.compile(train_model)

        sink_all.emit("start", {"epochs": cfg.train.epochs, "world_size": info.world_size, "classes": classes,
                                "counts": bundle.counts, "config": cfg.to_dict(), "device": str(device),
                                "amp": amp_dtype, "resumed_from": start_epoch - 1 if start_epoch > 1 else None,
                                "steps_per_epoch": steps_per_epoch,
                                "data_path": loaders.get("kind", "dataloader"),
                                "feature_cache": loaders.get("feature_cache") or {"off": plan_reason}})
        if last_epoch_event is not None:
            sink_all.emit("epoch", last_epoch_event)  # sinks drop it if already seen: each epoch appears once
        sink_all.emit("phase", {"phase": "train"})
        deadline = t0 + cfg.train.time_limit if cfg.train.time_limit else None
        global_step = (start_epoch - 1) * steps_per_epoch
        epochs_completed = start_epoch - 1
        for epoch in range(start_epoch, cfg.train.epochs + 1):
            set_epoch(loaders, cfg, epoch, info)
            stats, global_step = train_one_epoch(
                train_model, loaders["train"], criterion, optimizer, scheduler, scaler, autocast, cfg, device,
                epoch, info, sink_all, global_step, deadline, stop_flag)
            val_metrics, _ = evaluate_split(eval_model, loaders, "val", autocast, cfg, device, info, classes)
            improved = val_metrics["accuracy"] > best_val_acc
            if improved:
                best_val_acc, stale_epochs = val_metrics["accuracy"], 0
            else:
                stale_epochs += 1
            event = {"epoch": epoch, "epochs": cfg.train.epochs, **stats, "val_loss": val_metrics.get("loss", 0.0),
                     "val_acc": val_metrics["accuracy"], "val_macro_f1": val_metrics["macro_f1"],
                     "lr": optimizer.param_groups[-1]["lr"], "best_val_acc": best_val_acc}
            if info.is_primary:
                extra = {"best_val_acc": best_val_acc, "stale_epochs": stale_epochs, "epoch_event": event,
                         "val_metrics": val_metrics}
                save_checkpoint(last_path, model, optimizer, scheduler, scaler, epoch, cfg, extra)
                if improved:
                    atomic_torch_save({"model": unwrap(model).state_dict(), "epoch": epoch, "config": cfg.to_dict(),
                                       "val_metrics": val_metrics, "best_val_acc": best_val_acc}, best_path)
            D.barrier(info)
            sink_all.emit("epoch", event)  # after the checkpoint: a crash in between is healed on resume
            epochs_completed = epoch
            if cfg.train.early_stopping and stale_epochs >= cfg.train.early_stopping:
                sink_all.emit("phase", {"phase": "early_stop", "epoch": epoch})
                break

        # ---- test with the best checkpoint; from here on SIGTERM stops the run at once (no step checks the flag)
        stop_flag["immediate"] = True
        if stop_flag["stop"]:
            raise Cancelled("received SIGTERM: run cancelled")
        sink_all.emit("phase", {"phase": "test"})
        D.barrier(info)
        best = load_checkpoint(best_path if best_path.exists() else last_path)
        model.load_state_dict(best["model"])
        best_val = best.get("val_metrics") or {}
        # the feature cache may hold bf16 features: its test split goes through the whole model in fp32, as exported
        test_autocast = nullcontext() if plan is not None else autocast
        test_metrics, test_out = evaluate_split(model, loaders, "test", test_autocast, cfg, device, info, classes)
        report: dict[str, Any] = {}
        if info.is_primary:
            report = {
                "test": test_metrics,
                "val": {**best_val, "epoch": int(best.get("epoch", epochs_completed))},
                "data": {"name": cfg.data.name, "classes": classes, "counts": bundle.counts,
                         "class_counts": bundle.class_counts, "preprocess": bundle.preprocess},
                "skipped_files": bundle.skipped_files,
                "epochs_completed": epochs_completed,
                "world_size": info.world_size,
                "device": str(device),
                "amp": amp_dtype,
                "channels_last": use_channels_last(cfg, device),
                "data_path": loaders.get("kind", "dataloader"),
                "seconds": time.time() - t0,
                "model": {"name": cfg.model.name, "parameters": sum(p.numel() for p in model.parameters())},
                "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
            }
            if "feature_cache" in loaders:
                report["feature_cache"] = loaders["feature_cache"]
            report["misclassified"] = write_predictions(out, bundle, test_out, classes)
            report["samples"] = write_samples(out, bundle, classes)
            write_json(out / "report.json", report)
            sink_all.emit("report", {k: v for k, v in report.items() if k not in ("misclassified",)})
        D.barrier(info)
        D.cleanup_distributed()
        if info.is_primary and cfg.export.enabled:
            report = _export(out, report, sink_all)
        sink_all.emit("phase", {"phase": "done"})
        return report
    except BaseException as err:
        if info.is_primary:
            marker = "CANCELLED" if isinstance(err, (Cancelled, KeyboardInterrupt)) else "FAILED"
            try:
                (out / marker).write_text(f"{type(err).__name__}: {err}\n", encoding="utf-8")
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
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def write_predictions(out: Path, bundle: Any, test_out: dict[str, np.ndarray], classes: list[str]) -> list[dict]:
    """predictions.jsonl (every test sample) and PNGs of the first misclassified ones for the gallery."""
    probs, labels = test_out["probs"], test_out["labels"]
    if len(labels) == 0:
        return []
    preds, conf = probs.argmax(1), probs.max(1)
    mis_dir = out / "misclassified"
    mis_dir.mkdir(exist_ok=True)
    misclassified = []
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        for i, (t, p, c) in enumerate(zip(labels, preds, conf)):
            sample_id = bundle.test_ids[i]
            fh.write(json.dumps({"index": i, "id": sample_id, "true": int(t), "pred": int(p),
                                 "confidence": float(c)}) + "\n")
            if t != p and len(misclassified) < MISCLASSIFIED_MAX:
                name = f"misclassified/{len(misclassified):04d}.png"
                bundle.eval_image("test", i).save(out / name)
                misclassified.append({"index": i, "id": sample_id, "true": classes[t], "pred": classes[p],
                                      "confidence": float(c), "image": name})
    return misclassified


def write_samples(out: Path, bundle: Any, classes: list[str]) -> list[dict]:
    """A few test images per class as PNGs (what "Try it" offers to classify)."""
    (out / "samples").mkdir(exist_ok=True)
    per_class: dict[int, int] = {}
    samples = []
    labels = bundle.eval_uint8("test")[1].tolist() if hasattr(bundle, "eval_uint8") else []
    for i, label in enumerate(labels):
        if per_class.get(label, 0) >= SAMPLES_PER_CLASS:
            continue
        per_class[label] = per_class.get(label, 0) + 1
        name = f"samples/{len(samples):04d}.png"
        bundle.eval_image("test", i).save(out / name)
        samples.append({"index": i, "label": classes[label], "image": name})
    return samples


def _mark_cancelled(out: Path) -> None:
    with contextlib.suppress(OSError):
        (out / "CANCELLED").write_text("Cancelled: received SIGTERM after training (test or export phase)\n",
                                       encoding="utf-8")


def _peek_epoch(path: Path) -> int:
    if not path.exists():
        return 0
    return int(load_checkpoint(path).get("epoch", 0))


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
        if args.resume and (Path(args.out) / "config.yaml").exists():
            raw_path = str(Path(args.out) / "config.yaml")  # resume with the resolved config of the run
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
            print(f"export: {Path(args.out) / 'export'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
