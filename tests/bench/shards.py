"""Prepared shards (issue 20, README "Datasets"): beyond-cache whole-epoch images/s from shards vs the tensor cache on
the same data and model (≥ 0.95); the data path alone at 224 px with the train augmentation from local shards, per
core (≥ 2,000/s), with the PIL DataLoader path beside it; a training process's peak RSS on a dataset 8× data.
cache_max_mb vs 1× (≤ 1.10); prepare images/s and bytes per image, raw and JPEG. Data: generated photo-like JPEGs
(500×375, quality 85, ~35 KB), written into a temporary folder."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn

from core.data.shard_loader import ShardBatchLoader
from tests.bench.harness import ROOT, Row, Section, alternate, log, ratio_median

RATIO_SIZE = 112
"""Input side of the epoch-ratio row (see bench_epoch_ratio)."""

PHOTO_SIZE = (500, 375)
"""Pixels (W, H) of the generated photos: the size of a typical web photo (and of Food-101's)."""


def make_photos(root: Path, n: int, classes: int = 4, size: tuple[int, int] = PHOTO_SIZE, seed: int = 0) -> Path:
    """n JPEGs in `classes` class folders: a smooth per-image colour field plus noise (compresses like a photo)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        coarse[..., i % 3] = 220
        img = Image.fromarray(coarse).resize(size, Image.BICUBIC)
        noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-12, 13, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=85)
    return root


def photo_config(**data: Any) -> Any:
    """A job on the generated photos, classic augmentation, SimpleCNN, batch 64; `data` keys added or replaced."""
    from core.config import config_from_dict

    return config_from_dict({"data": {"name": "imagefolder", "augment": "classic", **data},
                             "model": {"name": "simple_cnn"}, "train": {"batch_size": 64, "epochs": 1},
                             "export": {"enabled": False}})


def bench_prepare(work: Path, photos: Path, n: int) -> tuple[list[Row], Path]:
    from core.data.prepare import prepare

    rows, raw_url = [], work / "raw"
    for enc in ("raw", "jpeg"):
        index = prepare(str(photos), str(work / enc), size=224, encoding=enc)
        st = index.stats
        log(f"prepare {enc}: {st}")
        rows.append(Row(f"shards: prepare {enc} 224 px (images/s, whole step incl. the scan)", st["images_per_sec"],
                        None, "img/s", note=f"{n} photos {PHOTO_SIZE[0]}×{PHOTO_SIZE[1]} JPEG, {st['seconds']:.1f} s, "
                        f"{os.cpu_count()} cores"))
        rows.append(Row(f"shards: bytes on disk per image, {enc} 224 px", st["bytes_per_image"], None, "B",
                        higher_is_better=False, note=f"stored {index.stored_size}×{index.stored_size}; source "
                        f"JPEGs {sum(p.stat().st_size for p in photos.rglob('*.jpg')) / n:,.0f} B"))
    return rows, raw_url


def bench_data_path(raw_url: Path, photos: Path, quick: bool) -> list[Row]:
    """Batches of the train split, no model, each side warmed up by one untimed epoch (the shards then sit in the
    local cache): uint8 batches from shards (what a GPU receives: its augmentation runs there), the same with the
    classic augmentation run on this CPU as the training device, and the PIL DataLoader (num_workers auto)."""
    from core import distributed
    from core.data import build_datasets
    from core.data.workers import num_workers
    from core.train import make_loaders

    cores = os.cpu_count() or 1
    info, device = distributed.DistInfo(), torch.device("cpu")
    cfg_s = photo_config(prepared=str(raw_url), cache_max_mb=1)
    shards = make_loaders(cfg_s, build_datasets(cfg_s), info, device).train
    assert isinstance(shards, ShardBatchLoader), type(shards)
    cfg_p = photo_config(path=str(photos), cache="off")
    pil = make_loaders(cfg_p, build_datasets(cfg_p), info, device).train
    workers = num_workers(cfg_p)
    epochs = 2 if quick else 4

    def rate(loader: Any, uint8: bool = False) -> float:
        t, seen = time.perf_counter(), 0
        for epoch in range(epochs):
            loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else None
            for batch in loader.uint8_batches() if uint8 else loader:
                seen += len(batch) if uint8 else len(batch[0])
        return seen / (time.perf_counter() - t)

    rate(shards), rate(pil)  # warm: shards fetched into the cache, DataLoader workers started
    got = alternate({"uint8": lambda: rate(shards, uint8=True), "augmented": lambda: rate(shards),
                     "pil": lambda: rate(pil)}, 1 if quick else 3)
    log(f"data path: {got}")
    med = {k: statistics.median(v) for k, v in got.items()}
    return [
        Row("shards: data path alone, 224 px + train augmentation on this CPU as the device, local raw shards "
            "(images/s per core)", med["augmented"] / cores, 2000.0, "img/s",
            note=f"{med['augmented']:,.0f} img/s on {cores} cores; the augmentation is fast.py's batch augmentation, "
            "which a GPU runs on the GPU"),
        Row("shards: uint8 batches from local raw shards, 224 px, what a GPU receives (images/s per core)",
            med["uint8"] / cores, None, "img/s",
            note=f"{med['uint8']:,.0f} img/s on {cores} cores: the loader's fetch and assembly threads (shards in "
            "the local cache), before the host-to-device copy"),
        Row("shards: the PIL DataLoader path beside it, 224 px + train augmentation (images/s per core)",
            med["pil"] / cores, None, "img/s",
            note=f"{med['pil']:,.0f} img/s on {cores} cores, num_workers auto = {workers}, JPEG draft decoding"),
    ]


def bench_epoch_ratio(photos: Path, work: Path, quick: bool) -> Row:
    """Whole epochs of the real train_one_epoch, same images, SimpleCNN at RATIO_SIZE px: shards vs tensor cache,
    each warmed up by one untimed epoch. A smaller input than 224 makes the step cheaper, so the data path weighs
    more: the harder case for shards (and 4x faster to measure on this CPU)."""
    from core import distributed
    from core.data import build_datasets
    from core.data.prepare import prepare
    from core.models import create_model
    from core.train import (
        Runtime,
        TrainState,
        create_optimizer,
        create_scheduler,
        make_loaders,
        set_epoch,
        train_one_epoch,
    )

    form = work / f"raw-{RATIO_SIZE}"
    prepare(str(photos), str(form), size=RATIO_SIZE, encoding="raw")
    info, device = distributed.DistInfo(), torch.device("cpu")
    sides: dict[str, Any] = {}
    for name, cfg in (("tensor_cache", photo_config(path=str(photos), cache="on", image_size=RATIO_SIZE)),
                      ("shards", photo_config(prepared=str(form), cache_max_mb=1))):
        bundle = build_datasets(cfg)
        loaders = make_loaders(cfg, bundle, info, device)
        assert loaders.kind.value == name, loaders.kind
        torch.manual_seed(0)
        model = create_model("simple_cnn", len(bundle.classes), in_chans=3, image_size=RATIO_SIZE)
        opt = create_optimizer(cfg, model)
        state = TrainState(model, opt, create_scheduler(cfg, opt, len(loaders.train) * 100), nn.CrossEntropyLoss())
        sides[name] = (cfg, loaders, Runtime.create(cfg, device, info), state, [0])

    def epoch(name: str) -> float:
        cfg, loaders, rt, state, n = sides[name]
        n[0] += 1
        set_epoch(loaders, cfg, n[0], info)
        t = time.perf_counter()
        train_one_epoch(rt, state, loaders.train, n[0])
        return len(loaders.train) * cfg.train.batch_size / (time.perf_counter() - t)

    for name in sides:
        epoch(name)  # warm: shards in the local cache, first-call costs paid
    got = alternate({k: (lambda k=k: epoch(k)) for k in sides}, 2 if quick else 4)
    log(f"epoch ratio: {got}")
    return Row(f"shards: beyond-cache whole-epoch images/s, shards / tensor cache (SimpleCNN {RATIO_SIZE} px)",
               ratio_median(got["shards"], got["tensor_cache"]), 0.95, "×",
               note=f"shards {statistics.median(got['shards']):.0f}, tensor cache "
                    f"{statistics.median(got['tensor_cache']):.0f} img/s; same photos, model and seed")


_RSS_SCRIPT = """
import sys
from core.config import config_from_dict
from core.train import train
cfg = config_from_dict({"data": {"name": "imagefolder", "prepared": sys.argv[1], "cache_max_mb": int(sys.argv[2])},
                        "model": {"name": "simple_cnn"}, "train": {"epochs": 1, "batch_size": 64},
                        "export": {"enabled": False}, "track": {"tensorboard": False}})
report = train(cfg, sys.argv[3])
assert report["data_path"] == "shards", report["data_path"]
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]  # peak RSS of this image
print(int(hwm.split()[1]) * 1024)
"""


def bench_rss(work: Path, quick: bool) -> Row:
    """Peak RSS of `train()` in a fresh process on shards of a dataset 1× and 8× data.cache_max_mb (32 px, 1 MB
    shards so the 8× set spans many shards; a few are held in memory at once)."""
    from core.data.prepare import prepare

    cache_mb, side = 2, 32
    per_image = 3 * side * side
    n1 = cache_mb * 2**20 // per_image + 64  # just beyond the tensor cache: shards at 1× too
    peaks = {}
    for factor in (1, 8):
        n = n1 * factor
        photos = make_photos(work / f"rss{factor}", n, size=(48, 40), seed=factor)
        prepare(str(photos), str(work / f"rss{factor}-form"), size=side, encoding="raw", shard_bytes=2**20)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DATASET_SHARD_DIR": str(work / "shard-cache")}
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(work / f"rss{factor}-form"), str(cache_mb),
                              str(work / f"rss{factor}-run")], env=env, capture_output=True, text=True, cwd=ROOT,
                             check=False, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"training on {factor}× failed: {out.stderr[-800:]}")
        peaks[factor] = int(out.stdout.split()[-1])
        log(f"rss {factor}×: {n} images, peak {peaks[factor] / 2**20:.0f} MiB")
    return Row("shards: peak RSS of training, dataset 8× / 1× data.cache_max_mb", peaks[8] / peaks[1], 1.10, "×",
               higher_is_better=False, note=f"{peaks[1] / 2**20:.0f} MiB ({n1} images) vs {peaks[8] / 2**20:.0f} MiB "
               f"({8 * n1}); data.cache_max_mb={cache_mb}, {side} px, 1 MB shards")


def bench_shards(quick: bool) -> list[Row]:
    n = 512 if quick else 1024
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp, mock.patch.dict(
            os.environ, {"DATASET_SHARD_DIR": os.environ.get("DATASET_SHARD_DIR", str(Path(tmp) / "shard-cache"))}):
        work = Path(tmp)
        t = time.perf_counter()
        photos = make_photos(work / "photos", n)
        log(f"{n} photos written in {time.perf_counter() - t:.0f} s")
        rows, raw_url = bench_prepare(work, photos, n)
        rows += bench_data_path(raw_url, photos, quick)
        rows.insert(0, bench_epoch_ratio(photos, work, quick))
        rows.append(bench_rss(work, quick))
    return rows


SECTION = Section("shards", "shards rows", bench_shards, (
    Row(f"shards: beyond-cache whole-epoch images/s, shards / tensor cache (SimpleCNN {RATIO_SIZE} px)", None, 0.95,
        "×"),
    Row("shards: prepare raw 224 px (images/s, whole step incl. the scan)", None, None, "img/s"),
    Row("shards: bytes on disk per image, raw 224 px", None, None, "B", False),
    Row("shards: prepare jpeg 224 px (images/s, whole step incl. the scan)", None, None, "img/s"),
    Row("shards: bytes on disk per image, jpeg 224 px", None, None, "B", False),
    Row("shards: data path alone, 224 px + train augmentation on this CPU as the device, local raw shards "
        "(images/s per core)", None, 2000.0, "img/s"),
    Row("shards: uint8 batches from local raw shards, 224 px, what a GPU receives (images/s per core)", None, None,
        "img/s"),
    Row("shards: the PIL DataLoader path beside it, 224 px + train augmentation (images/s per core)", None, None,
        "img/s"),
    Row("shards: peak RSS of training, dataset 8× / 1× data.cache_max_mb", None, 1.10, "×", False)))
