"""Training from a prepared form (core/data/shards.py): the bundle's splits read from shards, and the `shards` loader.

The loader is the tensor cache's kind (core/data/fast.py): uint8 batches moved to the training device and augmented
there as whole batches with fast.py's `classic_augment`, normalised, no worker processes. What differs is where the
uint8 comes from: shards streamed through the local shard cache (core/data/shard_cache.py), a few in memory at once,
so memory does not grow with the dataset.

Order of an epoch (the same on every rank, from (train.seed, epoch) only, so a resumed run reproduces an
uninterrupted one at epoch boundaries): the split's shards in a seeded random order, cut into windows of
SHUFFLE_WINDOW_SHARDS shards whose samples are shuffled together; that stream is cut into world_size equal
contiguous parts (up to world_size - 1 samples are left out, as the tensor cache's partition does) and rank r reads
part r: every sample at most once per epoch across ranks, and each rank fetches mostly its own shards. Evaluation
reads each rank's contiguous block of the split in stored order.

A background thread fetches the shards of the coming windows ahead of use; another assembles the next uint8 batches.
"""
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.data.defaults import IMAGENET_MEAN, IMAGENET_STD, SHUFFLE_WINDOW_SHARDS
from core.data.fast import (
    EpochBatches,
    classic_augment,
    draw_classic_params,
    epoch_generator,
    normalise,
)
from core.data.loaders import LoaderKind, Loaders
from core.data.shard_cache import ShardCache
from core.data.shards import LoadedShard, PreparedIndex, SplitShards, read_index
from core.errors import DataError

PREFETCH_BATCHES = 3
"""Assembled uint8 batches waiting for the training loop."""


class ShardReader:
    """One split of a form: shards loaded from the local cache into memory, the most recent few kept (LRU)."""

    def __init__(self, url: str, index: PreparedIndex, split: SplitShards, cache: ShardCache,
                 keep: int = SHUFFLE_WINDOW_SHARDS + 1) -> None:
        self.url, self.index, self.split, self.cache, self.keep = url, index, split, cache, keep
        self._loaded: OrderedDict[int, LoadedShard] = OrderedDict()
        self._lock = threading.Lock()

    def fetch(self, k: int) -> None:
        """Make shard k local (the prefetch thread calls this ahead of `shard`)."""
        self.cache.get(self.url, self.split.shards[k])

    def shard(self, k: int) -> LoadedShard:
        with self._lock:
            if k in self._loaded:
                self._loaded.move_to_end(k)
                return self._loaded[k]
        info = self.split.shards[k]
        path = self.cache.get(self.url, info)
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except FileNotFoundError:  # evicted by another process between get and read: fetch again
            data = np.fromfile(self.cache.get(self.url, info), dtype=np.uint8)
        loaded = LoadedShard(data, info, self.index)
        with self._lock:
            self._loaded[k] = loaded
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
        return loaded

    def gather(self, positions: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 N×C×S×S of the given positions (of this split)."""
        starts = np.asarray([s.first for s in self.split.shards])
        which = np.searchsorted(starts, positions, side="right") - 1
        c, s = self.index.channels, self.index.stored_size
        out = np.empty((len(positions), c, s, s), dtype=np.uint8) if out is None else out
        for k in dict.fromkeys(which.tolist()):  # each shard once, in first-use order
            shard = self.shard(k)
            for j in np.flatnonzero(which == k):
                out[j] = shard.raw(int(positions[j]))
        return out


class ShardSource:
    """An ImageSource over one split's shards (ImageDataset's `source`): `load(i)` is the stored S×S image, which the
    eval geometry turns into exactly the eval image (core/data/shards.py). `eval_uint8` reads the split shard by
    shard for DataBundle.eval_uint8 (the tensor cache over a prepared form)."""

    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader.split)

    def load(self, i: int) -> Image.Image:
        return self.reader.shard(self.reader.split.shard_of(i)).image(i)

    def eval_uint8(self, indices: np.ndarray, preprocess: dict[str, Any]) -> np.ndarray:
        return center_crop(self.reader.gather(np.asarray(indices)), preprocess["input_size"])


def center_crop(x: np.ndarray | torch.Tensor, size: list[int]) -> Any:
    """The centre `size` crop of N×C×S×S stored images (EvalGeometry's crop offsets: round((S - h) / 2))."""
    h, w = int(size[0]), int(size[1])
    top, left = round((x.shape[-2] - h) / 2), round((x.shape[-1] - w) / 2)
    return x[..., top:top + h, left:left + w]


# --------------------------------------------------------------------------------------------------- the bundle
def prepared_parts(cfg: Any) -> dict[str, Any]:
    """build_datasets' parts of an imagefolder from its prepared form at `data.prepared` (no source scan)."""
    url = cfg.data.prepared
    index = read_index(url)
    if cfg.data.image_size and cfg.data.image_size != index.input_size:
        raise DataError(f"data.image_size={cfg.data.image_size} but the prepared form at {url} is for "
                        f"{index.input_size} px; prepare one for {cfg.data.image_size} or drop data.prepared")
    if cfg.data.color_mode != index.color_mode:
        raise DataError(f"data.color_mode={cfg.data.color_mode} but the prepared form at {url} is "
                        f"{index.color_mode}")
    cache = ShardCache()
    sources = {s: ShardSource(ShardReader(url, index, sp, cache)) for s, sp in index.splits.items()}
    return {"classes": list(index.classes), "sources": sources,
            "indices": {s: np.arange(len(sp)) for s, sp in index.splits.items()},
            "labels": {s: np.asarray(sp.labels, dtype=np.int64) for s, sp in index.splits.items()},
            "ids": {s: list(sp.ids) for s, sp in index.splits.items()},
            "native_size": index.input_size, "median_side": index.median_side,
            "constant_stats": (IMAGENET_MEAN, IMAGENET_STD), "skipped": list(index.skipped)}


# --------------------------------------------------------------------------------------------------- the loader
def epoch_stream(split: SplitShards, seed: int, epoch: int, window: int = SHUFFLE_WINDOW_SHARDS) -> np.ndarray:
    """Every position of the split once, in this epoch's order (module docstring); identical on every rank."""
    gen = epoch_generator(seed, epoch, 0)
    order = torch.randperm(len(split.shards), generator=gen).tolist()
    parts = []
    for w in range(0, len(order), window):
        positions = np.concatenate([np.arange(split.shards[k].first, split.shards[k].first + split.shards[k].count)
                                    for k in order[w:w + window]])
        parts.append(positions[torch.randperm(len(positions), generator=gen).numpy()])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class ShardBatchLoader(EpochBatches):
    """(normalised float batch, labels) streamed from shards; see the module docstring for the order."""

    def __init__(self, reader: ShardReader, *, batch_size: int, mean: list[float], std: list[float], train: bool,
                 device: torch.device, input_size: list[int], augment: str = "none", hflip: bool = True,
                 drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.reader, self.batch_size, self.train, self.augment, self.hflip = reader, batch_size, train, augment, hflip
        self.drop_last, self.seed, self.rank, self.world_size, self.device = drop_last, seed, rank, world_size, device
        self.input_size = [int(v) for v in input_size]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.pad = max(1, self.input_size[-1] // 8)
        self.epoch = 0
        n = len(reader.split)
        if train:
            self.per_rank = n // world_size if world_size > 1 else n
            self.positions = None  # drawn per epoch
        else:
            lo, hi = n * rank // world_size, n * (rank + 1) // world_size
            self.positions = np.arange(lo, hi)
            self.per_rank = hi - lo
        labels = np.asarray(reader.split.labels, dtype=np.int64)
        self.labels = torch.from_numpy(labels[self.positions] if self.positions is not None else labels[:self.per_rank])
        self._all_labels = torch.from_numpy(labels)

    @property
    def idx(self) -> list[int]:
        """Evaluation: the split positions this rank predicts (train.gather_predictions puts them back in order)."""
        return [] if self.positions is None else self.positions.tolist()

    def epoch_positions(self) -> np.ndarray:
        if self.positions is not None:
            return self.positions
        stream = epoch_stream(self.reader.split, self.seed, self.epoch)
        return stream[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = epoch_generator(self.seed, self.epoch, self.rank)
        return self._batches(self.epoch_positions(), gen, augment=self.train and self.augment == "classic")

    def uint8_batches(self) -> Iterator[torch.Tensor]:
        """This epoch's uint8 N×C×S×S batches as the assembly thread hands them over, before the device: the whole
        CPU side of the path when the device is a GPU (tests/bench/shards.py measures it)."""
        positions = self.epoch_positions()
        return self._prefetched([positions[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))])

    def ordered_pass(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's block of the split once, in stored order, with the train augmentation drawn from a generator
        seeded by `seed`: one augmented view (the feature cache embeds a few; TensorBatchLoader.ordered_pass)."""
        n = len(self.reader.split)
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        return self._batches(np.arange(lo, hi), torch.Generator().manual_seed(seed),
                             augment=self.augment == "classic", keep_last=True)

    def _batches(self, positions: np.ndarray, gen: torch.Generator, *, augment: bool, keep_last: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n_batches = -(-len(positions) // self.batch_size)
        steps = n_batches if keep_last else min(len(self), n_batches)
        batches = [positions[i * self.batch_size:(i + 1) * self.batch_size] for i in range(steps)]
        if augment:  # the whole pass's parameters at once, as the tensor cache draws them
            params = draw_classic_params(len(positions), gen, pad=self.pad, hflip=self.hflip)
            brightness_first = (torch.rand(steps, generator=gen) < 0.5).tolist()
            params = {k: v.to(self.device) for k, v in params.items()}
        for i, x_u8 in enumerate(self._prefetched(batches)):
            y = self._all_labels[batches[i]].to(self.device, non_blocking=True)
            x_u8 = center_crop(x_u8.to(self.device, non_blocking=True), self.input_size)
            if augment:
                sl = slice(i * self.batch_size, i * self.batch_size + len(batches[i]))
                yield classic_augment(x_u8, gen, pad=self.pad, hflip=self.hflip,
                                      params={k: v[sl] for k, v in params.items()},
                                      brightness_first=brightness_first[i], normalize=(self.mean, self.std)), y
            else:
                yield normalise(x_u8, self.mean, self.std), y

    def _prefetched(self, batches: list[np.ndarray]) -> Iterator[torch.Tensor]:
        """uint8 batches assembled by a background thread while another makes the coming shards local."""
        reader = self.reader
        out: queue.Queue = queue.Queue(PREFETCH_BATCHES)
        stop = threading.Event()
        shard_order = list(dict.fromkeys(
            (np.searchsorted([s.first for s in reader.split.shards], np.concatenate(batches), side="right") - 1
             ).tolist())) if batches else []

        def fetch_ahead() -> None:
            try:
                for k in shard_order:
                    if stop.is_set():
                        return
                    reader.fetch(k)
            except Exception:  # noqa: BLE001 — the assembling thread meets the same error and reports it
                return

        def assemble() -> None:
            try:
                for b in batches:
                    if stop.is_set():
                        return
                    x = torch.from_numpy(reader.gather(b))
                    if self.device.type == "cuda":
                        x = x.pin_memory()
                    out.put(x)
                out.put(None)
            except BaseException as err:  # noqa: BLE001 — handed to the training thread, raised there
                out.put(err)

        threads = [threading.Thread(target=fetch_ahead, daemon=True, name="shard-fetch"),
                   threading.Thread(target=assemble, daemon=True, name="shard-batches")]
        for t in threads:
            t.start()
        try:
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while not out.empty():
                out.get_nowait()


def use_shards(cfg: Any, bundle: Any) -> bool:
    """The bundle comes from a prepared form (data.prepared) and the tensor cache is not chosen for it."""
    from core.data.fast import use_cache

    return bool(getattr(cfg.data, "prepared", None)) and isinstance(bundle.train.source, ShardSource) \
        and not use_cache(cfg, bundle)


def make_shard_loaders(cfg: Any, bundle: Any, info: Any, device: torch.device) -> Loaders:
    """The `shards` loaders: train streamed with batch augmentation on the device, val/test in stored order."""
    mean, std = bundle.preprocess["mean"], bundle.preprocess["std"]
    size = bundle.preprocess["input_size"]
    n_train = len(bundle.train) // max(info.world_size, 1)
    train = ShardBatchLoader(bundle.train.source.reader, batch_size=cfg.train.batch_size, mean=mean, std=std,
                             train=True, device=device, input_size=size, augment=cfg.data.augment,
                             hflip=cfg.data.hflip, drop_last=n_train > cfg.train.batch_size, seed=cfg.train.seed,
                             rank=info.rank, world_size=info.world_size)
    eval_bs = cfg.train.eval_batch(device.type)
    val, test = (ShardBatchLoader(bundle.dataset(split).source.reader, batch_size=eval_bs, mean=mean, std=std,
                                  train=False, device=device, input_size=size, rank=info.rank,
                                  world_size=info.world_size) for split in ("val", "test"))
    return Loaders(LoaderKind.SHARDS, train, val, val.idx, test, test.idx)
