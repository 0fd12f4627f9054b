"""Prepare an imagefolder dataset once into shards: `python -m core.data.prepare SOURCE OUT_URL [--size N]`.

Every image is decoded once (large JPEGs at a reduced DCT scale, core.predict_template.draft_for), brought to the
stored geometry (core/data/shards.py: S×S, S the eval's resize-shorter side) and written into WebDataset tar shards
at OUT_URL (a path or any fsspec URL: the artifact store beside the dataset), with the labels, the class list, the
split and each shard's sha256 in index.json, written last.

Decisions:
- The split is part of the form: the folder's own train/val/test folders, else the stratified `split` with seed
  PREPARED_SPLIT_SEED (not each job's train.seed), so every job on the form trains and tests on the same images.
- `encoding: auto`: raw uint8 shards when their total (N × C × S × S bytes) is at most RAW_MAX_FRACTION_OF_CACHE of
  the shard cache budget (DATASET_CACHE_GB), else JPEG shards (quality JPEG_QUALITY, decoded per epoch): raw needs
  no decoding but takes ~6× the disk; a worker should be able to keep the whole raw form in its cache.
- SOURCE is a folder, a .zip or an fsspec URL of one (downloaded to a temporary folder first; a worker hands its
  already fetched copy instead).
Exit codes: 0 prepared, 2 bad input (DataError: the message says what), 1 anything else.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from core.data.defaults import (
    JPEG_QUALITY,
    PREPARE_THREADS,
    PREPARED_SPLIT_SEED,
    RAW_MAX_FRACTION_OF_CACHE,
    SHARD_INDEX,
    SHARD_TARGET_BYTES,
)
from core.data.shards import (
    ENCODINGS,
    PreparedIndex,
    ShardInfo,
    SplitShards,
    encode_sample,
    member_ext,
    open_fs,
    sample_key,
)
from core.errors import DataError

Progress = Callable[[int, int, float], None]
"""progress(done, total, images_per_sec): called after each shard (the feature cache's `embed` event shape)."""

ENCODING_CHOICES = ("auto", *ENCODINGS)

PREPARE_CHUNK = 256
"""Images decoded per batch of thread work; progress is reported after each."""


def stored_geometry(preprocess: dict[str, Any]) -> dict[str, Any]:
    """The S×S geometry shards store for a bundle's eval `preprocess` (core/data/shards.py's docstring)."""
    side = int(preprocess.get("resize_shorter") or preprocess["input_size"][0])
    if preprocess.get("resize_shorter"):
        return {"input_size": [side, side], "resize_shorter": side, "center_crop": [side, side]}
    return {"input_size": [side, side], "resize_shorter": None, "center_crop": None}


def choose_encoding(encoding: str, n_images: int, sample_bytes: int, budget_bytes: int) -> str:
    """`auto` → raw when N × sample bytes ≤ RAW_MAX_FRACTION_OF_CACHE × budget, else jpeg (module docstring)."""
    if encoding not in ENCODING_CHOICES:
        raise DataError(f"encoding {encoding!r} is not one of {', '.join(ENCODING_CHOICES)}")
    if encoding != "auto":
        return encoding
    return "raw" if n_images * sample_bytes <= RAW_MAX_FRACTION_OF_CACHE * budget_bytes else "jpeg"


@contextmanager
def local_source(source: str) -> Iterator[str]:
    """A local path of SOURCE: itself when it is one, else a temporary download of the fsspec URL."""
    if "://" not in source or source.startswith("file://"):
        yield source.removeprefix("file://")
        return
    with tempfile.TemporaryDirectory(prefix="prepare-source-") as tmp:
        try:
            fs, root = open_fs(source)
            if root.lower().endswith(".zip"):
                dest = os.path.join(tmp, "data.zip")
                fs.get_file(root, dest)
            else:
                dest = os.path.join(tmp, "data")
                fs.get(root.rstrip("/") + "/", dest, recursive=True)
        except Exception as err:  # noqa: BLE001 — fsspec back-ends raise their own
            raise DataError(f"cannot download {source}: {type(err).__name__}: {err}") from None
        yield dest


def _bundle(path: str, size: int | None, color_mode: str, split: list[float], max_image_pixels: int | None) -> Any:
    """The scan, split and eval geometry exactly as build_datasets makes them for a job on this folder."""
    from core.config import config_from_dict
    from core.data.build import build_datasets

    data: dict[str, Any] = {"name": "imagefolder", "path": path, "image_size": size, "color_mode": color_mode,
                            "split": split, "augment": "none"}
    if max_image_pixels:
        data["max_image_pixels"] = max_image_pixels
    cfg = config_from_dict({"data": data, "train": {"seed": PREPARED_SPLIT_SEED}})
    return build_datasets(cfg)


class _ShardWriter:
    """Writes one split's samples into tar shards of about SHARD_TARGET_BYTES, uploading each as it closes."""

    def __init__(self, fs: Any, root: str, split: str, encoding: str, workdir: Path, target_bytes: int) -> None:
        self.fs, self.root, self.split, self.encoding, self.workdir = fs, root, split, encoding, workdir
        self.target_bytes = target_bytes
        self.shards: list[ShardInfo] = []
        self._tar: Any = None
        self._count = self._first = self._size = 0
        self._path: Path | None = None
        self.bytes = 0

    def write(self, position: int, label: int, data: bytes) -> None:
        import webdataset as wds

        if self._tar is None:
            self._path = self.workdir / f"{self.split}-{len(self.shards):05d}.tar"
            self._tar = wds.TarWriter(str(self._path))
            self._first, self._count, self._size = position, 0, 0
        self._tar.write({"__key__": sample_key(position), member_ext(self.encoding): data,
                         "cls": str(int(label)).encode()})
        self._count += 1
        self._size += len(data) + 1536  # tar headers and padding of the two members
        if self._size >= self.target_bytes:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        path = self._path
        assert path is not None
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(4 << 20):
                digest.update(chunk)
        size = path.stat().st_size
        try:
            self.fs.put_file(str(path), f"{self.root}/{path.name}")
        except Exception as err:  # noqa: BLE001
            raise DataError(f"cannot write shard {path.name} to {self.root}: {type(err).__name__}: {err}") from None
        path.unlink()
        self.bytes += size
        self.shards.append(ShardInfo(name=path.name, sha256=digest.hexdigest(), bytes=size, count=self._count,
                                     first=self._first))


def prepare(source: str, out_url: str, *, size: int | None = None, color_mode: str = "RGB",
            split: list[float] | None = None, encoding: str = "auto", budget_bytes: int | None = None,
            max_image_pixels: int | None = None, progress: Progress | None = None,
            shard_bytes: int = SHARD_TARGET_BYTES) -> PreparedIndex:
    """Decode SOURCE once into shards at OUT_URL and return the written index (see the module docstring)."""
    from core.config import DataConfig
    from core.data.shard_cache import cache_budget_bytes

    t0 = time.perf_counter()
    split = list(split or DataConfig.model_fields["split"].default_factory())
    with local_source(source) as path:
        bundle = _bundle(path, size, color_mode, split, max_image_pixels)
        pp = bundle.preprocess
        geometry = stored_geometry(pp)
        side = geometry["input_size"][0]
        n_total = sum(len(bundle.dataset(s)) for s in ("train", "val", "test"))
        enc = choose_encoding(encoding, n_total, bundle.in_chans * side * side,
                              cache_budget_bytes() if budget_bytes is None else budget_bytes)
        from core.data.transforms import EvalGeometry, to_color_mode

        to_stored = EvalGeometry.from_preprocess(geometry)
        try:
            fs, root = open_fs(out_url)
            root = root.rstrip("/")
            fs.makedirs(root, exist_ok=True)
        except Exception as err:  # noqa: BLE001
            raise DataError(f"cannot write to {out_url}: {type(err).__name__}: {err}") from None
        splits: dict[str, SplitShards] = {}
        done, total_bytes = 0, 0
        with tempfile.TemporaryDirectory(prefix="prepare-") as work, ThreadPoolExecutor(PREPARE_THREADS) as pool:
            for name in ("train", "val", "test"):
                ds = bundle.dataset(name)
                order = np.random.default_rng([PREPARED_SPLIT_SEED, len(ds)]).permutation(len(ds))

                def encoded(i: int, ds: Any = ds) -> bytes:
                    img = to_color_mode(ds.source.load(int(ds.indices[i])), color_mode)
                    return encode_sample(to_stored(img), enc, JPEG_QUALITY)

                writer = _ShardWriter(fs, root, name, enc, Path(work), shard_bytes)
                for start in range(0, len(order), PREPARE_CHUNK):  # bounded: never a future per image of a big set
                    chunk = order[start:start + PREPARE_CHUNK].tolist()
                    for position, (i, data) in enumerate(zip(chunk, pool.map(encoded, chunk)), start):
                        writer.write(position, int(ds.labels[i]), data)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, n_total, done / max(time.perf_counter() - t0, 1e-9))
                writer.close()
                total_bytes += writer.bytes
                splits[name] = SplitShards(labels=[int(ds.labels[i]) for i in order],
                                           ids=[str(ds.ids[i]) for i in order], shards=writer.shards)
        seconds = time.perf_counter() - t0
        index = PreparedIndex(
            encoding=enc, color_mode=color_mode, input_size=int(pp["input_size"][0]), stored_size=side,
            median_side=_median_side(bundle), classes=list(bundle.classes), splits=splits, split_fractions=split,
            split_seed=PREPARED_SPLIT_SEED, source=source, skipped=list(bundle.skipped_files),
            stats={"seconds": round(seconds, 3), "images": n_total, "images_per_sec": round(n_total / seconds, 1),
                   "bytes": total_bytes, "bytes_per_image": round(total_bytes / max(n_total, 1), 1)})
        with fs.open(f"{root}/{SHARD_INDEX}", "w") as fh:
            fh.write(index.to_json())
        if progress is not None:
            progress(n_total, n_total, n_total / max(seconds, 1e-9))
    return index


def _median_side(bundle: Any) -> int:
    """The crop rule's input (build_datasets): the eval resize-shorter side implies the images were larger."""
    pp = bundle.preprocess
    return int(pp["resize_shorter"]) + 1 if pp.get("resize_shorter") else int(pp["input_size"][0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.data.prepare", description=__doc__.split("\n")[0])
    p.add_argument("source", help="imagefolder: a folder, a .zip, or an fsspec URL of one")
    p.add_argument("out_url", help="where the shards and index.json go (a folder path or fsspec URL)")
    p.add_argument("--size", type=int, default=None, help="model input side in pixels (default: as a job's: 224 "
                   "for photos, the native side for small images)")
    p.add_argument("--color-mode", choices=("RGB", "L"), default="RGB")
    p.add_argument("--encoding", choices=ENCODING_CHOICES, default="auto")
    p.add_argument("--split", default=None, help="train,val,test fractions (default 0.7,0.2,0.1)")
    args = p.parse_args(argv)
    try:
        split = [float(v) for v in args.split.split(",")] if args.split else None
        if split is not None and (len(split) != 3 or abs(sum(split) - 1) > 1e-6 or min(split) < 0):
            raise DataError(f"--split {args.split!r}: give three fractions train,val,test summing to 1")
        index = prepare(args.source, args.out_url, size=args.size, color_mode=args.color_mode, split=split,
                        encoding=args.encoding,
                        progress=lambda d, t, r: print(f"\r{d}/{t} images, {r:.0f}/s", end="", file=sys.stderr))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    print(json.dumps({"url": args.out_url, "key": index.key, "encoding": index.encoding, **index.stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
