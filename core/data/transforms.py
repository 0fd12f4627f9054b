"""Eval geometry and the augmentation presets (`create_transform`).

Every transform starts from a PIL image in any mode and ends with a normalised float tensor C×H×W. The eval path is
exactly what `preprocess.json` describes, so a client with only Pillow and numpy reproduces it:

1. ``img = img.convert(color_mode)`` ("RGB" or "L"; a palette image with transparency goes through "RGBA" first,
   which gives the same pixels).
2. If ``resize_shorter`` is null: ``img = img.resize((W, H), Image.BILINEAR)`` with ``[H, W] = input_size``.
   Otherwise scale the shorter side to ``resize_shorter`` keeping the aspect ratio — the longer side becomes
   ``int(resize_shorter * long / short)`` (truncated) — with ``Image.BILINEAR``, then centre-crop ``center_crop``
   ``[h, w]`` at ``top = round((H' - h) / 2)``, ``left = round((W' - w) / 2)`` (Python's round, halves to even).
   A resize to the size the image already has is skipped (Pillow would return a copy anyway).
3. ``x = np.asarray(img, np.float32) / 255``; ``x = (x - mean) / std`` per channel; HWC → CHW.

Here these steps are `torchvision.transforms.functional.resize(img, [H, W] or [resize_shorter], BILINEAR)` and
`center_crop(img, [h, w])` on PIL images, then `to_tensor` and `normalize` — the same Pillow calls underneath.
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from core.config import Config, choices
from core.data.defaults import CENTER_CROP_MIN_SIZE, CROP_RATIO

AUGMENTS = choices(Config, "data.augment")
"""The augmentation presets, as core/config.py's `data.augment` declares them."""


def channels(color_mode: str) -> int:
    """Channels of an image in `color_mode`: 1 for "L", 3 for "RGB" (the model's `in_chans`)."""
    return 1 if color_mode == "L" else 3


def to_color_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert to "RGB" or "L"; palette images with transparency pass through RGBA to avoid Pillow's warning."""
    if img.mode == mode:
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert(mode)


def eval_geometry(input_size: int, *, resize_shorter_to_crop: bool) -> dict[str, Any]:
    """The geometry keys of preprocess.json for a square input: either a straight resize or resize-shorter + crop."""
    if resize_shorter_to_crop and input_size >= CENTER_CROP_MIN_SIZE:
        return {"input_size": [input_size, input_size], "resize_shorter": round(input_size / CROP_RATIO),
                "center_crop": [input_size, input_size]}
    return {"input_size": [input_size, input_size], "resize_shorter": None, "center_crop": None}


class ToColorMode:
    """Picklable transform: PIL image of any mode → `mode` ("RGB" or "L")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_color_mode(img, self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


class EvalGeometry:
    """Picklable transform applying preprocess.json's resize / centre crop to a PIL image (see the module docstring)."""

    def __init__(self, *, input_size: list[int], resize_shorter: int | None, center_crop: list[int] | None) -> None:
        self.input_size = [int(v) for v in input_size]
        self.resize_shorter = resize_shorter
        self.center_crop = center_crop

    @classmethod
    def from_preprocess(cls, preprocess: dict[str, Any]) -> EvalGeometry:
        return cls(input_size=preprocess["input_size"], resize_shorter=preprocess.get("resize_shorter"),
                   center_crop=preprocess.get("center_crop"))

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.resize_shorter:
            img = TF.resize(img, [int(self.resize_shorter)], interpolation=InterpolationMode.BILINEAR)
            crop = self.center_crop or self.input_size
            return TF.center_crop(img, [int(crop[0]), int(crop[1])])
        return TF.resize(img, self.input_size, interpolation=InterpolationMode.BILINEAR)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_size={self.input_size}, resize_shorter={self.resize_shorter}, "
                f"center_crop={self.center_crop})")


def _tail(preprocess: dict[str, Any]) -> list[Any]:
    return [T.ToTensor(), T.Normalize(mean=list(preprocess["mean"]), std=list(preprocess["std"]))]


class ClassificationPresetEval:
    """Colour mode → eval geometry → tensor → normalise: what evaluation, export parity and predict.py all do."""

    def __init__(self, *, preprocess: dict[str, Any]) -> None:
        self.transforms = T.Compose([ToColorMode(preprocess["color_mode"]), EvalGeometry.from_preprocess(preprocess),
                                     *_tail(preprocess)])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transforms(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


class ClassificationPresetTrain:
    """Training augmentation on top of the eval geometry.

    classic: random crop with zero padding of side//8, horizontal flip, brightness/contrast jitter 0.2 — the recipe
    small-image papers use. strong: TrivialAugmentWide plus RandomResizedCrop from the original image for inputs of
    at least 96 px (where a crop of a photo is still a photo), else the classic padded crop.
    """

    def __init__(self, *, preprocess: dict[str, Any], augment: str, hflip: bool = True) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"unknown augment {augment!r}; choose from {', '.join(AUGMENTS)}")
        height, width = (int(v) for v in preprocess["input_size"])
        padding = max(1, min(height, width) // 8)
        steps: list[Any] = [ToColorMode(preprocess["color_mode"])]
        if augment == "strong" and min(height, width) >= CENTER_CROP_MIN_SIZE:
            steps.append(T.RandomResizedCrop((height, width), interpolation=InterpolationMode.BILINEAR))
        else:
            steps.append(EvalGeometry.from_preprocess(preprocess))
            if augment != "none":
                steps.append(T.RandomCrop((height, width), padding=padding, fill=0, padding_mode="constant"))
        if augment != "none" and hflip:
            steps.append(T.RandomHorizontalFlip())
        if augment == "classic":
            steps.append(T.ColorJitter(brightness=0.2, contrast=0.2))
        elif augment == "strong":
            steps.append(T.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
        self.transforms = T.Compose(steps + _tail(preprocess))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transforms(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


def create_transform(preprocess: dict[str, Any], augment: str = "none", train: bool = False,
                     hflip: bool = True) -> ClassificationPresetTrain | ClassificationPresetEval:
    """The transform for one split: train=True applies `augment` ("classic", "none", "strong"), else the eval path.

    `preprocess` is the DataBundle's preprocess dict (or a loaded preprocess.json). Torchvision's random transforms
    draw from torch's RNG, which DataLoader seeds per worker, so augmentation is reproducible under a fixed seed.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose from {', '.join(AUGMENTS)}")
    if train and augment != "none":
        return ClassificationPresetTrain(preprocess=preprocess, augment=augment, hflip=hflip)
    return ClassificationPresetEval(preprocess=preprocess)
