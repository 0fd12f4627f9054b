"""checkpoints/last.pt: everything a resume needs to continue exactly where an epoch ended (written by rank 0 every
epoch, like torchvision's reference: a plain dict of model, optimizer, lr_scheduler, epoch, config) and its reader.

best.pt is runfolder.save_best_checkpoint's: it is what export and `load_run` read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core import runfolder
from core.events import read_jsonl
from core.models import unwrap_model
from core.runtime import Runtime, TrainState, rng_state, set_rng_state


def save_checkpoint(path: Path, rt: Runtime, state: TrainState, epoch: int, event: dict[str, Any],
                    val_metrics: dict[str, Any]) -> None:
    """checkpoints/last.pt after epoch `epoch` (its epoch event is kept, so a resume can send it again)."""
    runfolder.atomic_torch_save({
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
    ckpt = runfolder.load_checkpoint(path)
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


def checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint was written after (0 when there is none)."""
    if not path.exists():
        return 0
    return int(runfolder.load_checkpoint(path).get("epoch", 0))


def truncate_metrics(path: Path, epoch: int) -> None:
    """On resume, forget events of epochs after the checkpoint (they will be run again)."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path)
            if r.get("type") not in ("step", "epoch") or int(r["data"].get("epoch", 0)) <= epoch]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
