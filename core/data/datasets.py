"""Image sources (where pixels come from), the split Dataset, and the DataBundle that build_datasets returns.

A *source* maps an integer to a PIL image in the dataset's own mode and size; a split is a source plus the positions
of its samples. Everything here holds only numpy arrays, strings and picklable transforms, so DataLoader workers can
be forked or spawned (num_workers > 0) without surprises.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from core.data.defaults import SCAN_THREADS
from core.data.transforms import EvalGeometry, channels, to_color_mode
from core.errors import DataError
from core.predict_template import draft_for

SPLITS = ("train", "val", "test")


class ImageSource(Protocol):
    """Anything that can hand out image `i` as a PIL image (any mode, native size)."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> Image.Image: ...


class ArraySource:
    """Images held in memory as uint8 N×H×W (grayscale) or N×H×W×3 (RGB): digits and CIFAR."""

    def __init__(self, images: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise ValueError(f"expected uint8 N×H×W or N×H×W×3 images, got {images.dtype} {images.shape}")
        self.images = images
        self.mode = "L" if images.ndim == 3 else "RGB"

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i], mode=self.mode)

    def as_uint8(self, indices: np.ndarray, color_mode: str) -> np.ndarray | None:
        """N×C×H×W without going through PIL when no conversion but gray→RGB is needed (else None)."""
        batch = self.images[indices]
        if self.mode == color_mode:
            return batch[:, None] if self.mode == "L" else batch.transpose(0, 3, 1, 2)
        if self.mode == "L" and color_mode == "RGB":  # Pillow's L→RGB copies the value into each channel
            return np.repeat(batch[:, None], 3, axis=1)
        return None


class FileSource:
    """Image files on disk, validated when the folder was scanned; `rels` are the paths users see."""

    def __init__(self, paths: Sequence[str], rels: Sequence[str]) -> None:
        self.paths = list(paths)
        self.rels = list(rels)
        self.draft: dict[str, Any] | None = None
        """preprocess geometry every use of these images ends at: large JPEGs then decode at a reduced DCT scale
        (core.predict_template.draft_for). build_datasets sets it unless a train transform crops the original."""

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        try:
            with Image.open(self.paths[i]) as img:
                if self.draft is not None:
                    draft_for(img, self.draft)
                img.load()
                return img
        except Exception as err:  # noqa: BLE001 — the file changed since the scan: say which one
            raise DataError(f"image {self.rels[i]!r} ({self.paths[i]}) could not be read: {err}") from None


class SyntheticSource:
    """Deterministic random RGB images, generated on demand so any size fits in memory.

    Image i = 60 % a smooth per-class template (4×4 random colours upscaled) + 40 % per-image noise, both drawn from
    generators seeded by (seed, class) and (seed, i). Faster than torchvision's FakeData (no PIL round trip per
    pixel block) and a model can learn it a little, which makes smoke tests meaningful.
    """

    def __init__(self, labels: np.ndarray, *, size: int, seed: int) -> None:
        self.labels = labels
        self.size = size
        self.seed = seed
        self._templates: dict[int, np.ndarray] = {}  # per process; a few KiB per class

    def __len__(self) -> int:
        return len(self.labels)

    def _template(self, cls: int) -> np.ndarray:
        if cls not in self._templates:
            coarse = np.random.default_rng([self.seed, 1, cls]).integers(0, 256, (4, 4, 3), dtype=np.uint8)
            self._templates[cls] = np.asarray(Image.fromarray(coarse).resize((self.size, self.size), Image.BILINEAR))
        return self._templates[cls]

    def load(self, i: int) -> Image.Image:
        noise = np.random.default_rng([self.seed, 2, i]).integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        mixed = 0.6 * self._template(int(self.labels[i])) + 0.4 * noise
        return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), mode="RGB")


class ImageDataset(Dataset):
    """One split: (transform(image), label) for each position; also exposes labels and ids without decoding."""

    def __init__(self, source: ImageSource, indices: np.ndarray, labels: np.ndarray, ids: Sequence[Any],
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        if not (len(indices) == len(labels) == len(ids)):
            raise ValueError("indices, labels and ids must have the same length")
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = list(ids)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.source.load(int(self.indices[i]))
        return self.transform(img), int(self.labels[i])

    @property
    def targets(self) -> list[int]:
        """torchvision-style label list (samplers and class-weight code look for it)."""
        return self.labels.tolist()

    def with_transform(self, transform: Callable[[Image.Image], torch.Tensor]) -> ImageDataset:
        """The same samples with another transform (e.g. train samples under the eval transform)."""
        return ImageDataset(self.source, self.indices, self.labels, self.ids, transform)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, source={type(self.source).__name__}, transform={self.transform})"


@dataclass
class DataBundle:
    """What build_datasets returns; the attributes are documented in docs/architecture.md ("DataBundle")."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    classes: list[str]
    skipped_files: list[dict[str, str]]
    preprocess: dict[str, Any]
    name: str = ""
    """cfg.data.name, for messages and reports."""

    @property
    def in_chans(self) -> int:
        return channels(self.preprocess["color_mode"])

    @property
    def counts(self) -> dict[str, int]:
        return {s: len(self.dataset(s)) for s in SPLITS}

    @property
    def class_counts(self) -> dict[str, list[int]]:
        return {s: np.bincount(self.dataset(s).labels, minlength=len(self.classes)).tolist() for s in SPLITS}

    @property
    def split(self) -> dict[str, list[Any]]:
        """Sample ids per split (what train writes to split.json): relative file paths or integer indices."""
        return {s: list(self.dataset(s).ids) for s in SPLITS}

    @property
    def test_ids(self) -> list[Any]:
        return list(self.test.ids)

    def dataset(self, split: str) -> ImageDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        return getattr(self, split)

    def eval_image(self, split: str, i: int) -> Image.Image:
        """Sample i of `split` in the model's colour mode after the eval resize/crop, not normalised."""
        ds = self.dataset(split)
        img = to_color_mode(ds.source.load(int(ds.indices[i])), self.preprocess["color_mode"])
        return EvalGeometry.from_preprocess(self.preprocess)(img)

    def eval_uint8(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split at eval geometry as uint8 N×C×H×W plus int64 labels (the tensor-cache path's input).

        Arrays already at the input size skip PIL; everything else is decoded by a few threads.
        """
        ds = self.dataset(split)
        height, width = self.preprocess["input_size"]
        labels = torch.from_numpy(ds.labels.copy())
        n_channels = self.in_chans
        if len(ds) == 0:
            return torch.zeros((0, n_channels, height, width), dtype=torch.uint8), labels
        if hasattr(ds.source, "eval_uint8"):  # a prepared form's shards (core/data/shard_loader.py)
            return torch.from_numpy(np.ascontiguousarray(ds.source.eval_uint8(ds.indices, self.preprocess))), labels
        if isinstance(ds.source, ArraySource) and ds.source.images.shape[1:3] == (height, width):
            fast = ds.source.as_uint8(ds.indices, self.preprocess["color_mode"])
            if fast is not None:
                return torch.from_numpy(np.ascontiguousarray(fast)), labels
        out = np.empty((len(ds), height, width, n_channels), dtype=np.uint8)

        def fill(i: int) -> None:
            arr = np.asarray(self.eval_image(split, i), dtype=np.uint8)
            out[i] = arr[..., None] if arr.ndim == 2 else arr

        threads = 1 if not isinstance(ds.source, FileSource) else min(SCAN_THREADS, os.cpu_count() or 1)
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(fill, range(len(ds))))
        else:
            for i in range(len(ds)):
                fill(i)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), labels
