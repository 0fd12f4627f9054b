"""What the in-process training families (training, streaming, gpu) build alike: a synthetic config, its dataset held
in memory, a fresh model in train()'s memory format, and `Chunks`, short runs of real training to alternate sides by."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from core.runtime import use_channels_last

BATCH_SIZE = 64
"""Batch size of every training comparison (the presets' default)."""
CLASSIC_WORKERS = 2
"""DataLoader workers of the classic pipeline (the baseline core's loop is compared with)."""
CHUNK_STEPS = 24
"""Rows 2 and 3 alternate their sides every this many training steps (~1 s here), not every epoch: this machine's
speed drifts by ±20 % between consecutive 5-second epochs of the same code, far more than the effects measured."""


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
