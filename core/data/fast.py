"""The tensor-cache data path: decode every image once into a uint8 tensor on the training device, then augment whole
batches with tensor ops.

Why: in the classic recipe (DataLoader + per-sample PIL transforms) the data path, not the model, is the bottleneck —
on 2 CPU cores it feeds SimpleCNN at under half the speed the model trains at; on a GPU the gap is far larger. The
batch augmentation here is equivalent to the `classic` preset: random crop with zero padding, horizontal flip,
ColorJitter(brightness=0.2, contrast=0.2) (applied in a random order per batch, like torchvision), normalise.

Chosen by `data.cache`: `on`, `off`, or `auto` (on when the cache fits in `data.cache_max_mb` and the augmentation is
`classic` or `none`; `strong` uses per-sample PIL ops and keeps the DataLoader). Under DDP each rank holds only its
own shard of the training set (a fixed seeded partition; each rank reshuffles its shard every epoch) and of val/test.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from core.config import Config
from core.data.loaders import LoaderKind, Loaders
from core.distributed import DistInfo

BRIGHTNESS = 0.2
"""ColorJitter brightness range: factor drawn from [1 - 0.2, 1 + 0.2] (the classic preset)."""
CONTRAST = 0.2
"""ColorJitter contrast range: factor drawn from [1 - 0.2, 1 + 0.2]."""


def cache_bytes(n_images: int, in_chans: int, size: tuple[int, int]) -> int:
    """uint8 bytes of a tensor cache: N × C × H × W (50,000 CIFAR images: 153.6 MB)."""
    return n_images * in_chans * size[0] * size[1]


def use_cache(cfg: Any, bundle: Any, world_size: int = 1) -> bool:
    if cfg.data.cache == "off" or not hasattr(bundle, "eval_uint8"):
        return False
    if cfg.data.cache == "on":
        return True
    if cfg.data.augment == "strong":
        return False
    size = tuple(bundle.preprocess["input_size"])
    n = len(bundle.train) + len(bundle.val) + len(bundle.test)
    return cache_bytes(n, bundle.in_chans, size) / world_size <= cfg.data.cache_max_mb * 2**20


GRAY_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights: the grey level whose mean the contrast jitter blends towards (as Pillow/torchvision)."""

def draw_classic_params(n: int, generator: torch.Generator, *, pad: int, hflip: bool, jitter: bool = True
                        ) -> dict[str, torch.Tensor]:
    """The random parameters of n augmented images, drawn on the CPU from `generator` (device-independent, so a run
    augments identically on CPU and GPU): crop offsets, flips, brightness and contrast factors."""
    params = {
        "oy": torch.randint(0, 2 * pad + 1, (n,), generator=generator),
        "ox": torch.randint(0, 2 * pad + 1, (n,), generator=generator),
        "flip": torch.rand(n, generator=generator) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool),
    }
    if jitter:
        params["brightness"] = 1 + (torch.rand(n, generator=generator) * 2 - 1) * BRIGHTNESS
        params["contrast"] = 1 + (torch.rand(n, generator=generator) * 2 - 1) * CONTRAST
    return params


def crop_flip(x_u8: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, pad: int
              ) -> torch.Tensor:
    """Per-sample random crop with zero padding `pad`, then horizontal flip, of the uint8 pixels (NCHW contiguous
    out).

    Output column j of a flipped sample is padded column ox + (W - 1 - j): crop-then-flip, like the PIL preset.
    On the CPU each image is one slice copy with its padding zeroed around it; on a GPU one `gather` over the
    flattened padded image does the batch in one kernel. (Measured on 2 CPU cores, 64 images at 224 px: the copies
    9,600-10,800 images/s, the gather 5,300-6,600; per-image torch slices were slower than both.) `x_u8` may be a
    strided view (the shard loader's centre crop).
    """
    if pad <= 0 and not bool(flip.any()):
        return x_u8.contiguous()
    if x_u8.device.type == "cpu":
        return _crop_flip_copies(x_u8, oy, ox, flip, pad)
    return _crop_flip_gather(x_u8, oy, ox, flip, pad)


def _crop_flip_gather(x_u8: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, pad: int
                      ) -> torch.Tensor:
    """crop_flip on a GPU: one gather over the flattened padded batch (index broadcast over the channels)."""
    b, c, h, w = x_u8.shape
    device = x_u8.device
    padded = F.pad(x_u8, (pad, pad, pad, pad)) if pad > 0 else x_u8.contiguous()
    hp, wp = h + 2 * pad, w + 2 * pad
    ar_w = torch.arange(w, device=device)
    rows = oy[:, None] + torch.arange(h, device=device)  # [B, H]
    cols = ox[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # [B, W]
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, flat).view(b, c, h, w)


def _crop_flip_copies(x_u8: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, pad: int
                      ) -> torch.Tensor:
    """crop_flip on the CPU: per image, the part of the source inside its crop window is copied to where it lands,
    and only the padding strips around it are zeroed, on one thread. (Sharing the images among torch's threads, as
    numpy releases the GIL, was slower: 64 uint8 images at 224 px took 7.1 ms on 2 threads against 3.9 on one, the
    threads waiting on the GIL between copies of 20 us.)"""
    b, c, h, w = x_u8.shape
    src = x_u8.numpy()
    # a flipped crop is the crop of the flipped image at the mirrored offset 2·pad - ox: every copy then runs forwards
    # (numpy's reversed copies are 4x slower; torch.flip of the whole batch is one vectorised pass)
    mirrored = torch.flip(x_u8, (3,)).numpy() if bool(flip.any()) else src
    out = torch.empty((b, c, h, w), dtype=torch.uint8)
    dst = out.numpy()

    for i, y0, x0, flipped in zip(range(b), oy.tolist(), ox.tolist(), flip.tolist(), strict=True):
        if flipped:
            x0 = 2 * pad - x0
        dy, dx = y0 - pad, x0 - pad  # source pixel (r, q) lands at (r - dy, q - dx)
        sy0, sy1, sx0, sx1 = max(0, dy), min(h, h + dy), max(0, dx), min(w, w + dx)
        if sy0 >= sy1 or sx0 >= sx1:  # a crop wholly inside the padding (pad wider than the image)
            dst[i] = 0
            continue
        ty0, ty1, tx0, tx1 = sy0 - dy, sy1 - dy, sx0 - dx, sx1 - dx
        img = dst[i]
        img[:, :ty0] = 0
        img[:, ty1:] = 0
        img[:, ty0:ty1, :tx0] = 0
        img[:, ty0:ty1, tx1:] = 0
        img[:, ty0:ty1, tx0:tx1] = (mirrored if flipped else src)[i, :, sy0:sy1, sx0:sx1]
    return out


def _grey_mean(x: torch.Tensor) -> torch.Tensor:
    """[B] mean grey level of each image: the ITU-R 601-2 luma of its channel means (Pillow's, torchvision's)."""
    channel_means = x.mean(dim=(2, 3))  # [B, C]
    if x.shape[1] == 3:
        return (channel_means * torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device)).sum(1)
    return channel_means[:, 0]


def _clamp_(x: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float) -> torch.Tensor:
    """x clamped to [low, high] in place (floats, or one bound per channel as [1, C, 1, 1]).

    On the CPU a per-channel bound is one scalar clamp_ per channel: PyTorch's CPU kernels vectorise an op with one
    operand broadcast over the pixels but fall back to a scalar loop for two (addcmul with per-image scale and shift
    ran at a fifth of the speed of mul_ then add_ here)."""
    if not isinstance(low, torch.Tensor) or x.device.type != "cpu":  # per-channel floats would sync with a GPU
        return x.clamp_(low, high)
    for ch, (lo, hi) in enumerate(zip(low.flatten().tolist(), high.flatten().tolist(), strict=True)):
        x[:, ch].clamp_(lo, hi)
    return x


CPU_CHUNK_BYTES = 10 * 2**20
"""Float bytes of a batch the CPU converts and augments at a time, so that its passes run in the caches (L3 32 MB
on the 2-core EPYC here): 64 images at 224 px, 38.5 MB of floats, go in groups of 17. Measured there (64 images,
paired with the whole batch at once): groups of 8 images 1.74x, 16 1.90x, 32 1.66x."""


def float_batch(x_u8: torch.Tensor) -> tuple[torch.Tensor, list[slice]]:
    """An empty float batch of x_u8's shape and the parts to convert and transform it in, one after the other: groups
    of CPU_CHUNK_BYTES on the CPU, so that a part's passes run in the caches; the whole batch on a GPU (one kernel
    per pass)."""
    out = torch.empty(x_u8.shape, dtype=torch.float32, device=x_u8.device)
    n = x_u8.shape[0]
    image_bytes = out[:1].numel() * out.element_size()
    step = max(1, CPU_CHUNK_BYTES // max(1, image_bytes)) if out.device.type == "cpu" else max(1, n)
    return out, [slice(lo, lo + step) for lo in range(0, n, step)]


def normalise(x_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x / 255 - mean) / std as floats (mean, std: [1, C, 1, 1]): a conversion and two vectorised passes."""
    out, parts = float_batch(x_u8)
    scale, shift = 1 / (255 * std), mean / std
    for part in parts:
        out[part].copy_(x_u8[part]).mul_(scale).sub_(shift)
    return out


def classic_augment(x_u8: torch.Tensor, generator: torch.Generator, *, pad: int, hflip: bool,
                    jitter: bool = True, params: dict[str, torch.Tensor] | None = None,
                    brightness_first: bool | None = None,
                    normalize: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Random crop (zero padding `pad`) + optional horizontal flip + brightness/contrast jitter; returns floats in
    [0, 1], or normalised ((x - mean) / std, `normalize` = (mean, std) as [1, C, 1, 1]) when given.

    `params` (from draw_classic_params, already on x's device) and `brightness_first` are drawn from `generator` when
    not given; the loader draws a whole epoch's parameters at once, so no batch waits on a host-to-device copy.

    ColorJitter(brightness, contrast) on floats in [0, 1] is x·b, and the blend with the mean grey level
    (x·c + mean·(1 - c)), each clamped to [0, 1], in the given order (torchvision draws the order per call). Every
    step is an affine map per image and channel followed by a clamp, and they compose on the cropped pixels u (0-255,
    as floats): brightness first, clamp(u·b/255, 0, 1) is min(u, 255/b)·b/255, so one minimum on the pixels takes
    its clamp and the rest is one affine map clamped to the normalisation's bounds ((0 - mean) / std, (1 - mean) /
    std); contrast first, its clamp to [0, 1] scaled by b becomes [0, min(b, 1)], one bound per image and channel
    after the one affine map. A conversion and five passes over the floats (a minimum, the grey mean, multiply, add,
    clamp) where the steps one by one take ten, on the CPU part by part (float_batch) so that they run in the caches;
    the same values up to float rounding (tests/test_fast_path.py compares with torchvision).
    """
    if params is None:
        params = {k: v.to(x_u8.device) for k, v in
                  draw_classic_params(x_u8.shape[0], generator, pad=pad, hflip=hflip, jitter=jitter).items()}
    x_u8 = crop_flip(x_u8, params["oy"], params["ox"], params["flip"], pad)  # the pixels, 0-255
    dev = x_u8.device
    mean, std = normalize if normalize is not None else (torch.zeros((), device=dev), torch.ones((), device=dev))
    low, high = (-mean / std, (1 - mean) / std) if normalize is not None else (0.0, 1.0)
    if not (jitter and "brightness" in params):
        return normalise(x_u8, mean, std)
    if brightness_first is None:
        brightness_first = bool(torch.rand(1, generator=generator) < 0.5)
    bright = params["brightness"].view(-1, 1, 1, 1)
    contr = params["contrast"].view(-1, 1, 1, 1)
    scale = bright * contr / (255 * std)
    # brightness first: clamp(u·b/255, 0, 1) = min(u, 255/b)·b/255 (u ≥ 0, b > 0), then the contrast blend;
    # contrast first: the blend's clamp to [0, 1], then ·b: its upper bound becomes min(b, 1), its lower one stays 0
    bound = 255 / bright if brightness_first else (bright.clamp(max=1) - mean) / std
    out, parts = float_batch(x_u8)
    for part in parts:
        x = out[part].copy_(x_u8[part])
        if brightness_first:
            torch.minimum(x, bound[part], out=x)
            grey = _grey_mean(x).view(-1, 1, 1, 1) * (bright[part] / 255)
            x.mul_(scale[part]).add_((grey * (1 - contr[part]) - mean) / std)
        else:
            grey = _grey_mean(x).view(-1, 1, 1, 1) / 255
            x.mul_(scale[part]).add_((grey * (1 - contr[part]) * bright[part] - mean) / std)
            torch.minimum(x, bound[part], out=x)
        _clamp_(x, low, high)
    return out


class EpochBatches:
    """What every in-memory batch loader here shares: `labels`, `batch_size`, `drop_last` and a seeded `epoch`
    (DistributedSampler's `set_epoch` contract)."""

    labels: torch.Tensor
    batch_size: int
    drop_last: bool
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class TensorBatchLoader(EpochBatches):
    """Iterates (normalised float batch, labels) from a uint8 cache held on the device; no worker processes.

    Per epoch, the sample order and every augmentation parameter are drawn at once on the CPU from a generator seeded
    by (seed, epoch, rank) and copied to the device in one transfer; a batch is then a few kernels on the device.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, mean: list[float],
                 std: list[float], train: bool, augment: str = "none", hflip: bool = True, drop_last: bool = False,
                 seed: int = 0, rank: int = 0) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.train, self.augment, self.hflip = batch_size, train, augment, hflip
        self.drop_last, self.seed, self.rank = drop_last, seed, rank
        dev = images.device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        self.pad = max(1, images.shape[-1] // 8)
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = epoch_generator(self.seed, self.epoch, self.rank)
        order = torch.randperm(len(self.labels), generator=gen) if self.train else None
        return self._batches(gen, order, augment=self.train and self.augment == "classic")

    def ordered_pass(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every sample once, in stored order, with the train augmentation drawn from a generator seeded by `seed`:
        one augmented *view* of the split (the feature cache embeds a few of them)."""
        gen = torch.Generator().manual_seed(seed)
        steps = -(-len(self.labels) // self.batch_size)
        return self._batches(gen, None, augment=self.augment == "classic", steps=steps)

    def _batches(self, gen: torch.Generator, order: torch.Tensor | None, *, augment: bool, steps: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, dev = len(self.labels), self.images.device
        steps = len(self) if steps is None else steps
        if augment:
            params = draw_classic_params(n, gen, pad=self.pad, hflip=self.hflip)
            brightness_first = (torch.rand(steps, generator=gen) < 0.5).tolist()  # one jitter order per batch
        if order is not None:  # a few host-to-device copies per epoch, none per batch
            order = order.to(dev)
        if augment:
            params = {k: v.to(dev) for k, v in params.items()}
        for i in range(steps):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
            idx = order[sl] if order is not None else None
            x_u8 = self.images[idx] if idx is not None else self.images[sl]
            y = self.labels[idx] if idx is not None else self.labels[sl]
            if augment:
                batch_params = {k: v[sl] for k, v in params.items()}
                yield classic_augment(x_u8, gen, pad=self.pad, hflip=self.hflip, params=batch_params,
                                      brightness_first=brightness_first[i], normalize=(self.mean, self.std)), y
            else:
                yield normalise(x_u8, self.mean, self.std), y


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The CPU generator of one epoch's order and augmentation on one rank (resumes reproduce it)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + rank)


def train_partition(n: int, rank: int, world_size: int, seed: int) -> list[int]:
    """This rank's positions in a train split of n samples: a fixed seeded partition into equal shards (every rank
    takes the same number of steps; up to world_size - 1 samples are left out), sorted."""
    if world_size <= 1:
        return list(range(n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_per_rank = n // world_size
    return perm[rank * n_per_rank:(rank + 1) * n_per_rank].sort().values.tolist()


def make_fast_loaders(cfg: Config, bundle: Any, info: DistInfo, device: torch.device) -> Loaders:
    """The tensor-cache loaders (the caller checked `use_cache`): each rank's shard of every split on the device."""
    mean, std = bundle.preprocess["mean"], bundle.preprocess["std"]
    eval_bs = cfg.train.eval_batch(device.type)

    def shard(split: str, partition_seed: int | None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        images, labels = bundle.eval_uint8(split)
        n = len(labels)
        if partition_seed is not None:
            idx = train_partition(n, info.rank, info.world_size, partition_seed)
        else:
            idx = list(range(info.rank, n, info.world_size))
        index = torch.tensor(idx, dtype=torch.long)
        return images[index].contiguous().to(device), labels[index].to(device), idx

    def eval_loader(split: str) -> tuple[TensorBatchLoader, list[int]]:
        x, y, idx = shard(split, None)
        return TensorBatchLoader(x, y, batch_size=eval_bs, mean=mean, std=std, train=False), idx

    x_tr, y_tr, _ = shard("train", cfg.train.seed)
    drop_last = len(y_tr) > cfg.train.batch_size
    train = TensorBatchLoader(x_tr, y_tr, batch_size=cfg.train.batch_size, mean=mean, std=std, train=True,
                              augment=cfg.data.augment, hflip=cfg.data.hflip, drop_last=drop_last,
                              seed=cfg.train.seed, rank=info.rank)
    (val, val_idx), (test, test_idx) = eval_loader("val"), eval_loader("test")
    return Loaders(LoaderKind.TENSOR_CACHE, train, val, val_idx, test, test_idx)
