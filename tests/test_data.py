"""core.data: every dataset kind from real files, the splits, the transforms, zips and the ways a dataset is refused."""
from __future__ import annotations

import io
import pickle
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from core.config import Config, DataConfig, ModelConfig, TrainConfig
from core.data import archive as archive_module
from core.data import build_datasets, create_transform, inspect_dataset, stratified_split
from core.data.defaults import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN
from core.errors import DataError
from tests.fixtures_images import (
    add_zip_entry,
    make_class_tree,
    make_fake_cifar10,
    noise_image,
    png_bytes,
    write_image,
    write_truncated_jpeg,
    write_truncated_png,
    zip_folder,
)


def make_cfg(seed: int = 0, pretrained: bool = False, **data: object) -> Config:
    """A Config with only the data section set. model_construct skips the model-name check, which needs core.models
    (not the subject here); DataConfig itself is validated."""
    return Config.model_construct(data=DataConfig(**data), train=TrainConfig(seed=seed),
                                  model=ModelConfig.model_construct(name="simple_cnn", pretrained=pretrained))


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Zip extraction goes to a per-test cache, never into the repository's var/."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DATA_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def messy_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A realistic upload: wrapping folder, mixed formats and suffix cases, odd colour modes, broken and junk files."""
    top = tmp_path_factory.mktemp("messy") / "my_dataset"
    wrap = top / "photos"
    make_class_tree(wrap, {"cat": 6, "dog": 6}, suffix=".png")
    for i in range(3):
        write_image(wrap / "cat" / f"jpeg_{i}.JPG", seed=50 + i)
        write_image(wrap / "dog" / f"bitmap_{i}.Bmp", seed=60 + i)
        write_image(wrap / "bird" / f"b_{i}.jpeg", seed=70 + i)
        write_image(wrap / "bird" / "nested" / f"n_{i}.PNG", seed=80 + i)
    write_image(wrap / "bird" / "gray.png", mode="L", seed=90)
    write_image(wrap / "bird" / "palette.gif", mode="P", seed=91)
    write_image(wrap / "bird" / "alpha.png", mode="RGBA", seed=92)
    (wrap / "cat" / "empty.png").write_bytes(b"")
    write_truncated_png(wrap / "cat" / "trunc.png")
    write_truncated_jpeg(wrap / "dog" / "trunc.jpg")
    (wrap / "dog" / "garbage.jpeg").write_bytes(b"this is not an image at all" * 10)
    # never data
    write_image(top / "__MACOSX" / "photos" / "cat" / "._x.png", seed=1)
    write_image(wrap / "cat" / ".hidden.png", seed=2)
    write_image(wrap / ".thumbs" / "t.png", seed=3)
    write_image(wrap / "dog" / ".cache" / "c.png", seed=4)
    (wrap / "dog" / "notes.txt").write_text("labels are folders")
    (wrap / "cat" / "Thumbs.db").write_bytes(b"\0" * 10)
    return top


MESSY_SKIPPED = {"photos/cat/empty.png", "photos/cat/trunc.png", "photos/dog/trunc.jpg", "photos/dog/garbage.jpeg"}
MESSY_COUNTS = {"bird": 9, "cat": 9, "dog": 9}


# ---------------------------------------------------------------------------------------------------------- digits
def test_digits_rgb_and_l_shapes_counts_and_speed() -> None:
    build_datasets(make_cfg(name="digits"))  # warm the imports; the timing below is the dataset work itself
    start = time.perf_counter()
    rgb = build_datasets(make_cfg(name="digits", image_size=32))
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"building digits took {elapsed:.2f} s"
    assert sum(rgb.counts.values()) == 1797
    assert rgb.classes == [str(d) for d in range(10)]
    assert sorted(rgb.split["train"] + rgb.split["val"] + rgb.split["test"]) == list(range(1797))
    assert rgb.counts == {s: len(rgb.split[s]) for s in ("train", "val", "test")}
    assert rgb.test_ids == rgb.split["test"] and all(isinstance(i, int) for i in rgb.test_ids)
    x, y = rgb.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert rgb.in_chans == 3 and rgb.preprocess["input_size"] == [32, 32] and rgb.preprocess["resize_shorter"] is None
    assert len(rgb.preprocess["mean"]) == 3 and 0.2 < rgb.preprocess["mean"][0] < 0.4  # computed, not ImageNet's

    gray = build_datasets(make_cfg(name="digits", color_mode="L"))
    assert gray.in_chans == 1 and gray.preprocess["color_mode"] == "L" and len(gray.preprocess["mean"]) == 1
    x, _ = gray.val[3]
    assert x.shape == (1, 8, 8)
    u8, labels = gray.eval_uint8("test")
    assert u8.shape == (len(gray.test), 1, 8, 8) and u8.dtype == torch.uint8 and labels.dtype == torch.int64
    assert labels.tolist() == gray.test.labels.tolist()
    assert int(u8.max()) == 255 and int(u8.min()) == 0  # 16 → 255, 0 → 0
    normalised = (u8.float() / 255 - gray.preprocess["mean"][0]) / gray.preprocess["std"][0]
    assert torch.allclose(torch.stack([gray.test[i][0] for i in range(5)]), normalised[:5], atol=1e-5)
    assert gray.eval_image("test", 0).size == (8, 8) and gray.eval_image("test", 0).mode == "L"


def test_digits_split_is_stratified_and_seeded() -> None:
    a, b = build_datasets(make_cfg(name="digits", seed=1)), build_datasets(make_cfg(name="digits", seed=1))
    c = build_datasets(make_cfg(name="digits", seed=2))
    assert a.split == b.split
    assert a.split["test"] != c.split["test"]
    for split, fraction in zip(("train", "val", "test"), (0.7, 0.2, 0.1)):
        total = np.array(a.class_counts["train"]) + a.class_counts["val"] + a.class_counts["test"]
        assert np.all(np.abs(np.array(a.class_counts[split]) - total * fraction) <= 1), split


# ----------------------------------------------------------------------------------------------------------- split
def test_stratified_split_proportions_minimums_and_determinism() -> None:
    labels = np.repeat(np.arange(5), [100, 37, 11, 3, 1])
    parts = stratified_split(labels, [0.7, 0.2, 0.1], seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))  # a partition
    for cls, n in enumerate([100, 37, 11]):
        for part, fraction in zip(parts, (0.7, 0.2, 0.1)):
            assert abs(int((labels[part] == cls).sum()) - n * fraction) <= 1
    assert [int((labels[p] == 3).sum()) for p in parts] == [1, 1, 1]  # 3 images: one in each split
    assert [int((labels[p] == 4).sum()) for p in parts] == [1, 0, 0]  # 1 image: train first
    again = stratified_split(labels, [0.7, 0.2, 0.1], seed=0)
    other = stratified_split(labels, [0.7, 0.2, 0.1], seed=1)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    assert not np.array_equal(parts[1], other[1])
    no_test = stratified_split(labels, [0.8, 0.2, 0.0], seed=0)
    assert len(no_test[2]) == 0 and int((labels[no_test[1]] == 3).sum()) == 1


# ------------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_by_seed() -> None:
    cfg = make_cfg(name="synthetic", synthetic_size=60, synthetic_classes=3, synthetic_image_size=12, seed=5)
    a, b = build_datasets(cfg), build_datasets(cfg)
    assert a.counts == {"train": 42, "val": 12, "test": 6} and a.class_counts["test"] == [2, 2, 2]
    assert len(a.classes) == 3 and a.preprocess["input_size"] == [12, 12]
    ua, la = a.eval_uint8("train")
    ub, lb = b.eval_uint8("train")
    assert ua.shape == (42, 3, 12, 12) and torch.equal(ua, ub) and torch.equal(la, lb)
    other = build_datasets(cfg.model_copy(update={"train": TrainConfig(seed=6)}))
    assert not torch.equal(other.eval_uint8("test")[0], a.eval_uint8("test")[0])
    assert a.train[0][0].shape == (3, 12, 12)


# ----------------------------------------------------------------------------------------------------- imagefolder
def test_imagefolder_messy_upload(messy_tree: Path) -> None:
    bundle = build_datasets(make_cfg(name="imagefolder", path=str(messy_tree), image_size=24, augment="none"))
    assert bundle.classes == ["bird", "cat", "dog"]
    assert {s["file"] for s in bundle.skipped_files} == MESSY_SKIPPED
    assert all(s["reason"] for s in bundle.skipped_files)
    assert next(s for s in bundle.skipped_files if s["file"].endswith("empty.png"))["reason"].startswith("empty")
    all_ids = bundle.split["train"] + bundle.split["val"] + bundle.split["test"]
    assert len(all_ids) == 27 and len(set(all_ids)) == 27
    assert all(i.startswith("photos/") for i in all_ids)  # relative to data.path, wrapper folder included
    assert not any("__MACOSX" in i or "/." in i or i.endswith((".txt", ".db")) for i in all_ids)
    assert "photos/bird/nested/n_0.PNG" in all_ids and "photos/dog/bitmap_0.Bmp" in all_ids
    total = np.array(bundle.class_counts["train"]) + bundle.class_counts["val"] + bundle.class_counts["test"]
    assert total.tolist() == [MESSY_COUNTS[c] for c in bundle.classes]
    assert all(n >= 1 for split in ("train", "val", "test") for n in bundle.class_counts[split])
    assert bundle.preprocess["mean"] == list(IMAGENET_MEAN)
    for split in ("train", "val", "test"):  # gray, palette and RGBA files all come out as 3×24×24
        for i in range(len(bundle.dataset(split))):
            x, y = bundle.dataset(split)[i]
            assert x.shape == (3, 24, 24) and 0 <= y < 3
    u8, labels = bundle.eval_uint8("train")
    assert u8.shape == (len(bundle.train), 3, 24, 24) and labels.tolist() == bundle.train.labels.tolist()


def test_imagefolder_color_modes_and_native_size(tmp_path: Path) -> None:
    root = tmp_path / "modes"
    write_image(root / "a" / "gray.png", mode="L", seed=1)
    write_image(root / "a" / "pal.png", mode="P", seed=2)
    write_image(root / "b" / "rgba.png", mode="RGBA", seed=3)
    write_image(root / "b" / "rgb.webp", seed=4)
    write_image(root / "b" / "rgb.TIFF", seed=5)
    rgb = build_datasets(make_cfg(name="imagefolder", path=str(root), split=[0.5, 0.5, 0.0]))
    assert rgb.preprocess["input_size"] == [16, 16]  # None → small images keep their native shorter side
    assert rgb.skipped_files == []
    gray = build_datasets(make_cfg(name="imagefolder", path=str(root), color_mode="L", split=[0.5, 0.5, 0.0]))
    assert gray.in_chans == 1 and len(gray.preprocess["std"]) == 1
    for bundle, channels in ((rgb, 3), (gray, 1)):
        for split in ("train", "val"):
            for i in range(len(bundle.dataset(split))):
                assert bundle.dataset(split)[i][0].shape == (channels, 16, 16)
                assert bundle.eval_image(split, i).mode == ("RGB" if channels == 3 else "L")
    # pixels: in RGB mode the gray file has three equal channels, the RGBA file keeps its colours (alpha dropped)
    where = {rel: (split, i) for split in ("train", "val") for i, rel in enumerate(rgb.split[split])}
    assert len(where) == 5
    gray_px = np.asarray(rgb.eval_image(*where["a/gray.png"]))
    assert np.array_equal(gray_px[..., 0], gray_px[..., 1]) and np.array_equal(gray_px[..., 1], gray_px[..., 2])
    rgba_px = np.asarray(rgb.eval_image(*where["b/rgba.png"]))
    expected = noise_image(mode="RGBA", seed=3).convert("RGB").resize((16, 16), Image.BILINEAR)
    assert np.array_equal(rgba_px, np.asarray(expected))


def test_imagefolder_oversized_images_are_skipped(tmp_path: Path) -> None:
    root = make_class_tree(tmp_path / "ds", {"a": 3, "b": 3}, size=(10, 10))
    write_image(root / "a" / "huge.png", size=(40, 40))
    bundle = build_datasets(make_cfg(name="imagefolder", path=str(root), max_image_pixels=500))
    assert [s["file"] for s in bundle.skipped_files] == ["a/huge.png"]
    assert "max_image_pixels" in bundle.skipped_files[0]["reason"]
    assert sum(bundle.counts.values()) == 6


@pytest.mark.parametrize(
    ("folders", "expected"),
    [
        ({"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}}, {"train": 14, "val": 4, "test": 2}),
        ({"train": {"a": 8, "b": 8}, "TEST": {"a": 3, "b": 3}}, {"train": 14, "val": 2, "test": 6}),
        ({"train": {"a": 8, "b": 8}, "validation": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}},
         {"train": 16, "val": 4, "test": 2}),
    ],
    ids=["train+val", "train+TEST", "train+validation+test"],
)
def test_imagefolder_split_folders_are_kept(tmp_path: Path, folders: dict, expected: dict) -> None:
    for split_dir, counts in folders.items():
        make_class_tree(tmp_path / "ds" / split_dir, counts, size=(8, 8))
    bundle = build_datasets(make_cfg(name="imagefolder", path=str(tmp_path / "ds"), split=[0.8, 0.1, 0.1]))
    assert bundle.counts == expected and bundle.classes == ["a", "b"]
    given = {"val": "val", "validation": "val", "TEST": "test", "test": "test"}
    for split_dir in folders:
        if split_dir != "train":  # a given folder becomes that split, untouched
            assert all(i.startswith(split_dir + "/") for i in bundle.split[given[split_dir]])
    assert all(i.startswith("train/") for i in bundle.split["train"])
    assert inspect_dataset(tmp_path / "ds")["splits_found"] == sorted({"train", *(given[d] for d in folders
                                                                                 if d != "train")},
                                                                        key=["train", "val", "test"].index)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"only": 3}, "found 1 class folder (only)"),
        ({}, "found 0 class folders"),
        ({"a": 3, "empty": 0}, "class 'empty' has no readable image (its folder holds no image files)"),
        ({"a": 3, "broken": -1}, "class 'broken' has no readable image (1 image file(s) skipped"),
    ],
    ids=["one-class", "no-class", "empty-class", "unreadable-class"],
)
def test_imagefolder_unusable_datasets_fail_clearly(tmp_path: Path, layout: dict, message: str) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    for name, n in layout.items():
        (root / name).mkdir()
        make_class_tree(root, {name: max(n, 0)}, size=(8, 8))
        if n < 0:
            (root / name / "x.png").write_bytes(b"")
    (root / "readme.md").write_text("not a class")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as built:
        build_datasets(make_cfg(name="imagefolder", path=str(root)))
    with pytest.raises(DataError) as inspected:
        inspect_dataset(root)
    assert str(built.value) == str(inspected.value)  # one scanner, one message


def test_imagefolder_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(make_cfg(name="imagefolder", path=str(tmp_path / "nope")))
    (tmp_path / "data.tar").write_bytes(b"x")
    with pytest.raises(DataError, match="not a .zip"):
        build_datasets(make_cfg(name="imagefolder", path=str(tmp_path / "data.tar")))
    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    with pytest.raises(DataError, match="not a readable zip"):
        build_datasets(make_cfg(name="imagefolder", path=str(tmp_path / "bad.zip")))
    make_class_tree(tmp_path / "mixed" / "train", {"a": 2, "b": 2}, size=(8, 8))
    make_class_tree(tmp_path / "mixed", {"c": 2}, size=(8, 8))
    with pytest.raises(DataError, match=r"mixes split folders \(train\) with other folders \(c\)"):
        inspect_dataset(tmp_path / "mixed")


# --------------------------------------------------------------------------------------------------------------- zip
def test_zip_builds_like_the_folder_and_extracts_only_into_the_cache(messy_tree: Path, tmp_path: Path,
                                                                    _cache_in_tmp: Path) -> None:
    zipped = zip_folder(messy_tree, tmp_path / "upload" / "Dataset.ZIP")
    before = sorted(p.name for p in zipped.parent.iterdir())
    cfg = make_cfg(name="imagefolder", path=str(zipped), image_size=16)
    bundle = build_datasets(cfg)
    folder = build_datasets(make_cfg(name="imagefolder", path=str(messy_tree), image_size=16))
    assert bundle.split == folder.split and bundle.classes == folder.classes
    assert {s["file"] for s in bundle.skipped_files} == MESSY_SKIPPED
    assert sorted(p.name for p in zipped.parent.iterdir()) == before  # nothing written next to the zip
    extracted = [p for p in _cache_in_tmp.iterdir() if not p.name.startswith(".")]
    assert len(extracted) == 1 and len(extracted[0].name) == 16
    assert not list(extracted[0].rglob("*.txt")) and not (extracted[0] / "__MACOSX").exists()
    stamp = (extracted[0] / ".complete").stat().st_mtime_ns
    assert build_datasets(cfg).split == bundle.split
    assert (extracted[0] / ".complete").stat().st_mtime_ns == stamp  # second build reuses the extraction
    x, _ = bundle.train[0]
    assert x.shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("entry", "symlink", "message"),
    [
        ("../evil.png", False, "contains '..'"),
        ("ds/a/../../../evil.png", False, "contains '..'"),
        ("/tmp/evil.png", False, "absolute path"),
        ("C:/evil.png", False, "absolute path"),
        ("ds/a/link.png", True, "symbolic link"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "drive", "symlink"],
)
def test_unsafe_zips_are_refused(tmp_path: Path, _cache_in_tmp: Path, entry: str, symlink: bool,
                                 message: str) -> None:
    zipped = zip_folder(make_class_tree(tmp_path / "src", {"a": 2, "b": 2}, size=(8, 8)), tmp_path / "ds.zip",
                        prefix="ds/")
    add_zip_entry(zipped, entry, b"/etc/passwd" if symlink else png_bytes(), symlink=symlink)
    with pytest.raises(DataError, match=message) as err:
        build_datasets(make_cfg(name="imagefolder", path=str(zipped)))
    assert repr(entry) in str(err.value)
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/evil.png").exists()
    assert not _cache_in_tmp.exists() or not any(_cache_in_tmp.rglob("*.png"))


def test_zip_size_and_count_caps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zipped = zip_folder(make_class_tree(tmp_path / "src", {"a": 3, "b": 3}, size=(8, 8)), tmp_path / "ds.zip")
    monkeypatch.setattr(archive_module, "ZIP_MAX_FILES", 5)
    with pytest.raises(DataError, match="6 entries, more than the limit of 5"):
        build_datasets(make_cfg(name="imagefolder", path=str(zipped)))
    monkeypatch.setattr(archive_module, "ZIP_MAX_FILES", 100)
    monkeypatch.setattr(archive_module, "ZIP_MAX_TOTAL_BYTES", 100)
    with pytest.raises(DataError, match="more than the limit of 100 bytes"):
        inspect_dataset(zipped)


# ------------------------------------------------------------------------------------------------------- inspect
def test_inspect_dataset_reports_health(messy_tree: Path) -> None:
    report = inspect_dataset(messy_tree, thumbnails_per_class=2)
    assert report["classes"] == ["bird", "cat", "dog"] and report["counts"] == MESSY_COUNTS
    assert {s["file"] for s in report["skipped_files"]} == MESSY_SKIPPED
    assert report["image_sizes"]["min"] == [20, 16] and report["image_sizes"]["common"][0] == [[20, 16], 27]
    assert report["imbalance_ratio"] == 1.0 and report["splits_found"] == []
    assert any("skipped" in w for w in report["warnings"]) and any("non-image" in w for w in report["warnings"])
    thumbs = report["thumbnails"]
    assert set(thumbs) == set(report["classes"]) and all(len(v) == 2 for v in thumbs.values())
    assert Image.open(io.BytesIO(thumbs["bird"][0])).mode == "RGB"
    gray = inspect_dataset(messy_tree, color_mode="L", thumbnails_per_class=1)
    assert Image.open(io.BytesIO(gray["thumbnails"]["cat"][0])).mode == "L"


# ---------------------------------------------------------------------------------------------------- transforms
def _reference_eval(img: Image.Image, pp: dict) -> np.ndarray:
    """What a client does with preprocess.json and nothing but Pillow + numpy (see core/data/transforms.py)."""
    img = img.convert(pp["color_mode"])
    if pp["resize_shorter"]:
        w, h = img.size
        s = pp["resize_shorter"]
        size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        img = img.resize(size, Image.BILINEAR)
        ch, cw = pp["center_crop"]
        top, left = round((img.height - ch) / 2), round((img.width - cw) / 2)
        img = img.crop((left, top, left + cw, top + ch))
    else:
        height, width = pp["input_size"]
        img = img.resize((width, height), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255
    x = x[..., None] if x.ndim == 2 else x
    x = (x - np.asarray(pp["mean"], np.float32)) / np.asarray(pp["std"], np.float32)
    return x.transpose(2, 0, 1)


def test_eval_transform_is_reproducible_from_preprocess_json(tmp_path: Path) -> None:
    root = make_class_tree(tmp_path / "photos", {"a": 2, "b": 2}, size=(150, 113))
    bundle = build_datasets(make_cfg(name="imagefolder", path=str(root), image_size=96, split=[0.5, 0.5, 0.0]))
    pp = bundle.preprocess
    assert pp["resize_shorter"] == 110 and pp["center_crop"] == [96, 96]  # photos larger than the input: crop
    native = build_datasets(make_cfg(name="imagefolder", path=str(root), split=[0.5, 0.5, 0.0])).preprocess
    assert native["input_size"] == [224, 224] and native["center_crop"] is None  # photos smaller than 224: resize
    pp_json = {k: v for k, v in pp.items()}
    for img in (noise_image((150, 113), seed=1), noise_image((77, 131), mode="P", seed=2),
                noise_image((96, 96), mode="RGBA", seed=3)):
        ours = create_transform(pp_json, "none", train=False)(img).numpy()
        assert ours.shape == (3, 96, 96)
        assert np.abs(ours - _reference_eval(img, pp_json)).max() < 1e-5
    straight = {**pp_json, "resize_shorter": None, "center_crop": None, "color_mode": "L", "mean": [0.5], "std": [0.25]}
    img = noise_image((40, 30), mode="RGBA", seed=4)
    assert np.abs(create_transform(straight)(img).numpy() - _reference_eval(img, straight)).max() < 1e-5
    for i, rel in enumerate(bundle.split["val"]):  # eval_image is the same geometry, and so is the val dataset
        ref = _reference_eval(Image.open(root / rel), pp_json)
        got = (np.asarray(bundle.eval_image("val", i), np.float32) / 255 - np.float32(pp["mean"])) / np.float32(pp["std"])
        assert np.abs(got.transpose(2, 0, 1) - ref).max() < 1e-5
        assert np.abs(bundle.val[i][0].numpy() - ref).max() < 1e-5


@pytest.mark.parametrize("color_mode", ["RGB", "L"])
def test_train_presets_randomise_and_keep_shapes(color_mode: str) -> None:
    channels = 1 if color_mode == "L" else 3
    small = {"color_mode": color_mode, "input_size": [32, 32], "resize_shorter": None, "center_crop": None,
             "mean": [0.5] * channels, "std": [0.25] * channels}
    big = {**small, "input_size": [112, 112], "resize_shorter": 128, "center_crop": [112, 112]}
    img = noise_image((40, 36), seed=7)
    photo = noise_image((160, 140), seed=8)
    for pp, source in ((small, img), (big, photo)):
        side = pp["input_size"][0]
        eval_tf = create_transform(pp, "classic", train=False)
        assert torch.equal(eval_tf(source), eval_tf(source))
        assert torch.equal(create_transform(pp, "none", train=True)(source), eval_tf(source))
        for augment in ("classic", "strong"):
            tf = create_transform(pp, augment, train=True)
            torch.manual_seed(0)
            outs = [tf(source) for _ in range(4)]
            assert all(o.shape == (channels, side, side) and o.dtype == torch.float32 for o in outs)
            assert any(not torch.equal(outs[0], o) for o in outs[1:]), f"{augment} did not randomise"
            torch.manual_seed(0)
            assert torch.equal(tf(source), outs[0])  # reproducible under torch's seed
    no_flip = create_transform(small, "classic", train=True, hflip=False)
    assert "HorizontalFlip" not in repr(no_flip) and "HorizontalFlip" in repr(create_transform(small, "classic", True))
    with pytest.raises(ValueError, match="unknown augment 'fancy'"):
        create_transform(small, "fancy", train=True)


# ---------------------------------------------------------------------------------------------------------- cifar
def test_cifar_missing_files_say_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        build_datasets(make_cfg(name="cifar10", path=str(tmp_path / "data")))
    message = str(err.value)
    assert str(tmp_path / "data" / "cifar-10-batches-py") in message and "data.download=true" in message
    with pytest.raises(DataError, match="cifar-100-python"):
        build_datasets(make_cfg(name="cifar100", path=str(tmp_path)))


def test_cifar_loads_the_official_pickled_format(tmp_path: Path) -> None:
    arrays = make_fake_cifar10(tmp_path, per_batch=20, n_test=20)
    bundle = build_datasets(make_cfg(name="cifar10", path=str(tmp_path)))
    assert bundle.classes[:3] == ["airplane", "automobile", "bird"] and len(bundle.classes) == 10
    assert bundle.counts["test"] == 20  # the official test set, untouched
    assert bundle.counts["train"] + bundle.counts["val"] == 100
    assert bundle.class_counts["val"] == [2] * 10  # 10 per class × 0.2 / 0.9, stratified
    assert bundle.preprocess["mean"] == list(CIFAR10_MEAN) and bundle.preprocess["std"] == list(CIFAR10_STD)
    u8, labels = bundle.eval_uint8("test")
    expected = torch.from_numpy(arrays["test_batch"].reshape(-1, 3, 32, 32))
    assert torch.equal(u8, expected) and labels.tolist() == [i % 10 for i in range(20)]
    assert bundle.train[0][0].shape == (3, 32, 32)
    gray = build_datasets(make_cfg(name="cifar10", path=str(tmp_path / "cifar-10-batches-py"), color_mode="L"))
    assert gray.train[0][0].shape == (1, 32, 32) and len(gray.preprocess["mean"]) == 1


# ------------------------------------------------------------------------------------------------------- loaders
def test_dataloader_with_two_workers(messy_tree: Path) -> None:
    bundle = build_datasets(make_cfg(name="imagefolder", path=str(messy_tree), image_size=16))
    pickle.loads(pickle.dumps(bundle.train))  # spawn-safe too, not only fork
    pickle.loads(pickle.dumps(build_datasets(make_cfg(name="synthetic", synthetic_size=20)).train))
    loader = DataLoader(bundle.train, batch_size=4, shuffle=True, num_workers=2)
    seen = Counter()
    for x, y in loader:
        assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
        seen.update(y.tolist())
    assert sum(seen.values()) == len(bundle.train)
    assert [seen[i] for i in range(3)] == bundle.class_counts["train"]


def test_pretrained_normalisation_falls_back_to_imagenet() -> None:
    bundle = build_datasets(make_cfg(name="digits", pretrained=True, color_mode="L"))
    assert bundle.preprocess["mean"] == [pytest.approx(sum(IMAGENET_MEAN) / 3)]
