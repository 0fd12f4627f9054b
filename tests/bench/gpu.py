"""The GPU rows, on a CUDA machine only: SimpleCNN and ResNet-18 at 32 px, bf16, channels_last, tensor cache on the GPU
vs the classic pipeline; the transfer job with and without the feature cache, in this process; and the shard loader
feeding the GPU at 224 px."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from core import distributed
from core.optim import create_optimizer, create_scheduler
from core.runtime import Runtime, TrainState
from core.train import make_loaders, set_epoch, train_one_epoch
from tests.bench.fixtures import in_memory_bundle, new_model, train_config
from tests.bench.harness import Row, Section, alternate, ratio_median
from tests.bench.transfer import TRANSFER_PHOTOS_PER_CLASS, TRANSFER_PRESET


def bench_gpu(quick: bool) -> list[Row]:
    """On CUDA: core's loop (tensor cache on the GPU, bf16, channels_last) vs the classic pipeline, per model."""
    torch.backends.cudnn.benchmark = True
    rows = []
    for model_name in ("simple_cnn", "resnet18"):
        rows.append(_gpu_row(model_name, quick))
        torch.cuda.empty_cache()
    rows.append(_gpu_transfer_row())
    rows.append(_gpu_shards_row(quick))
    return rows


def _gpu_shards_row(quick: bool) -> Row:
    """The shard loader feeding the GPU, no model: local raw shards of 224 px photos, uint8 batches assembled on the
    CPU, pinned and copied, the classic augmentation on the GPU (the CPU's data-path row in tests/bench/shards.py
    with CUDA as the device): whether the CPU side keeps a GPU fed."""
    from core.data import build_datasets
    from core.data.prepare import prepare
    from tests.bench.shards import make_photos, photo_config

    device, card, cores = torch.device("cuda", 0), torch.cuda.get_device_name(0), os.cpu_count() or 1
    n = 512 if quick else 1024
    with tempfile.TemporaryDirectory(prefix="bench-gpu-shards-") as tmp, \
            mock.patch.dict(os.environ, {"DATASET_SHARD_DIR": str(Path(tmp) / "shard-cache")}):
        prepare(str(make_photos(Path(tmp) / "photos", n)), str(Path(tmp) / "raw"), size=224, encoding="raw")
        cfg = photo_config(prepared=str(Path(tmp) / "raw"), cache_max_mb=1)
        loader = make_loaders(cfg, build_datasets(cfg), distributed.DistInfo(), device).train

        def rate() -> float:
            torch.cuda.synchronize()
            t, seen = time.perf_counter(), 0
            for epoch in range(2):
                loader.set_epoch(epoch)
                for x, _ in loader:
                    seen += len(x)
            torch.cuda.synchronize()
            return seen / (time.perf_counter() - t)

        rate()  # warm: the shards fetched into the local cache, the CUDA kernels loaded
        got = [rate() for _ in range(1 if quick else 3)]
    med = statistics.median(got)
    return Row(f"GPU {card}: data path from local raw shards, 224 px + train augmentation on the GPU (images/s)", med,
               None, "img/s", note=f"{med / cores:,.0f} per CPU core ({cores} cores), {n} photos, batch 64, runs "
               + ", ".join(f"{g:,.0f}" for g in got))


def _gpu_transfer_row(epochs: int = 10) -> Row:
    """The transfer job of the transfer rows on the GPU, in this process: feature cache vs current path."""
    from core.config import load_config
    from core.train import train
    from tests.fixtures_images import make_photo_tree

    card = torch.cuda.get_device_name(0)
    walls: dict[str, float] = {}
    reports: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-transfer-") as tmp:
        photos = make_photo_tree(Path(tmp) / "photos", TRANSFER_PHOTOS_PER_CLASS)
        for side in ("current", "cache"):
            cfg = load_config(TRANSFER_PRESET, [f"data.path={photos}", f"train.epochs={epochs}", "train.device=cuda",
                                                "export.enabled=false",
                                                f"train.feature_cache={'on' if side == 'cache' else 'off'}"])
            t = time.perf_counter()
            reports[side] = train(cfg, Path(tmp) / side)
            walls[side] = time.perf_counter() - t
    fc = reports["cache"].get("feature_cache") or {}
    return Row(f"GPU {card}: transfer job, feature cache vs current path, {epochs} epochs", walls["current"] /
               walls["cache"], None, "×",
               note=f"train() wall: cache {walls['cache']:.1f} s, current {walls['current']:.1f} s; val acc "
                    f"{reports['cache']['val']['accuracy']:.4f} vs {reports['current']['val']['accuracy']:.4f}; "
                    f"embedding {fc.get('images_per_sec', 0):,.0f} img/s ({fc.get('precision')}), one pair")


def _gpu_row(model_name: str, quick: bool, batch: int = 512) -> Row:
    from torch.utils.data import DataLoader

    device = torch.device("cuda", 0)
    card = torch.cuda.get_device_name(0)
    n_total = 25_000 if quick else 62_500  # 20k / 50k train images
    cfg = train_config(n_total, model__name=model_name, train__batch_size=batch, train__amp=True,
                       train__channels_last=True, data__num_workers=min(8, os.cpu_count() or 1))
    bundle = in_memory_bundle(cfg)
    info = distributed.DistInfo()
    loaders = make_loaders(cfg, bundle, info, device)
    criterion = nn.CrossEntropyLoss()
    core_rt = Runtime.create(cfg, device, info)
    autocast = core_rt.autocast
    models = {k: new_model(cfg, bundle.in_chans, len(bundle.classes), device) for k in ("core", "classic")}
    opts = {k: create_optimizer(cfg, m) for k, m in models.items()}
    scheds = {k: create_scheduler(cfg, o, 10_000) for k, o in opts.items()}
    core_state = TrainState(models["core"], opts["core"], scheds["core"], criterion)
    classic_loader = DataLoader(bundle.train, batch_size=batch, shuffle=True, drop_last=True, pin_memory=True,
                                num_workers=cfg.data.num_workers, persistent_workers=True, prefetch_factor=4)
    epoch = [0]

    def core_side() -> float:
        epoch[0] += 1
        set_epoch(loaders, cfg, epoch[0], info)
        torch.cuda.synchronize()
        t = time.perf_counter()
        train_one_epoch(core_rt, core_state, loaders.train, epoch[0])
        torch.cuda.synchronize()
        return len(loaders.train) * batch / (time.perf_counter() - t)

    def classic_side() -> float:
        m, o = models["classic"], opts["classic"]
        m.train()
        seen = 0
        torch.cuda.synchronize()
        t = time.perf_counter()
        for x, y in classic_loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast:
                loss = criterion(m(x).float(), y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
            scheds["classic"].step()
            seen += len(y)
        torch.cuda.synchronize()
        return seen / (time.perf_counter() - t)

    core_side()  # warm-up: cudnn autotuning, the allocator
    got = alternate({"core": core_side, "classic": classic_side}, 1 if quick else 2)
    med = {k: statistics.median(v) for k, v in got.items()}
    return Row(f"GPU {card}: core vs classic, {model_name} 32 px bf16 channels_last",
               ratio_median(got["core"], got["classic"]), None, "×",
               note=f"core {med['core']:,.0f} img/s, classic {med['classic']:,.0f} img/s "
                    f"({cfg.data.num_workers} workers), batch {batch}, {len(bundle.train)} images")


SECTION = Section("gpu", "GPU rows", bench_gpu, (), available=torch.cuda.is_available)
