"""Rows 1 and 2: images/s of core's loop (tensor cache + batch augmentation) vs the classic loop (DataLoader + PIL
transforms, 2 workers), same SimpleCNN, same synthetic 32×32 images, same epochs (≥ 2.0×); and core's loop vs the
compute-only bound, forward + backward + step on pre-made tensors (≥ 0.90)."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from core import distributed
from core.optim import create_optimizer, create_scheduler
from core.runtime import Runtime, TrainState, use_channels_last
from core.train import make_loaders, set_epoch, train_one_epoch
from tests.bench.fixtures import (
    BATCH_SIZE,
    CHUNK_STEPS,
    CLASSIC_WORKERS,
    Chunks,
    in_memory_bundle,
    new_model,
    train_config,
)
from tests.bench.harness import Row, Section, alternate, log, quartiles, ratio_median

TRAIN_IMAGES = 10_000
"""Images in the synthetic training set of rows 1-2 (row 1 asks for at least 10k)."""


def bench_training(quick: bool) -> list[Row]:
    from torch.utils.data import DataLoader

    n_train = TRAIN_IMAGES
    cfg = train_config(int(n_train / 0.8))
    bundle = in_memory_bundle(cfg)
    assert len(bundle.train) >= n_train, len(bundle.train)
    device = torch.device("cpu")
    info = distributed.DistInfo()
    classes = len(bundle.classes)
    criterion = nn.CrossEntropyLoss()
    reps = 1 if quick else 3

    # core: the real train_one_epoch over the tensor-cache loader make_loaders picks for this config
    loaders = make_loaders(cfg, bundle, info, device)
    assert loaders.kind == "tensor_cache", loaders.kind
    core_model = new_model(cfg, bundle.in_chans, classes, device)
    channels_last = use_channels_last(cfg, device)  # what train() does with this config on this device
    core_opt = create_optimizer(cfg, core_model)
    core_sched = create_scheduler(cfg, core_opt, len(loaders.train) * 100)
    core_rt = Runtime.create(cfg, device, info)
    core_state = TrainState(core_model, core_opt, core_sched, criterion)
    core_epoch = [0]

    def core_side() -> float:
        core_epoch[0] += 1
        set_epoch(loaders, cfg, core_epoch[0], info)
        t = time.perf_counter()
        train_one_epoch(core_rt, core_state, loaders.train, core_epoch[0])
        return len(loaders.train) * BATCH_SIZE / (time.perf_counter() - t)  # drop_last: full batches only

    # classic: DataLoader over the PIL-transform dataset, 2 workers, the loop as usually written (loss.item() per step)
    classic_loader = DataLoader(bundle.train, batch_size=BATCH_SIZE, shuffle=True, num_workers=CLASSIC_WORKERS,
                                persistent_workers=True, drop_last=True)
    classic_model = new_model(cfg, bundle.in_chans, classes, device, channels_last=False)
    classic_opt = create_optimizer(cfg, classic_model)
    classic_sched = create_scheduler(cfg, classic_opt, len(classic_loader) * 100)

    def classic_side() -> float:
        classic_model.train()
        seen, running = 0, 0.0
        t = time.perf_counter()
        for x, y in classic_loader:
            loss = criterion(classic_model(x), y)
            classic_opt.zero_grad(set_to_none=True)
            loss.backward()
            classic_opt.step()
            classic_sched.step()
            running += loss.item()
            seen += len(y)
        return seen / (time.perf_counter() - t)

    # compute-only bound: the same model, optimizer and batch size on pre-made normalised tensors
    images, labels = bundle.eval_uint8("train")
    mean = torch.tensor(bundle.preprocess["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(bundle.preprocess["std"]).view(1, -1, 1, 1)
    n_steps = len(labels) // BATCH_SIZE
    xs = [(images[i * BATCH_SIZE:(i + 1) * BATCH_SIZE].float() / 255 - mean) / std for i in range(n_steps)]
    ys = [labels[i * BATCH_SIZE:(i + 1) * BATCH_SIZE] for i in range(n_steps)]
    bound_model = new_model(cfg, bundle.in_chans, classes, device)
    if channels_last:  # the bound computes in the same memory format as the core loop
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    bound_opt = create_optimizer(cfg, bound_model)

    bound_step = [0]

    def bound_steps(steps: int) -> float:
        bound_model.train()
        t = time.perf_counter()
        for _ in range(steps):
            i = bound_step[0] % n_steps
            bound_step[0] += 1
            loss = criterion(bound_model(xs[i]), ys[i])
            bound_opt.zero_grad(set_to_none=True)
            loss.backward()
            bound_opt.step()
        return steps * BATCH_SIZE / (time.perf_counter() - t)

    log(f"row 1: {len(bundle.train)} train images, {reps} repetition(s) of 1 epoch per side")
    got = alternate({"core": core_side, "classic": classic_side, "bound": lambda: bound_steps(n_steps)}, reps)
    log("row 1: " + ", ".join(f"{k} {[round(v) for v in vs]} img/s" for k, vs in got.items()))
    med = {k: statistics.median(v) for k, v in got.items()}
    detail = (f"core {med['core']:.0f}, classic {med['classic']:.0f}, bound {med['bound']:.0f} img/s; "
              f"{len(bundle.train)} images, {reps}×1 epoch each, batch {BATCH_SIZE}; core and bound "
              f"{'channels_last (train.channels_last: auto)' if channels_last else 'NCHW'}, classic NCHW as usually "
              "written")

    # row 2: the real train_one_epoch over chunks of the tensor-cache loader vs the bound, alternating every chunk
    chunks = Chunks(loaders.train, CHUNK_STEPS)
    pairs = 6 if quick else 3 * len(loaders.train) // CHUNK_STEPS

    def core_chunk() -> float:
        core_epoch[0] += 1
        t = time.perf_counter()
        train_one_epoch(core_rt, core_state, chunks, core_epoch[0])
        return CHUNK_STEPS * BATCH_SIZE / (time.perf_counter() - t)

    got2 = alternate({"core": core_chunk, "bound": lambda: bound_steps(CHUNK_STEPS)}, pairs)
    ratios = [a / b for a, b in zip(got2["core"], got2["bound"])]
    log(f"row 2: core/bound per chunk {[round(r, 3) for r in ratios]}")
    return [
        Row("core loop vs classic loop (images/s, SimpleCNN 32 px)", ratio_median(got["core"], got["classic"]), 2.0,
            "×", note=detail),
        Row("core loop vs compute-only bound", statistics.median(ratios), 0.90, "ratio",
            note=f"fwd+bwd+step on pre-made tensors is the bound; median of {pairs} alternating chunks of "
                 f"{CHUNK_STEPS} steps (quartiles {quartiles(ratios)}); whole epochs in row 1's run: "
                 f"{ratio_median(got['core'], got['bound']):.2f}"),
    ]


SECTION = Section("training", "rows 1-2", bench_training, (
    Row("core loop vs classic loop (images/s, SimpleCNN 32 px)", None, 2.0, "×"),
    Row("core loop vs compute-only bound", None, 0.90, "ratio")))
