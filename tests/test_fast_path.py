"""The tensor-cache data path (core/data/fast.py): the batch augmentation is the classic preset's random crop, flip and
jitter, each rank holds only its shard under DDP, and training through it reaches the DataLoader path's accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision.transforms import functional as TF

from core import distributed as D
from core.config import config_from_dict, load_config
from core.data import build_datasets, fast
from core.data.fast import (
    BRIGHTNESS,
    CONTRAST,
    TensorBatchLoader,
    _crop_flip_copies,
    _crop_flip_gather,
    cache_bytes,
    classic_augment,
    crop_flip,
    draw_classic_params,
    float_batch,
    make_fast_loaders,
    normalise,
)

ROOT = Path(__file__).resolve().parents[1]


def _images(n: int = 16, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [1, 3])
def test_crop_flip_is_pad_crop_then_flip_per_sample(channels: int) -> None:
    x = _images(c=channels)
    pad = 4
    params = draw_classic_params(len(x), torch.Generator().manual_seed(1), pad=pad, hflip=True, jitter=False)
    out = crop_flip(x, params["oy"], params["ox"], params["flip"], pad)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(len(x)):
        ref = TF.crop(TF.pad(x[i], [pad], fill=0), int(params["oy"][i]), int(params["ox"][i]), 32, 32)
        if params["flip"][i]:
            ref = TF.hflip(ref)
        assert torch.equal(out[i], ref), i


@pytest.mark.parametrize("path", [_crop_flip_copies, _crop_flip_gather], ids=["cpu-copies", "gpu-gather"])
@pytest.mark.parametrize(("shape", "pad"), [((5, 3, 7, 11), 1), ((6, 1, 3, 2), 4), ((40, 3, 9, 9), 2)])
def test_both_crop_flip_paths_give_the_padded_crop_then_flip(path: Any, shape: tuple[int, ...], pad: int) -> None:
    """The CPU's slice copies and the GPU's gather (run here on the CPU), on non-square images, a pad wider than the
    image (crops that are mostly or wholly padding) and a strided view as input."""
    n, c, h, w = shape
    big = torch.randint(0, 256, (n, c, h + 2, w + 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = big[:, :, 1:1 + h, 2:2 + w]  # a view, as the shard loader's centre crop hands over
    params = draw_classic_params(n, torch.Generator().manual_seed(3), pad=pad, hflip=True, jitter=False)
    out = path(x, params["oy"], params["ox"], params["flip"], pad)
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.is_contiguous()
    for i in range(n):
        ref = TF.crop(TF.pad(x[i], [pad], fill=0), int(params["oy"][i]), int(params["ox"][i]), h, w)
        assert torch.equal(out[i], TF.hflip(ref) if params["flip"][i] else ref), i


@pytest.mark.parametrize("brightness_first", [True, False])
def test_a_batch_augmented_part_by_part_equals_the_whole_batch_at_once(brightness_first: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU converts and transforms a batch in cache-sized parts (fast.CPU_CHUNK_BYTES); every image must come out
    as it does when the batch is one part (a GPU's way), parameters and grey means taken per image."""
    x = _images(n=23, size=20)
    params = draw_classic_params(len(x), torch.Generator().manual_seed(4), pad=3, hflip=True)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, -1, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, -1, 1, 1)

    def augmented(chunk_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(fast, "CPU_CHUNK_BYTES", chunk_bytes)
        assert len(float_batch(x)[1]) == -(-len(x) // max(1, chunk_bytes // (3 * 20 * 20 * 4)))
        return (classic_augment(x, torch.Generator(), pad=3, hflip=True, params=params,
                                brightness_first=brightness_first, normalize=(mean, std)), normalise(x, mean, std))

    whole, parts = augmented(2**30), augmented(5 * 3 * 20 * 20 * 4)  # one part; parts of 5 images, the last of 3
    assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1])
    assert not torch.equal(whole[0][:5], whole[0][5:10])


def test_crop_flip_parameters_cover_their_range() -> None:
    params = draw_classic_params(4000, torch.Generator().manual_seed(0), pad=4, hflip=True)
    assert set(params["oy"].tolist()) == set(range(9)) and set(params["ox"].tolist()) == set(range(9))
    assert 0.45 < params["flip"].float().mean().item() < 0.55
    assert params["brightness"].min() >= 1 - BRIGHTNESS and params["brightness"].max() <= 1 + BRIGHTNESS
    assert params["contrast"].min() >= 1 - CONTRAST and params["contrast"].max() <= 1 + CONTRAST
    assert params["brightness"].std() > 0.05 and params["contrast"].std() > 0.05
    no_flip = draw_classic_params(100, torch.Generator().manual_seed(0), pad=4, hflip=False)
    assert not no_flip["flip"].any()


def test_centred_unflipped_crop_without_jitter_is_identity() -> None:
    x = _images()
    n = len(x)
    params = {"oy": torch.full((n,), 4), "ox": torch.full((n,), 4), "flip": torch.zeros(n, dtype=torch.bool)}
    out = classic_augment(x, torch.Generator(), pad=4, hflip=True, jitter=False, params=params)
    assert torch.allclose(out, x.float() / 255)


@pytest.mark.parametrize("brightness_first", [True, False])
@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_matches_torchvision(brightness_first: bool, channels: int) -> None:
    x = _images(n=8, c=channels)
    x[:, :, :4] = 255  # bright patches: the brightness clamp at 1 matters for b > 1
    b = torch.linspace(0.8, 1.2, 8)
    c = torch.linspace(1.2, 0.8, 8)
    params = {"oy": torch.zeros(8, dtype=torch.long), "ox": torch.zeros(8, dtype=torch.long),
              "flip": torch.zeros(8, dtype=torch.bool), "brightness": b, "contrast": c}
    got = classic_augment(x, torch.Generator(), pad=0, hflip=False, params=params, brightness_first=brightness_first)
    for i in range(len(x)):
        ref = x[i].float() / 255
        for op in ("b", "c") if brightness_first else ("c", "b"):
            ref = TF.adjust_brightness(ref, float(b[i])) if op == "b" else TF.adjust_contrast(ref, float(c[i]))
        assert torch.allclose(got[i], ref, atol=2e-3), i  # torchvision's grey uses 0.2989 for red, PIL 0.299
    mean, std = torch.tensor([0.4, 0.5, 0.6][:channels]).view(1, -1, 1, 1), torch.tensor([0.2, 0.25, 0.3][:channels])
    normalised = classic_augment(x, torch.Generator(), pad=0, hflip=False, params=params,
                                 brightness_first=brightness_first, normalize=(mean, std.view(1, -1, 1, 1)))
    assert torch.allclose(normalised, (got - mean) / std.view(1, -1, 1, 1), atol=1e-5)


def test_augmentation_is_random_and_in_range() -> None:
    x = _images(n=64)
    gen = torch.Generator().manual_seed(0)
    a = classic_augment(x, gen, pad=4, hflip=True)
    b = classic_augment(x, gen, pad=4, hflip=True)
    assert a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, b)
    changed = (a - x.float() / 255).abs().flatten(1).amax(1) > 1e-6
    assert changed.float().mean() > 0.9  # crop offsets, flips and jitter leave almost no image untouched


def test_loader_is_reproducible_per_epoch_and_differs_between_epochs() -> None:
    x, y = _images(n=200), torch.arange(200) % 10
    kw = {"batch_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3, "train": True, "augment": "classic", "seed": 3}

    def epoch_batches(epoch: int) -> list[torch.Tensor]:
        loader = TensorBatchLoader(x, y, **kw)
        loader.set_epoch(epoch)
        return [xb for xb, _ in loader]

    first, again, second = epoch_batches(1), epoch_batches(1), epoch_batches(2)
    assert len(first) == 4 and first[-1].shape[0] == 200 - 3 * 64
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], second[0])
    loader = TensorBatchLoader(x, y, **kw)
    assert sorted(torch.cat([yb for _, yb in loader]).tolist()) == sorted(y.tolist())  # a permutation, each once


def test_ddp_shards_hold_only_their_part() -> None:
    cfg = config_from_dict({"data": {"name": "synthetic", "synthetic_size": 400, "cache": "on"},
                            "train": {"batch_size": 16}})
    bundle = build_datasets(cfg)
    full_train, _ = bundle.eval_uint8("train")
    shards = [make_fast_loaders(cfg, bundle, D.DistInfo(rank=r, local_rank=r, world_size=2), torch.device("cpu"))
              for r in range(2)]
    n_train = len(bundle.train)
    rows = []
    for loaders in shards:
        train = loaders.train
        assert len(train.labels) == n_train // 2 == len(train.images)
        rows.append({bytes(img.numpy().tobytes()) for img in train.images})
    assert not rows[0] & rows[1]  # disjoint
    all_rows = {bytes(img.numpy().tobytes()) for img in full_train}
    assert rows[0] | rows[1] <= all_rows
    for split in ("val", "test"):
        loader, idx = zip(*(shards[r].eval_split(split) for r in range(2)))
        assert not set(idx[0]) & set(idx[1])
        assert sorted(idx[0] + idx[1]) == list(range(len(bundle.dataset(split))))
        assert all(len(loader[r].labels) == len(idx[r]) for r in range(2))


def test_cache_size_of_cifar() -> None:
    assert cache_bytes(50_000, 3, (32, 32)) == 153_600_000


def test_fast_path_reaches_the_dataloader_paths_accuracy(tmp_path: Path) -> None:
    """The digits preset at reduced epochs, once through the tensor cache and once through DataLoader + PIL."""
    from core.train import train

    acc = {}
    for cache in ("on", "off"):
        cfg = load_config(ROOT / "configs" / "digits.yaml",
                          ["train.epochs=6", "export.enabled=false", f"data.cache='{cache}'"])
        report = train(cfg, tmp_path / cache)
        acc[cache] = report["test"]["accuracy"]
    assert acc["on"] >= 0.95 and acc["off"] >= 0.95, acc
    assert abs(acc["on"] - acc["off"]) <= 0.02, acc
