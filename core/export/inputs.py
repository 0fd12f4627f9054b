"""The images an export is checked and calibrated on: eval-transformed samples of the run's own splits."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from core.errors import ExportError


def eval_dataset(bundle: Any, split: str) -> Any:
    """A split under the evaluation transform (train images are calibrated on without augmentation)."""
    from core.data import create_transform

    ds = bundle.dataset(split)
    return ds if split != "train" else ds.with_transform(create_transform(bundle.preprocess))


def take_images(bundle: Any, n: int, splits: Iterable[str]) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The first n eval-transformed images over `splits` in order (test first: a small test split borrows from val)."""
    xs: list[torch.Tensor] = []
    where: list[tuple[str, int]] = []
    for split in splits:
        ds = eval_dataset(bundle, split)
        for i in range(min(len(ds), n - len(xs))):
            xs.append(ds[i][0])
            where.append((split, i))
        if len(xs) >= n:
            break
    if not xs:
        raise ExportError("the dataset has no images to check the export on")
    return torch.stack(xs), where


def calibration_images(bundle: Any, n: int, seed: int) -> torch.Tensor:
    """n training images (seeded random choice, eval transform): the activation ranges INT8 is calibrated on."""
    ds = eval_dataset(bundle, "train")
    order = np.random.default_rng(seed).permutation(len(ds))[:n]
    return torch.stack([ds[int(i)][0] for i in order])


def batches(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), size):
        yield x[start:start + size]
