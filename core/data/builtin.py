"""The built-in datasets: what the dashboard offers besides an upload, and how many images each splits.

One table, read by the dashboard's dataset choice (app/forms.py) and by submission's batch-size check
(worker/submit.py); build.py loads them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from core.data.split import carve_fractions


@dataclass(frozen=True)
class BuiltinDataset:
    """One dataset a worker reads from its own disk (or makes up), chosen by `data.name`."""

    name: str
    label: str
    """What the dashboard shows for it."""
    train_pool: int | None
    """Images split into train/val (and test, unless `official_test`); None: set by the config (synthetic)."""
    official_test: bool = False
    """The dataset keeps its own test set (CIFAR): train and val share the training images (see carve_fractions)."""


BUILTIN_DATASETS = {d.name: d for d in (
    BuiltinDataset("digits", "digits — handwritten digits, 1,797 8×8 images, 10 classes (offline)", 1797),
    BuiltinDataset("cifar10", "CIFAR-10 — 60,000 32×32 images, 10 classes (the worker needs the files in data/)",
                   50_000, official_test=True),
    BuiltinDataset("cifar100", "CIFAR-100 — 60,000 32×32 images, 100 classes (the worker needs the files in data/)",
                   50_000, official_test=True),
    BuiltinDataset("synthetic", "synthetic — random coloured shapes (smoke tests)", None),
)}
"""The built-in datasets by `data.name`, in the order the dashboard lists them."""


def train_fraction(name: str, split: list[float]) -> float:
    """The share of a dataset's pool that lands in train under `data.split` (CIFAR: of its training images)."""
    dataset = BUILTIN_DATASETS.get(name)
    return carve_fractions(split, 1)[0] if dataset is not None and dataset.official_test else split[0]


def expected_train_images(data: dict[str, Any]) -> int | None:
    """About how many images the train split of a built-in dataset holds for a resolved config's `data` section
    (the stratified split rounds per class, so the count may differ by a few); None for other datasets."""
    dataset = BUILTIN_DATASETS.get(data["name"])
    if dataset is None:
        return None
    pool = dataset.train_pool if dataset.train_pool is not None else int(data["synthetic_size"])
    return math.ceil(pool * train_fraction(data["name"], data["split"]))
