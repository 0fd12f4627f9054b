"""What the epoch loop iterates: `Loaders`, one typed record whichever path makes the batches.

Four kinds exist (`LoaderKind`): the classic DataLoader over PIL transforms (`make_dataloaders`, here), the tensor
cache (core.data.fast.make_fast_loaders: uint8 images on the device, batch augmentation), a prepared form's shards
(core.data.shard_loader.make_shard_loaders: the same batches, streamed) and the feature cache
(core.features.build_feature_loaders: a frozen backbone's features; it replaces train and val once the model exists).
`core.train.make_loaders` is the one place that picks the builder for a config; a new kind is one more builder
returning `Loaders` and one more branch there.

Every split is sharded over the ranks: train by a DistributedSampler or a fixed seeded partition, val and test
without padding (`val_idx`/`test_idx` hold this rank's positions in the split, so predictions are gathered back in
dataset order).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from core.config import Config
from core.data.workers import num_workers
from core.distributed import DistInfo


class LoaderKind(str, Enum):
    """How the loop's batches are made; the value is the report's and the start event's `data_path`."""

    DATALOADER = "dataloader"
    TENSOR_CACHE = "tensor_cache"
    FEATURE_CACHE = "feature_cache"
    SHARDS = "shards"
    """A prepared form's shards, streamed (core.data.shard_loader): uint8 batches augmented on the device."""


@dataclass(frozen=True)
class FeatureCacheStats:
    """What the feature cache holds for this process (rank 0's under DDP; the others hold about as much): the
    report's and the start event's `feature_cache` block."""

    views: int
    feature_dim: int
    bytes: int
    images_embedded: int
    seconds: float
    images_per_sec: float
    precision: str

    def as_report(self) -> dict[str, Any]:
        return asdict(self)


EvalSplit = Literal["val", "test"]


@dataclass
class Loaders:
    """The batches of one run on one rank. `train` yields (x, y) batches and has a length; it may have
    `set_epoch` (the in-memory loaders). `sampler` and `generator` exist only for the DataLoader kind; `head` and
    `feature_cache` only for the feature cache (the head trains on the cached features)."""

    kind: LoaderKind
    train: Any
    val: Any
    val_idx: list[int]
    test: Any
    test_idx: list[int]
    sampler: DistributedSampler | None = None
    generator: torch.Generator | None = None
    head: nn.Module | None = None
    feature_cache: FeatureCacheStats | None = None

    def eval_split(self, split: EvalSplit) -> tuple[Any, list[int]]:
        """(loader, this rank's positions in the split) of val or test."""
        return (self.val, self.val_idx) if split == "val" else (self.test, self.test_idx)

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Make epoch `epoch`'s shuffling and augmentation depend only on (seed, epoch, rank)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(seed * 100_003 + epoch)
        if hasattr(self.train, "set_epoch"):
            self.train.set_epoch(epoch)


def make_dataloaders(cfg: Config, bundle: Any, info: DistInfo, device: torch.device) -> Loaders:
    """DataLoaders for train (sharded, shuffled per epoch) and val/test (sharded without padding, gathered later)."""
    pin = cfg.data.pin_memory and device.type == "cuda"
    workers = num_workers(cfg)  # data.num_workers, `auto` resolved
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": pin, "persistent_workers": workers > 0}
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
    return Loaders(LoaderKind.DATALOADER, train, val, val_idx, test, test_idx, sampler=sampler, generator=generator)
