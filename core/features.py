"""The feature cache: a frozen backbone embeds each image a fixed number of times, and only the head trains.

With `model.freeze: backbone` only the final Linear learns, and the backbone (in eval mode: pretrained BatchNorm
statistics, no stochastic depth) maps an image to the same features every time. The normal path still runs that
forward pass on every image of every epoch, which is nearly all of a transfer job's time (Lite0 at 224 px: ~24
images/s on 2 CPU cores). Here instead:

- **train**: `data.feature_views` augmented views of each image (the run's own augmentation, each view drawn from a
  generator seeded by (seed, view, rank)) go through the backbone once; each epoch takes one view per image, drawn
  from (seed, epoch, rank), in a fresh shuffled order;
- **val**: embedded once, no augmentation;
- **test**: not cached. After training the test split goes through the whole model in fp32, the network that is
  exported, so report.json's test metrics are the exported model's even when the cache was embedded in bf16;
- the **head** trained on the features is `Dropout(p) → the model's own final Linear` (the same Parameter objects):
  the optimizer, checkpoints, resume, export and the ONNX parity check see one unchanged model.

The features are the head's input, captured with a forward pre-hook while the whole model runs in eval mode, so no
model needs a `forward_features`. "Static" (`static_backbone`) is checked on the model itself: every parameter but
the head's frozen, and after `set_train_mode` nothing outside the head still in training mode except stateless layers
and the single dropout right before the head (create_model's contract), which the head applies itself.

Memory: `views × train images + val images` rows of `feature_dim` float32 per process (Lite0: 1,280 floats = 5 KiB per
row); over `data.cache_max_mb`, `train.feature_cache: auto` falls back to the normal path and `on` refuses.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from core.config import EPOCHS_PER_VIEW, FEATURE_VIEWS_MAX
from core.data.fast import EpochBatches, epoch_generator, train_partition
from core.data.loaders import FeatureCacheStats, LoaderKind, Loaders
from core.data.workers import num_workers
from core.errors import ConfigError
from core.models import get_head, set_train_mode, unwrap_model
from core.runtime import Runtime

FEATURE_BYTES = 4
"""Bytes per cached feature value (float32, whatever precision the backbone ran in)."""
PROGRESS_EVERY_S = 1.0
"""Seconds between two `embed` progress events (the last batch always reports)."""
STATELESS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Identity,
             nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.ZeroPad2d)
"""Parameter-free layers whose output does not depend on training mode."""


# ------------------------------------------------------------------------------------------------------ decision
def static_backbone(model: nn.Module) -> tuple[str | None, float]:
    """(None, p) when everything before the head is frozen and deterministic in training mode, p being the dropout
    right before the head; else (the reason, 0.0)."""
    inner = unwrap_model(model)
    head = get_head(inner)
    head_ids = {id(p) for p in head.parameters()}
    trainable = [n for n, p in inner.named_parameters() if p.requires_grad and id(p) not in head_ids]
    if trainable:
        return f"backbone parameters train ({trainable[0]}, ...): set model.freeze: backbone", 0.0
    was_training = inner.training
    set_train_mode(inner)  # exactly what the train loop does
    try:
        dropouts: list[tuple[str, float]] = []
        for name, module in inner.named_modules():
            if not module.training or any(id(p) in head_ids for p in module.parameters()):
                continue  # eval mode, or the head / a container of it (those only route tensors to it)
            if type(module) is nn.Dropout:
                dropouts.append((name, float(module.p)))
            elif not isinstance(module, STATELESS):
                return f"{name} ({type(module).__name__}) stays in training mode, so its output varies", 0.0
        if len(dropouts) > 1:
            return f"{len(dropouts)} dropout layers train ({', '.join(n for n, _ in dropouts)}); expected one", 0.0
        return None, dropouts[0][1] if dropouts else 0.0
    finally:
        set_train_mode(inner, was_training)


def feature_cache_bytes(n_train: int, views: int, n_eval: int, feature_dim: int) -> int:
    """Bytes of cached features: (views × train images + eval images) × feature_dim float32 values.
    10,000 images × 8 views at Lite0's 1,280: 409.6 MB."""
    return (views * n_train + n_eval) * feature_dim * FEATURE_BYTES


def effective_views(cfg: Any) -> int:
    """How many views of each train image the cache embeds: 1 without augmentation (every view would be the same
    image), else `data.feature_views`, or when that is auto (None) one view per EPOCHS_PER_VIEW epochs, 1 to
    FEATURE_VIEWS_MAX: a 10-epoch job embeds its train images once, a 300-epoch one four times."""
    if cfg.data.augment == "none":
        return 1
    if cfg.data.feature_views is not None:
        return int(cfg.data.feature_views)
    return min(FEATURE_VIEWS_MAX, max(1, math.ceil(cfg.train.epochs / EPOCHS_PER_VIEW)))


@dataclass(frozen=True)
class Plan:
    """What the cache will hold for this process: decided before any image is embedded."""

    views: int
    feature_dim: int
    n_train: int
    n_val: int
    dropout: float

    @property
    def bytes(self) -> int:
        return feature_cache_bytes(self.n_train, self.views, self.n_val, self.feature_dim)


def plan_feature_cache(cfg: Any, model: nn.Module, bundle: Any, world_size: int = 1) -> tuple[Plan | None, str]:
    """(the plan, why) for `train.feature_cache`: None means the normal path. `on` raises ConfigError when the cache
    is impossible (backbone not static, or over data.cache_max_mb); `auto` falls back and says why."""
    mode = cfg.train.feature_cache
    if mode == "off":
        return None, "train.feature_cache is off"
    if cfg.model.freeze != "backbone":  # `on` is refused by config validation already
        return None, "the backbone trains (model.freeze is not backbone)"
    reason, dropout = static_backbone(model)
    if reason is not None:
        if mode == "on":
            raise ConfigError.on("train.feature_cache", mode,
                                 f"'on' needs a frozen backbone in eval mode, but {reason}")
        return None, reason
    n_train = len(bundle.train) // world_size if world_size > 1 else len(bundle.train)
    n_val = -(-len(bundle.val) // world_size)
    plan = Plan(views=effective_views(cfg), feature_dim=get_head(model).in_features, n_train=n_train, n_val=n_val,
                dropout=dropout)
    cap = cfg.data.cache_max_mb * 2**20
    if plan.bytes > cap:
        why = (f"the feature cache needs {plan.bytes / 2**20:,.0f} MiB ({plan.views} views × {n_train:,} train + "
               f"{n_val:,} val images × {plan.feature_dim:,} floats) per process, over data.cache_max_mb="
               f"{cfg.data.cache_max_mb}")
        if mode == "on":
            raise ConfigError.on("train.feature_cache", mode, f"{why}; raise data.cache_max_mb, lower "
                                 "data.feature_views, or set train.feature_cache: auto to fall back to the normal path")
        return None, why
    return plan, "frozen backbone in eval mode"


# ------------------------------------------------------------------------------------------------------- loaders
class FeatureBatchLoader(EpochBatches):
    """(features, labels) batches from cached features [views, N, D] on the device.

    Train: each epoch draws one view per sample and a sample order from a generator seeded by (seed, epoch, rank).
    Eval: view 0 in stored order. Like TensorBatchLoader: set_epoch, len, no worker processes.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, *, batch_size: int, train: bool,
                 drop_last: bool = False, seed: int = 0, rank: int = 0) -> None:
        if features.dim() != 3 or features.shape[1] != len(labels):
            raise ValueError(f"features must be [views, N, D] with N = {len(labels)}, got {tuple(features.shape)}")
        self.features, self.labels = features, labels
        self.batch_size, self.train, self.drop_last, self.seed, self.rank = batch_size, train, drop_last, seed, rank
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, dev = len(self.labels), self.features.device
        if self.train:
            gen = epoch_generator(self.seed, self.epoch, self.rank)  # the order TensorBatchLoader would draw
            order = torch.randperm(n, generator=gen).to(dev)
            view = torch.randint(0, self.features.shape[0], (n,), generator=gen).to(dev)
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
            if self.train:
                idx = order[sl]
                yield self.features[view[sl], idx], self.labels[idx]
            else:
                yield self.features[0, sl], self.labels[sl]


def head_module(model: nn.Module, dropout: float) -> nn.Module:
    """What trains on cached features: Dropout(p) then the model's own head Linear (shared parameters)."""
    return nn.Sequential(nn.Dropout(dropout), get_head(model))


# ----------------------------------------------------------------------------------------------------- embedding
class Progress:
    """Counts embedded images; calls `report(done, total, images_per_sec)` at most every PROGRESS_EVERY_S seconds
    and once at the end. `check()` runs before every batch: it raises to end the pass there (the train loop's
    Runtime.check_stop: SIGTERM cancels, train.time_limit times out)."""

    def __init__(self, total: int, report: Callable[[int, int, float], None] | None,
                 check: Callable[[], None] | None = None) -> None:
        self.total, self.report, self._check, self.done = total, report, check, 0
        self.start = self._last = time.perf_counter()

    def check(self) -> None:
        if self._check is not None:
            self._check()

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.report is not None and (now - self._last >= PROGRESS_EVERY_S or self.done >= self.total):
            self._last = now
            self.report(self.done, self.total, self.done / max(now - self.start, 1e-9))

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


@torch.no_grad()
def embed(model: nn.Module, batches: Any, device: torch.device, *, autocast: Any = None,
          channels_last: bool = False, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Head inputs (float32 [N, D], on `device`) and labels of every batch, the model in eval mode."""
    inner = unwrap_model(model)
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0].detach().float())

    handle = get_head(inner).register_forward_pre_hook(grab)
    was_training = inner.training
    inner.eval()
    feats, labels = [], []
    try:
        for x, y in batches:
            if progress is not None:
                progress.check()
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast if autocast is not None else nullcontext():
                inner(x)
            feats.append(captured.pop())
            labels.append(y.to(device, non_blocking=True))
            if progress is not None:
                progress.add(len(y))
    finally:
        handle.remove()
        set_train_mode(inner, was_training)
    if not feats:
        return torch.zeros((0, get_head(inner).in_features), device=device), torch.zeros(0, dtype=torch.long,
                                                                                       device=device)
    return torch.cat(feats), torch.cat(labels)


def train_views(cfg: Any, bundle: Any, loaders: Loaders, info: Any, views: int, device: torch.device
                ) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """One iterable of (augmented batch, labels) per view, every train sample of this rank once, in the same order.

    With the tensor cache the views are its batch augmentation in stored order; otherwise a DataLoader over this
    rank's fixed partition with the PIL train transform, its randomness seeded per view."""
    eval_bs = cfg.train.eval_batch(device.type)
    seeds = [cfg.train.seed * 1_000_003 + 104_729 * (v + 1) + info.rank for v in range(views)]
    if loaders.kind in (LoaderKind.TENSOR_CACHE, LoaderKind.SHARDS):
        for seed in seeds:
            yield loaders.train.ordered_pass(seed)
        return
    idx = train_partition(len(bundle.train), info.rank, info.world_size, cfg.train.seed)
    subset = Subset(bundle.train, idx)
    workers = num_workers(cfg)
    for seed in seeds:
        torch.manual_seed(seed)  # the PIL transforms draw from torch's RNG in this process (num_workers 0)
        yield DataLoader(subset, batch_size=eval_bs, shuffle=False, num_workers=workers,
                         generator=torch.Generator().manual_seed(seed))  # seeds the worker processes


def build_feature_loaders(rt: Runtime, plan: Plan, model: nn.Module, bundle: Any, loaders: Loaders, *,
                          report: Callable[[int, int, float], None] | None = None) -> Loaders:
    """Embed train (plan.views views) and val with the run's device, precision and memory format, checking
    `rt.check_stop` before every batch; returns loaders of kind feature_cache whose train and val are feature loaders
    (the uint8 train/val images are let go), with the head that trains on them and the report's block. test stays
    the image loader: it runs through the whole model."""
    cfg, info, device = rt.cfg, rt.info, rt.device
    progress = Progress(plan.views * plan.n_train + plan.n_val, report, rt.check_stop)
    per_view = []
    labels = None
    for batches in train_views(cfg, bundle, loaders, info, plan.views, device):
        feats, labels = embed(model, batches, device, autocast=rt.autocast, channels_last=rt.channels_last,
                              progress=progress)
        per_view.append(feats)
    train_feats = torch.stack(per_view)
    del per_view
    val_feats, val_labels = embed(model, loaders.val, device, autocast=rt.autocast, channels_last=rt.channels_last,
                                  progress=progress)
    seconds = progress.seconds
    n_train = train_feats.shape[1]
    drop_last = n_train > cfg.train.batch_size  # a last batch of 1 would make the step noisy; as make_dataloaders
    eval_bs = cfg.train.eval_batch(device.type)
    stats = FeatureCacheStats(
        views=plan.views, feature_dim=plan.feature_dim, bytes=(train_feats.numel() + val_feats.numel()) * FEATURE_BYTES,
        images_embedded=progress.done, seconds=round(seconds, 3), images_per_sec=progress.done / max(seconds, 1e-9),
        precision=rt.amp or "fp32")
    return Loaders(
        LoaderKind.FEATURE_CACHE,
        train=FeatureBatchLoader(train_feats, labels, batch_size=cfg.train.batch_size, train=True,
                                 drop_last=drop_last, seed=cfg.train.seed, rank=info.rank),
        val=FeatureBatchLoader(val_feats[None], val_labels, batch_size=eval_bs, train=False), val_idx=loaders.val_idx,
        test=loaders.test, test_idx=loaders.test_idx, head=head_module(model, plan.dropout), feature_cache=stats)
