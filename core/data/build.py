"""`build_datasets(cfg)`: the five datasets behind one DataBundle.

Decisions (see also transforms.py for the exact eval pipeline):
- Input size when data.image_size is None: digits 8, cifar 32, synthetic data.synthetic_image_size; imagefolder the
  median shorter side of the train images when that is at most 64 px (icons, MNIST-like scans stay native), else 224.
- Eval geometry: digits, cifar and synthetic resize straight to the input size. imagefolder does too unless the
  input is at least 96 px and the train images' median shorter side is larger than the input; then it resizes the
  shorter side to round(size / 0.875) and centre-crops (the ImageNet recipe).
- Normalisation: model.pretrained → core.models.pretrained_normalization(model.name), ImageNet statistics when that
  is unavailable or None. Otherwise digits and synthetic use the train split's per-channel mean/std (at most 2,048
  images, native size), cifar the usual constants (computed from train in L mode), imagefolder ImageNet's. In L mode
  three-channel constants are averaged into one.
- Splits: stratified by class and seeded by train.seed (split.py). CIFAR keeps its official test set and carves val
  out of train with fraction split[1] / (split[0] + split[1]); a pre-split imagefolder tree keeps its folders and only
  carves the missing split(s) out of train the same way.
- ids: digits/synthetic/cifar → int index into the source (cifar: train and val index the official train set, test
  the official test set); imagefolder → file path relative to data.path (or the zip's root).
"""
from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config
from core.data import defaults
from core.data.datasets import SPLITS, ArraySource, DataBundle, FileSource, ImageDataset, ImageSource, SyntheticSource
from core.data.imagefolder import FolderScan, scan_imagefolder
from core.data.split import carve_fractions, stratified_split
from core.data.transforms import channels, create_transform, eval_geometry, to_color_mode
from core.errors import DataError


@dataclass
class _Parts:
    """What a dataset-specific loader hands to the common assembly step."""

    classes: list[str]
    sources: dict[str, ImageSource]
    indices: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    ids: dict[str, list[Any]]
    native_size: int
    """Input side when data.image_size is None."""
    median_side: int | None = None
    """imagefolder only: median shorter side of the train images; decides resize-shorter + centre crop."""
    constant_stats: tuple[Sequence[float], Sequence[float]] | None = None
    skipped: list[dict[str, str]] | None = None


# ------------------------------------------------------------------------------------------------------------ digits
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (values 0..16) as uint8 0..255 images and int64 labels.

    Reads the same digits.csv.gz that sklearn.datasets.load_digits parses, found without importing scikit-learn:
    that import costs ~3 s, the file ~40 ms. Falls back to load_digits if the file moves in a future release.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        values, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        values, labels = digits.images, digits.target
    return np.clip(np.rint(values * (255.0 / 16.0)), 0, 255).astype(np.uint8), labels.astype(np.int64)


def _load_digits(cfg: Config) -> _Parts:
    images, labels = _digits_arrays()
    source = ArraySource(images)
    parts = stratified_split(labels, cfg.data.split, cfg.train.seed)
    return _Parts(classes=[str(int(c)) for c in range(10)], sources=dict.fromkeys(SPLITS, source),
                  indices=dict(zip(SPLITS, parts)), labels={s: labels[p] for s, p in zip(SPLITS, parts)},
                  ids={s: p.tolist() for s, p in zip(SPLITS, parts)}, native_size=8)


# ------------------------------------------------------------------------------------------------------------- cifar
_CIFAR = {
    "cifar10": {"title": "CIFAR-10", "folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "meta": "batches.meta", "names_key": "label_names", "labels_key": "labels",
                "stats": (defaults.CIFAR10_MEAN, defaults.CIFAR10_STD)},
    "cifar100": {"title": "CIFAR-100", "folder": "cifar-100-python", "train": ["train"], "test": ["test"],
                 "meta": "meta", "names_key": "fine_label_names", "labels_key": "fine_labels",
                 "stats": (defaults.CIFAR100_MEAN, defaults.CIFAR100_STD)},
}


def cifar_folder(name: str, path: str | None) -> Path:
    """Where the python-format batches must be: <data.path or data/>/<torchvision's folder name>.

    data.path may also point at that folder itself.
    """
    root = Path(path or defaults.CIFAR_DEFAULT_ROOT).expanduser()
    folder = _CIFAR[name]["folder"]
    return root if root.name == folder else root / folder


def _cifar_missing(spec: dict[str, Any], folder: Path) -> list[str]:
    return [f for f in [*spec["train"], *spec["test"], spec["meta"]] if not (folder / f).is_file()]


def _download_cifar(name: str, folder: Path) -> None:
    from torchvision import datasets  # local: only needed when downloading

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        cls(root=str(folder.parent), train=True, download=True)  # fetches and md5-checks the archive, then extracts
    except Exception as err:  # noqa: BLE001 — URLError, HTTPError, OSError, RuntimeError: all mean "no files"
        raise DataError(f"downloading {_CIFAR[name]['title']} into {str(folder.parent)!r} failed ({err}); put the "
                        f"extracted python-format files in {str(folder)!r} instead") from None


def _read_cifar_batch(path: Path) -> dict[str, Any]:
    # The official format is pickled dicts (torchvision reads it the same way); only point data.path at real CIFAR.
    try:
        with path.open("rb") as fh:
            return pickle.load(fh, encoding="latin1")
    except Exception as err:  # noqa: BLE001 — a damaged pickle raises almost anything
        raise DataError(f"{str(path)!r} is not a readable CIFAR python batch ({type(err).__name__}: {err}); "
                        "re-extract the official archive or set data.download=true") from None


def _cifar_arrays(spec: dict[str, Any], folder: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for f in files:
        batch = _read_cifar_batch(folder / f)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            target = np.asarray(batch[spec["labels_key"]], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{str(folder / f)!r} does not look like a {spec['title']} batch: {err!r}") from None
        if len(data) != len(target):
            raise DataError(f"{str(folder / f)!r}: {len(data)} images but {len(target)} labels")
        images.append(data)
        labels.append(target)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _load_cifar(cfg: Config) -> _Parts:
    name = cfg.data.name
    spec = _CIFAR[name]
    folder = cifar_folder(name, cfg.data.path)
    missing = _cifar_missing(spec, folder)
    if missing and cfg.data.download:
        _download_cifar(name, folder)
        missing = _cifar_missing(spec, folder)
    if missing:
        raise DataError(
            f"{spec['title']} files not found: expected the python-format batches in {str(folder)!r} "
            f"(missing: {', '.join(missing)}). Download 'CIFAR python version' from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it so that {str(folder)!r} exists "
            f"(data.path names the folder that contains {spec['folder']}/), or set data.download=true to download it.")
    meta = _read_cifar_batch(folder / spec["meta"])
    classes = [str(c) for c in meta.get(spec["names_key"], [])]
    train_x, train_y = _cifar_arrays(spec, folder, spec["train"])
    test_x, test_y = _cifar_arrays(spec, folder, spec["test"])
    n_classes = int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
    if len(classes) < n_classes:
        raise DataError(f"{str(folder / spec['meta'])!r} names {len(classes)} classes but labels go up to "
                        f"{n_classes - 1}")
    train_pos, val_pos, _ = stratified_split(train_y, carve_fractions(cfg.data.split, 1), cfg.train.seed)
    test_pos = np.arange(len(test_y))
    train_src, test_src = ArraySource(train_x), ArraySource(test_x)
    indices = {"train": train_pos, "val": val_pos, "test": test_pos}
    return _Parts(classes=classes, sources={"train": train_src, "val": train_src, "test": test_src}, indices=indices,
                  labels={"train": train_y[train_pos], "val": train_y[val_pos], "test": test_y},
                  ids={k: v.tolist() for k, v in indices.items()}, native_size=32,
                  constant_stats=None if cfg.data.color_mode == "L" else spec["stats"])


# --------------------------------------------------------------------------------------------------------- synthetic
def _load_synthetic(cfg: Config) -> _Parts:
    n, k, seed = cfg.data.synthetic_size, cfg.data.synthetic_classes, cfg.train.seed
    labels = np.random.default_rng([seed, 0]).permutation(np.arange(n, dtype=np.int64) % k)  # balanced classes
    source = SyntheticSource(labels, size=cfg.data.synthetic_image_size, seed=seed)
    parts = stratified_split(labels, cfg.data.split, seed)
    width = len(str(k - 1))
    return _Parts(classes=[f"class_{c:0{width}d}" for c in range(k)], sources=dict.fromkeys(SPLITS, source),
                  indices=dict(zip(SPLITS, parts)), labels={s: labels[p] for s, p in zip(SPLITS, parts)},
                  ids={s: p.tolist() for s, p in zip(SPLITS, parts)}, native_size=cfg.data.synthetic_image_size)


# ------------------------------------------------------------------------------------------------------- imagefolder
def _carve(pos: np.ndarray, labels: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split the positions `pos` stratified by their labels; returns positions (not offsets into pos)."""
    return [pos[p] for p in stratified_split(labels[pos], fractions, seed)]


def imagefolder_native_size(scan: FolderScan) -> int:
    """Median shorter side of the train images (all images when the tree is not pre-split)."""
    train = [r for r in scan.records if r.split in (None, "train")]
    return int(np.median([min(r.size) for r in train]))


def _load_imagefolder(cfg: Config) -> _Parts:
    if cfg.data.prepared:  # issue 20: a prepared form (shards) instead of the folder
        from core.data.shard_loader import prepared_parts

        return _Parts(**prepared_parts(cfg))
    scan = scan_imagefolder(cfg.data.path, max_image_pixels=cfg.data.max_image_pixels, color_mode=cfg.data.color_mode,
                            hold=True)  # this process trains from it: no cache eviction may remove it meanwhile
    labels = np.asarray([r.label for r in scan.records], dtype=np.int64)
    splits_of = np.asarray([r.split or "" for r in scan.records])
    s, seed = cfg.data.split, cfg.train.seed
    if not scan.splits_found:
        train, val, test = stratified_split(labels, s, seed)
    else:
        train = np.flatnonzero(splits_of == "train")
        val, test = np.flatnonzero(splits_of == "val"), np.flatnonzero(splits_of == "test")
        has_val, has_test = "val" in scan.splits_found, "test" in scan.splits_found
        if not has_val and not has_test:
            train, val, test = _carve(train, labels, s, seed)
        elif not has_val:
            train, val, _ = _carve(train, labels, carve_fractions(s, 1), seed)
        elif not has_test:
            train, test, _ = _carve(train, labels, carve_fractions(s, 2), seed)
    source = FileSource([r.path for r in scan.records], [r.rel for r in scan.records])
    indices = {"train": train, "val": val, "test": test}
    native = imagefolder_native_size(scan)
    return _Parts(classes=scan.classes, sources=dict.fromkeys(SPLITS, source), indices=indices,
                  labels={k: labels[v] for k, v in indices.items()},
                  ids={k: [scan.records[i].rel for i in v] for k, v in indices.items()},
                  native_size=(max(native, 4) if native <= defaults.SMALL_IMAGE_SIDE
                               else defaults.IMAGEFOLDER_DEFAULT_SIZE),
                  median_side=native, constant_stats=(defaults.IMAGENET_MEAN, defaults.IMAGENET_STD),
                  skipped=scan.skipped)


_LOADERS: dict[str, Callable[[Config], _Parts]] = {
    "digits": _load_digits, "cifar10": _load_cifar, "cifar100": _load_cifar, "synthetic": _load_synthetic,
    "imagefolder": _load_imagefolder,
}


# ------------------------------------------------------------------------------------------------------ assembly
def _fit_channels(stats: tuple[Sequence[float], Sequence[float]], color_mode: str) -> tuple[list[float], list[float]]:
    """Three-channel constants averaged to one for L mode; one-channel constants repeated for RGB."""
    mean, std = [float(v) for v in stats[0]], [float(v) for v in stats[1]]
    n_channels = channels(color_mode)
    if len(mean) != n_channels:
        mean, std = [sum(mean) / len(mean)] * n_channels, [sum(std) / len(std)] * n_channels
    return mean, std


def _pretrained_stats(model_name: str) -> tuple[Sequence[float], Sequence[float]]:
    try:
        from core.models import pretrained_normalization

        stats = pretrained_normalization(model_name)
    except (ImportError, AttributeError):
        stats = None
    return stats if stats is not None else (defaults.IMAGENET_MEAN, defaults.IMAGENET_STD)


def train_statistics(source: ImageSource, indices: np.ndarray, color_mode: str) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of pixels/255 over (at most STATS_MAX_IMAGES evenly spaced) images at native size."""
    if len(indices) == 0:
        raise DataError("the train split is empty; cannot compute normalisation statistics")
    n_pick = min(len(indices), defaults.STATS_MAX_IMAGES)
    pick = indices[np.unique(np.linspace(0, len(indices) - 1, n_pick).astype(int))]
    n_channels = channels(color_mode)
    if isinstance(source, ArraySource):  # in-memory images: one vectorised pass when no PIL conversion is needed
        batch = source.as_uint8(pick, color_mode)
        if batch is not None:
            x = batch.astype(np.float64) / 255
            mean, std = x.mean(axis=(0, 2, 3)), np.maximum(x.std(axis=(0, 2, 3)), 1e-3)
            return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]
    total, total_sq, count = np.zeros(n_channels), np.zeros(n_channels), 0
    for i in pick:
        arr = np.asarray(to_color_mode(source.load(int(i)), color_mode), dtype=np.float64).reshape(-1, n_channels) / 255
        total += arr.sum(0)
        total_sq += (arr**2).sum(0)
        count += len(arr)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.maximum(std, 1e-3)  # a constant channel must not divide by zero
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def build_datasets(cfg: Config) -> DataBundle:
    """Load cfg.data.name, split it, and wrap the splits with their transforms (see the module docstring)."""
    try:
        loader = _LOADERS[cfg.data.name]
    except KeyError:
        raise DataError(f"data.name: unknown dataset {cfg.data.name!r}; choose from {', '.join(_LOADERS)}") from None
    parts = loader(cfg)
    color_mode = cfg.data.color_mode
    size = cfg.data.image_size or parts.native_size
    crop = parts.median_side is not None and parts.median_side > size  # imagefolder photos bigger than the input
    preprocess: dict[str, Any] = {"color_mode": color_mode, **eval_geometry(size, resize_shorter_to_crop=crop)}
    if cfg.model.pretrained:
        stats = _fit_channels(_pretrained_stats(cfg.model.name), color_mode)
    elif parts.constant_stats is not None:
        stats = _fit_channels(parts.constant_stats, color_mode)
    else:
        stats = train_statistics(parts.sources["train"], parts.indices["train"], color_mode)
    preprocess["mean"], preprocess["std"] = stats
    if cfg.data.augment != "strong":  # issue 20 "decode less": strong's RandomResizedCrop needs the full image
        for source in parts.sources.values():
            if isinstance(source, FileSource):
                source.draft = preprocess
    train_tf = create_transform(preprocess, cfg.data.augment, train=True, hflip=cfg.data.hflip)
    eval_tf = create_transform(preprocess, "none", train=False)
    datasets = {
        s: ImageDataset(parts.sources[s], parts.indices[s], parts.labels[s], parts.ids[s],
                        train_tf if s == "train" else eval_tf)
        for s in SPLITS
    }
    return DataBundle(train=datasets["train"], val=datasets["val"], test=datasets["test"], classes=parts.classes,
                      skipped_files=list(parts.skipped or []), preprocess=preprocess, name=cfg.data.name)
