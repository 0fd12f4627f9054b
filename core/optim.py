"""The optimizer and the learning-rate schedule of a run: `create_optimizer`, `create_scheduler` (timm's names).

Both read only the config and the model, so core.train and core.prune (its fine-tune) build them the same way.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from core.config import Config, choices
from core.errors import ConfigError


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
