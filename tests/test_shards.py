"""Prepared datasets (core/data/prepare.py, shards.py, shard_cache.py, shard_loader.py): prepare → read round trip,
the epoch order across ranks, the shard cache's verification, budget and eviction, training from shards, an S3 store
through a real moto_server, and decoding at reduced JPEG scale."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import config_from_dict
from core.data.build import build_datasets
from core.data.prepare import choose_encoding, main, prepare
from core.data.shard_cache import ShardCache
from core.data.shard_loader import ShardBatchLoader, ShardReader, epoch_stream
from core.data.shards import read_index
from core.errors import DataError
from core.predict_template import load_image, resize_and_crop
from tests.fixtures_images import make_class_tree
from tests.fixtures_s3 import S3Server, s3_server  # noqa: F401 - s3_server: the fixture

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 20_000
"""Small shards so a few dozen tiny images make several per split."""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """3 classes × 14 JPEG photos of 120×100 px (larger than the 96 px input: the eval resizes and centre-crops)."""
    return make_class_tree(tmp_path / "photos", {"ant": 14, "bee": 14, "cat": 14}, size=(120, 100), suffix=".jpg")


def _prepared(folder: Path, out: Path, **kw: object) -> object:
    return prepare(str(folder), str(out), size=96, shard_bytes=SHARD_BYTES, **kw)


def _cfg(**data: object) -> object:
    return config_from_dict({"data": {"name": "imagefolder", "image_size": 96, **data}, "train": {"seed": 0}})


def test_prepare_then_read_gives_the_folders_eval_pixels_and_labels(folder: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATASET_SHARD_DIR", str(tmp_path / "cache"))
    index = _prepared(folder, tmp_path / "raw", encoding="raw")
    assert index.encoding == "raw" and index.stored_size == 110 and len(index.splits["train"].shards) > 2
    on_disk = read_index(str(tmp_path / "raw"))
    assert on_disk.classes == ["ant", "bee", "cat"] and on_disk.splits["train"].shards == index.splits["train"].shards
    from_folder = build_datasets(_cfg(path=str(folder)))
    from_shards = build_datasets(_cfg(prepared=str(tmp_path / "raw")))
    assert from_shards.preprocess == from_folder.preprocess
    for split in ("train", "val", "test"):
        a, b = from_folder.dataset(split), from_shards.dataset(split)
        assert sorted(zip(a.ids, a.labels.tolist())) == sorted(zip(b.ids, b.labels.tolist()))
        xa, _ = from_folder.eval_uint8(split)
        xb, _ = from_shards.eval_uint8(split)
        pos = {rel: i for i, rel in enumerate(a.ids)}
        order = torch.tensor([pos[rel] for rel in b.ids])
        assert torch.equal(xa[order], xb), split  # raw shards: exactly the eval image of the folder path
    # a shard image through the PIL eval transform is the same eval image
    img = from_shards.eval_image("test", 0)
    assert np.array_equal(np.asarray(img).transpose(2, 0, 1), from_shards.eval_uint8("test")[0][0].numpy())

    jpeg = _prepared(folder, tmp_path / "jpeg", encoding="jpeg")
    assert jpeg.stats["bytes_per_image"] < index.stats["bytes_per_image"]
    xj, _ = build_datasets(_cfg(prepared=str(tmp_path / "jpeg"))).eval_uint8("val")
    xr, _ = from_shards.eval_uint8("val")
    assert (xj.float() - xr.float()).abs().mean() < 8  # JPEG at quality 90 of noise images


def test_each_sample_once_per_epoch_across_two_ranks_in_a_seeded_order(folder: Path, tmp_path: Path) -> None:
    index = _prepared(folder, tmp_path / "form", encoding="raw")
    split = index.splits["train"]
    cache = ShardCache(tmp_path / "cache", budget_bytes=10**9)

    def rank_positions(rank: int, epoch: int, seed: int = 7) -> list[int]:
        loader = ShardBatchLoader(ShardReader(str(tmp_path / "form"), index, split, cache), batch_size=4,
                                  mean=[0.5] * 3, std=[0.25] * 3, train=True, device=torch.device("cpu"),
                                  input_size=[96, 96], augment="classic", seed=seed, rank=rank, world_size=2)
        loader.set_epoch(epoch)
        return loader.epoch_positions().tolist()

    r0, r1 = rank_positions(0, 1), rank_positions(1, 1)
    assert not set(r0) & set(r1) and len(r0) == len(r1) == len(split) // 2
    assert len(set(r0) | set(r1)) >= len(split) - 1
    assert rank_positions(0, 1) == r0  # the same seed and epoch: the same order (what a resume relies on)
    assert rank_positions(0, 2) != r0 and rank_positions(0, 1, seed=8) != r0
    assert sorted(epoch_stream(split, 7, 3).tolist()) == list(range(len(split)))
    # the batches themselves: labels match the positions, augmented floats of the input size
    loader = ShardBatchLoader(ShardReader(str(tmp_path / "form"), index, split, cache), batch_size=4,
                              mean=[0.5] * 3, std=[0.25] * 3, train=True, device=torch.device("cpu"),
                              input_size=[96, 96], augment="classic", seed=7, rank=0, world_size=2)
    loader.set_epoch(1)
    labels = [y for _, y in loader]
    xs = next(iter(loader))[0]
    assert xs.shape == (4, 3, 96, 96) and xs.dtype == torch.float32
    assert torch.cat(labels).tolist() == [split.labels[p] for p in r0][:len(loader) * 4]


def test_a_corrupt_or_truncated_shard_is_fetched_twice_then_named(folder: Path, tmp_path: Path) -> None:
    index = _prepared(folder, tmp_path / "form", encoding="raw")
    shard = index.splits["val"].shards[0]
    path = tmp_path / "form" / shard.name
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    cache = ShardCache(tmp_path / "cache", budget_bytes=10**9)
    with pytest.raises(DataError, match=f"shard {shard.name} .* corrupt or truncated"):
        cache.get(str(tmp_path / "form"), shard)
    assert cache.refetched == [shard.name, shard.name] and not list((tmp_path / "cache").glob("*"))
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(DataError, match=f"{shard.name}.*of {len(data) // 2} bytes"):
        cache.get(str(tmp_path / "form"), shard)
    other = index.splits["val"].shards[1]
    assert cache.get(str(tmp_path / "form"), other).is_file()  # the intact shards still read


def test_a_budget_smaller_than_one_shard_names_both_numbers(folder: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    index = _prepared(folder, tmp_path / "form", encoding="raw")
    shard = index.splits["train"].shards[0]
    monkeypatch.setenv("DATASET_CACHE_GB", "0.00001")
    with pytest.raises(DataError) as err:
        ShardCache(tmp_path / "cache").get(str(tmp_path / "form"), shard)
    assert "DATASET_CACHE_GB=1e-05 GB (10000 bytes)" in str(err.value) and f"{shard.bytes} bytes" in str(err.value)
    monkeypatch.setenv("DATASET_CACHE_GB", "lots")
    with pytest.raises(DataError, match="DATASET_CACHE_GB='lots' is not a positive number"):
        ShardCache(tmp_path / "cache")


def test_the_cache_evicts_the_least_recently_used_shard(folder: Path, tmp_path: Path) -> None:
    index = _prepared(folder, tmp_path / "form", encoding="raw")
    a, b, c = index.splits["train"].shards[:3]
    cache = ShardCache(tmp_path / "cache", budget_bytes=a.bytes + b.bytes + c.bytes - 1)
    url = str(tmp_path / "form")
    pa, pb = cache.get(url, a), cache.get(url, b)
    past = time.time() - 100
    os.utime(pa, (past, past))
    os.utime(pb, (past + 1, past + 1))
    cache.get(url, a)  # used again: now the most recent
    pc = cache.get(url, c)
    assert pa.is_file() and pc.is_file() and not pb.is_file()
    assert cache.used_bytes() <= cache.budget


def test_training_from_shards_reports_the_path(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.train import train

    monkeypatch.setenv("DATASET_SHARD_DIR", str(tmp_path / "cache"))
    index = _prepared(folder, tmp_path / "form", encoding="jpeg")
    cfg = config_from_dict({"data": {"name": "imagefolder", "prepared": str(tmp_path / "form"), "cache_max_mb": 1},
                            "model": {"name": "simple_cnn"}, "train": {"epochs": 2, "batch_size": 8},
                            "export": {"enabled": False}})
    report = train(cfg, tmp_path / "run")
    assert report["data_path"] == "shards" and report["epochs_completed"] == 2
    assert report["data"]["counts"] == {s: len(index.splits[s]) for s in ("train", "val", "test")}
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["ant", "bee", "cat"]


def test_an_s3_store_through_moto(folder: Path, tmp_path: Path, s3_server: S3Server,  # noqa: F811
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    url = s3_server.bucket("prepared") + "/photos/96"
    index = prepare(str(folder), url, size=96, encoding="raw", shard_bytes=SHARD_BYTES)
    assert read_index(url).splits["test"].shards == index.splits["test"].shards
    monkeypatch.setenv("DATASET_SHARD_DIR", str(tmp_path / "cache"))
    bundle = build_datasets(_cfg(prepared=url))
    x, y = bundle.eval_uint8("test")
    assert x.shape == (len(index.splits["test"]), 3, 96, 96) and y.tolist() == index.splits["test"].labels
    wanted = {s.name for s in index.splits["test"].shards}
    deadline = time.monotonic() + 10  # the server logs a GET once its body is sent
    while not {k.rsplit("/", 1)[-1] for k in s3_server.object_gets("prepared")} >= wanted:
        assert time.monotonic() < deadline, f"shard downloads not seen: {s3_server.requests()[-10:]}"
        time.sleep(0.1)
    gets = s3_server.object_gets("prepared")
    assert not any("/train-" in k for k in gets)  # nothing read that the test split does not need


def test_the_cli_refuses_bad_input_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "out" / "index.json").exists()
    assert main([str(tmp_path), str(tmp_path / "out"), "--split", "0.5,0.5,0.5"]) == 2
    assert choose_encoding("auto", 1000, 150_528, 10**9) == "raw"
    assert choose_encoding("auto", 10_000, 150_528, 10**9) == "jpeg"


def test_large_jpegs_decode_at_reduced_scale_within_a_grey_level(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    photo.save(tmp_path / "big.jpg", quality=92)
    pp = {"input_size": [224, 224], "resize_shorter": 256, "center_crop": [224, 224]}
    with Image.open(tmp_path / "big.jpg") as img:
        from core.predict_template import draft_for

        draft_for(img, pp)
        img.load()
        assert img.size == (400, 300)  # 1/4 scale: still more than the 256 px shorter side
    full = np.asarray(resize_and_crop(load_image(tmp_path / "big.jpg"), pp), np.float32)
    drafted = np.asarray(resize_and_crop(load_image(tmp_path / "big.jpg", pp), pp), np.float32)
    assert full.shape == drafted.shape == (224, 224, 3)
    assert np.abs(full - drafted).mean() < 1.5 and np.abs(full - drafted).max() <= 16


class _CrashAfter:
    """A sink that interrupts training after `n` epoch events (as a killed worker would, between epochs)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def emit(self, type: str, data: dict) -> None:
        if type == "epoch":
            self.seen += 1
            if self.seen >= self.n:
                raise KeyboardInterrupt

    def close(self) -> None:
        pass


def test_a_resumed_run_on_shards_reproduces_an_uninterrupted_one(folder: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from core.train import train

    monkeypatch.setenv("DATASET_SHARD_DIR", str(tmp_path / "cache"))
    _prepared(folder, tmp_path / "form", encoding="raw")
    overrides = ["data.name=imagefolder", f"data.prepared={tmp_path / 'form'}", "data.cache_max_mb=1",
                 "model.name=simple_cnn", "train.epochs=3", "train.batch_size=8", "export.enabled=false",
                 "track.tensorboard=false"]
    cfg = config_from_dict({}, overrides)
    whole = train(cfg, tmp_path / "whole")
    assert whole["data_path"] == "shards"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", sink=_CrashAfter(2))
    resumed = train(cfg, tmp_path / "cut", resume=True)
    assert resumed["test"]["confusion_matrix"] == whole["test"]["confusion_matrix"]
    a = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


@pytest.mark.slow  # two torchrun ranks: ~40 s here
def test_two_gloo_ranks_train_from_shards(folder: Path, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    _prepared(folder, tmp_path / "form", encoding="raw")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DATASET_SHARD_DIR": str(tmp_path / "cache")}
    sets = ["data.name=imagefolder", f"data.prepared={tmp_path / 'form'}", "data.cache_max_mb=1",
            "data.color_mode=RGB", "data.image_size=96", "train.epochs=2", "train.batch_size=8",
            "export.enabled=false"]
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "core.train",
                           str(ROOT / "configs" / "digits.yaml"), "--out", str(tmp_path / "ddp"),
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["world_size"] == 2 and report["data_path"] == "shards" and report["epochs_completed"] == 2
    assert sum(report["data"]["counts"].values()) == 42  # every image, split as the form says
