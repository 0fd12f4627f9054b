"""Train an image classifier: `python -m core.train CONFIG --out RUN_DIR [--set k=v ...] [--resume]`.

`train()` is a few named steps, top to bottom, like torchvision's reference script: open_run (process group, SIGTERM,
run folder and event sinks) → load_data → build_training_model → prepare_inputs (what the loop iterates) →
cache_features (the feature cache, when the backbone is frozen and static) → create_train_state (+ resume_from) →
wrap_for_training → announce (the `start` event) → run_epochs (each epoch: train_one_epoch, evaluate on val,
checkpoint, event) → finish_run (test_and_report → export). What the steps share travels in two small objects of
core.runtime: `Runtime` (how and where the run computes, fixed for the run) and `TrainState` (the model, its optimizer
and how far training got). The same entry point runs under `torchrun --nproc_per_node=N`: DDP with a
DistributedSampler, metrics reduced across ranks, only rank 0 writes files and events.

core.prune runs the same frame (open_run, run_epochs, finish_run) around its pruning step.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import distributed, runfolder
from core.checkpoint import checkpoint_epoch, resume_from, save_checkpoint, truncate_metrics
from core.config import Config, load_config, load_yaml, save_config
from core.data.fast import make_fast_loaders, use_cache
from core.data.loaders import Loaders, make_dataloaders
from core.data.shard_loader import make_shard_loaders, use_shards
from core.distributed import DistInfo
from core.errors import CoreError, DataError, TrainingError, exit_code
from core.evaluate import evaluate_split
from core.events import EventSink, JsonlSink, MultiSink, NullSink, PrintSink, sink_from_env
from core.features import build_feature_loaders, plan_feature_cache
from core.models import set_train_mode
from core.optim import create_optimizer, create_scheduler
from core.report import ExtendReport, OnBest, test_and_report
from core.runtime import Runtime, StopFlag, TrainState, keep_freed_memory, seed_everything


# --------------------------------------------------------------------------------------------------------- loaders
def make_loaders(cfg: Config, bundle: Any, info: DistInfo, device: torch.device) -> Loaders:
    """The one place that picks a loader builder: a prepared form's shards when the job reads one (README "Datasets"),
    the tensor cache when `data.cache` allows it (docs/benchmarks.md), else DataLoader. The feature cache needs the
    model, so it comes later (cache_features)."""
    if use_shards(cfg, bundle):
        return make_shard_loaders(cfg, bundle, info, device)
    if use_cache(cfg, bundle, info.world_size):
        return make_fast_loaders(cfg, bundle, info, device)
    return make_dataloaders(cfg, bundle, info, device)


def set_epoch(loaders: Loaders, cfg: Config, epoch: int, info: DistInfo) -> None:
    """Make epoch `epoch`'s shuffling and augmentation depend only on (seed, epoch, rank) — resumes reproduce it."""
    loaders.set_epoch(epoch, cfg.train.seed)
    seed_everything(cfg.train.seed * 1_000_003 + epoch * 997 + info.rank)


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
    sums = [float(loss_sum.item()), float(correct.item()), float(seen)]
    totals = distributed.all_reduce_sum(sums, rt.device, rt.info)
    if not math.isfinite(totals[0]):
        raise TrainingError(f"loss became non-finite during epoch {epoch}; lower optim.lr or enable train.grad_clip")
    n = max(totals[2], 1.0)
    # `samples`: images trained this epoch on all ranks together, the epoch's sample accounting (a resumed epoch
    # restarts from its beginning, so it counts each of its samples once, never a killed attempt's part as well)
    return {"train_loss": totals[0] / n, "train_acc": totals[1] / n, "seconds": seconds,
            "images_per_sec": totals[2] / max(seconds, 1e-9), "samples": int(totals[2])}


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, info: DistInfo) -> Any:
    if not info.is_primary or not sys.stderr.isatty():
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def epoch_event(rt: Runtime, state: TrainState, epoch: int, stats: dict[str, float],
                val_metrics: dict[str, Any]) -> dict[str, Any]:
    """The `epoch` event: train stats, validation metrics, the lr and the best val accuracy so far."""
    return {"epoch": epoch, "epochs": rt.cfg.train.epochs, **stats, "val_loss": val_metrics.get("loss", 0.0),
            "val_acc": val_metrics["accuracy"], "val_macro_f1": val_metrics["macro_f1"],
            "lr": state.optimizer.param_groups[-1]["lr"], "best_val_acc": state.best_val_acc}


def run_epochs(rt: Runtime, state: TrainState, loaders: Loaders, classes: list[str], out: Path) -> None:
    """Epochs state.epoch+1 .. train.epochs: train, validate, checkpoint (rank 0), emit; early stopping."""
    cfg = rt.cfg
    rt.sink.emit("phase", {"phase": "train"})
    for epoch in range(state.epoch + 1, cfg.train.epochs + 1):
        set_epoch(loaders, cfg, epoch, rt.info)
        stats = train_one_epoch(rt, state, loaders.train, epoch)
        val_metrics, _ = evaluate_split(rt, state.head or state.model, loaders, "val", classes)
        improved = val_metrics["accuracy"] > state.best_val_acc
        if improved:
            state.best_val_acc, state.stale_epochs = val_metrics["accuracy"], 0
        else:
            state.stale_epochs += 1
        event = epoch_event(rt, state, epoch, stats, val_metrics)
        if rt.info.is_primary:
            save_checkpoint(out / runfolder.LAST_CHECKPOINT, rt, state, epoch, event, val_metrics)
            if improved:
                runfolder.save_best_checkpoint(out / runfolder.BEST_CHECKPOINT, state.model, epoch=epoch, cfg=cfg,
                                               val_metrics=val_metrics)
        distributed.barrier(rt.info)
        rt.sink.emit("epoch", event)  # after the checkpoint: a crash in between is healed on resume
        state.epoch = epoch
        if cfg.train.early_stopping and state.stale_epochs >= cfg.train.early_stopping:
            rt.sink.emit("phase", {"phase": "early_stop", "epoch": epoch})
            break


# ------------------------------------------------------------------------------------------------------ run frame
@contextmanager
def open_run(cfg: Config, out: Path, *, resume: bool = False, sink: EventSink | None = None,
             started: float | None = None) -> Iterator[Runtime]:
    """The frame of every run (core.train's and core.prune's): the process group, the SIGTERM handler, the run folder
    and its event sinks (rank 0), then the Runtime. However the run ends, rank 0 marks a run that failed or was
    cancelled (FAILED/CANCELLED with the reason, an `error` event), the sinks close and the process group goes."""
    started = time.time() if started is None else started
    info, device = distributed.init_distributed(cfg.train.device)
    if device.type == "cpu":
        keep_freed_memory()
    stop_flag = StopFlag(on_cancel=lambda: _mark_cancelled(out) if info.is_primary else None)
    stop_flag.handle_sigterm()
    sinks: list[EventSink] = []
    try:
        if info.is_primary:
            sinks = prepare_run_folder(cfg, out, resume=resume, sink=sink)
        distributed.barrier(info)
        yield Runtime.create(cfg, device, info, MultiSink(*sinks) if info.is_primary else NullSink(),
                             stop_flag=stop_flag, started=started,
                             deadline=started + cfg.train.time_limit if cfg.train.time_limit else None)
    except BaseException as err:
        if info.is_primary:
            try:
                runfolder.mark(out, runfolder.marker_for(err), f"{type(err).__name__}: {err}")
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
        distributed.cleanup_distributed()


def prepare_run_folder(cfg: Config, out: Path, *, resume: bool, sink: EventSink | None) -> list[EventSink]:
    """Rank 0: write config.yaml, clear a previous attempt's report and markers, keep (resume) or drop the events;
    returns the sinks of this run (metrics.jsonl, the console, CORE_EVENT_SINK's, the caller's, TensorBoard/MLflow)."""
    (out / runfolder.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / runfolder.CONFIG)
    for stale in (runfolder.REPORT, *runfolder.MARKERS):
        (out / stale).unlink(missing_ok=True)
    metrics = out / runfolder.METRICS
    if resume:
        truncate_metrics(metrics, checkpoint_epoch(out / runfolder.LAST_CHECKPOINT))
    else:
        metrics.unlink(missing_ok=True)
    from core.tracking import tracking_sinks  # TensorBoard, MLflow: imported on their own thread

    return [JsonlSink(metrics), PrintSink(), sink_from_env(), sink,
            *tracking_sinks(cfg.track, cfg.to_dict(), out, resume=resume)]


def finish_run(rt: Runtime, state: TrainState, loaders: Loaders, bundle: Any, out: Path, *, export: bool,
               on_best: OnBest | None = None, extend: ExtendReport | None = None) -> dict[str, Any]:
    """Test the best checkpoint and write the report (test_and_report, with a variant's hooks), then export (rank 0).
    From here on SIGTERM stops the run at once: no step checks the flag any more."""
    rt.stop_flag.stop_immediately_from_now()
    rt.sink.emit("phase", {"phase": "test"})
    report = test_and_report(rt, state, loaders, bundle, out, on_best=on_best, extend=extend)
    distributed.barrier(rt.info)
    distributed.cleanup_distributed()
    if rt.info.is_primary and export:
        report = _export(out, report, rt.sink)
    rt.sink.emit("phase", {"phase": "done"})
    return report


def _export(out: Path, report: dict[str, Any], sink: EventSink) -> dict[str, Any]:
    sink.emit("phase", {"phase": "export"})
    try:
        from core.export import export_run
    except ImportError:
        return report
    export_run(out)
    return runfolder.read_json(out / runfolder.REPORT)


def _mark_cancelled(out: Path) -> None:
    with contextlib.suppress(OSError):
        runfolder.mark(out, runfolder.CANCELLED, "Cancelled: received SIGTERM after training (test or export phase)")


# ------------------------------------------------------------------------------------------------------------ steps
def load_data(rt: Runtime, out: Path) -> Any:
    """The seeded DataBundle; rank 0 writes labels.json, split.json and preprocess.json."""
    rt.sink.emit("phase", {"phase": "data"})
    seed_everything(rt.cfg.train.seed)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    from core.data import build_datasets

    bundle = build_datasets(rt.cfg)
    if len(bundle.train) < rt.info.world_size:
        raise DataError(f"the train split has {len(bundle.train)} images, fewer than {rt.info.world_size} ranks")
    if rt.info.is_primary:
        runfolder.write_json(out / runfolder.LABELS, list(bundle.classes))
        runfolder.write_json(out / runfolder.SPLIT, bundle.split)
        runfolder.write_json(out / runfolder.PREPROCESS, {"input_name": "input", **bundle.preprocess})
    return bundle


def build_training_model(rt: Runtime, bundle: Any) -> nn.Module:
    """The config's model for the bundle's images, frozen as asked, on the device in its memory format."""
    from core.models import freeze_backbone

    model = runfolder.create_run_model(rt.cfg, len(bundle.classes), bundle.preprocess,
                                       pretrained=rt.cfg.model.pretrained)
    if rt.cfg.model.freeze == "backbone":
        freeze_backbone(model)
    model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_inputs(rt: Runtime, bundle: Any) -> Loaders:
    """What the epoch loop iterates: loaders for train (sharded, shuffled per epoch) and val/test (see make_loaders)."""
    loaders = make_loaders(rt.cfg, bundle, rt.info, rt.device)
    if len(loaders.train) == 0:
        raise DataError(f"train.batch_size={rt.cfg.train.batch_size} is larger than the train split "
                        f"({len(bundle.train)} images over {rt.info.world_size} rank(s))")
    return loaders


def cache_features(rt: Runtime, model: nn.Module, bundle: Any, loaders: Loaders) -> tuple[Loaders, dict[str, Any]]:
    """The feature-cache step (core.features): when train.feature_cache and the model allow it, embed train views and
    val with the frozen backbone (progress as `embed` events and on the CLI's progress bar) and return loaders of
    features with the head that trains on them; else the loaders unchanged. Also returns the start event's
    `feature_cache` block: what the cache holds, or why it is off."""
    plan, why_not = plan_feature_cache(rt.cfg, model, bundle, rt.info.world_size)
    if plan is None:
        return loaders, {"off": why_not}
    rt.sink.emit("phase", {"phase": "embed"})
    bar = _progress(plan.views * plan.n_train + plan.n_val, f"embedding {plan.views} view(s)", rt.info)
    shown = [0]

    def report(done: int, total: int, images_per_sec: float) -> None:
        bar.update(done - shown[0])
        shown[0] = done
        rt.sink.emit("embed", {"done": done, "total": total, "views": plan.views, "images_per_sec": images_per_sec})

    try:
        cached = build_feature_loaders(rt, plan, model, bundle, loaders, report=report)
    finally:
        bar.close()
    return cached, cached.feature_cache.as_report() if cached.feature_cache else {}


def wrap_for_training(rt: Runtime, model: nn.Module) -> nn.Module:
    """DistributedDataParallel under torchrun, then torch.compile when train.compile is set."""
    wrapped = model
    if rt.info.enabled:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.cfg.train.compile and getattr(model, "head_name", None):  # a bare feature-cache head is not compiled
        wrapped = torch.compile(wrapped)
    return wrapped


def announce(rt: Runtime, state: TrainState, bundle: Any, loaders: Loaders, **extra: Any) -> None:
    """The `start` event (what runs, on what, from which epoch; `extra` adds or overrides fields), then the epoch event
    of the checkpoint resumed from: sinks drop it if already seen, so each epoch appears once."""
    rt.sink.emit("start", {"epochs": rt.cfg.train.epochs, "world_size": rt.info.world_size,
                           "classes": list(bundle.classes), "counts": bundle.counts, "config": rt.cfg.to_dict(),
                           "device": str(rt.device), "amp": rt.amp, "resumed_from": state.epoch or None,
                           "steps_per_epoch": len(loaders.train), "data_path": loaders.kind.value, **extra})
    if state.last_epoch_event is not None:
        rt.sink.emit("epoch", state.last_epoch_event)


# ------------------------------------------------------------------------------------------------------------ train
def train(cfg: Config, out_dir: str | Path, *, resume: bool = False, sink: EventSink | None = None) -> dict[str, Any]:
    """Run the whole recipe; returns the report (also written to RUN_DIR/report.json by rank 0)."""
    out = Path(out_dir)
    with open_run(cfg, out, resume=resume, sink=sink) as rt:
        bundle = load_data(rt, out)
        model = build_training_model(rt, bundle)
        loaders = prepare_inputs(rt, bundle)
        loaders, feature_cache = cache_features(rt, model, bundle, loaders)
        state = create_train_state(rt, model, len(loaders.train))
        state.head = loaders.head
        if resume:
            resume_from(rt, state, out / runfolder.LAST_CHECKPOINT)
        state.train_model = wrap_for_training(rt, state.head or model)
        state.global_step = state.epoch * len(loaders.train)
        announce(rt, state, bundle, loaders, feature_cache=feature_cache)
        run_epochs(rt, state, loaders, list(bundle.classes), out)
        return finish_run(rt, state, loaders, bundle, out, export=cfg.export.enabled)


# -------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.train", description="Train an image classifier.")
    p.add_argument("config", help="YAML preset, e.g. configs/digits.yaml")
    p.add_argument("--out", required=True, help="run folder (created); holds config, checkpoints, report, export")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt if present")
    return p


def _rank_tag(rank: int) -> str:
    """How a failing rank names itself in its `error` line: every rank says why it failed (a node other than node 0,
    or rank 3 alone, may be where a job's failure began; the other ranks then fail on a closed connection), rank 0
    without a tag, as a one-process run has always printed it."""
    return f" (rank {rank})" if rank else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        overrides = list(args.overrides)
        raw_path: str | None = args.config
        if args.resume and (Path(args.out) / runfolder.CONFIG).exists():
            raw_path = str(Path(args.out) / runfolder.CONFIG)  # resume with the resolved config of the run
            load_yaml(raw_path)
        cfg = load_config(raw_path, overrides)
        report = train(cfg, args.out, resume=args.resume)
    except CoreError as err:
        print(f"error{_rank_tag(rank)}: {err}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - anything else is a training failure: exit 1 with the traceback
        traceback.print_exc()
        print(f"error{_rank_tag(rank)}: training failed (traceback above)", file=sys.stderr)
        return 1
    if rank == 0 and report:
        test = report["test"]
        print(f"done: test accuracy {test['accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f}  "
              f"epochs {report['epochs_completed']}  {report['seconds']:.1f}s  → {args.out}")
        if "export" in report:
            print(f"export: {Path(args.out) / runfolder.EXPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
