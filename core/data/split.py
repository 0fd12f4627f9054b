"""Stratified, seeded train/val/test splitting.

Each class is shuffled with one generator seeded by `seed` and cut by largest-remainder rounding, so every split holds
each class within one image of its exact share. A class with at least as many images as there are non-zero fractions
(three for the usual train/val/test) then gets at least one image in each of those splits, taken from the largest
part, so small classes still show up in val and test (for such a class the ±1 bound may stretch to ±2). A class too
small for that fills train first.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _apportion(n: int, fractions: Sequence[float]) -> list[int]:
    """Split n items into len(fractions) integer parts: largest remainder, ties to the earlier split."""
    exact = [n * f for f in fractions]
    parts = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(fractions)), key=lambda k: (-(exact[k] - parts[k]), k))
    for k in order[: n - sum(parts)]:
        parts[k] += 1
    nonzero = [k for k, f in enumerate(fractions) if f > 0]
    if n >= len(nonzero):
        for k in nonzero:  # every non-zero split gets one image when there are enough to go round
            if parts[k] == 0:
                donor = max(range(len(parts)), key=lambda j: (parts[j], -j))
                parts[donor] -= 1
                parts[k] += 1
    elif n > 0 and parts[0] == 0:  # too few images for every split: train comes first
        donor = max(range(len(parts)), key=lambda j: (parts[j], -j))
        parts[donor] -= 1
        parts[0] += 1
    return parts


def stratified_split(labels: Sequence[int] | np.ndarray, fractions: Sequence[float],
                     seed: int) -> list[np.ndarray]:
    """Positions into `labels` for each fraction (sorted ascending), stratified by label and reproducible by seed."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    out: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for k, size in enumerate(_apportion(len(members), fractions)):
            out[k].append(members[start:start + size])
            start += size
    return [np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64) for parts in out]


def carve_fractions(split: Sequence[float], part: int) -> list[float]:
    """`stratified_split` fractions that carve split `part` (1 = val, 2 = test) out of a pool holding only train and
    that part: [1 - f, f, 0] with f = split[part] / (split[0] + split[part]). CIFAR carves val out of its training
    images this way; a pre-split folder tree missing val/ or test/ carves it out of train/."""
    f = split[part] / (split[0] + split[part])
    return [1 - f, f, 0.0]
