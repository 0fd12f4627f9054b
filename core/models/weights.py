"""Pretrained weights: offline loading from the torch hub cache, and adapting a pretrained first conv.

Nothing is ever downloaded at run time (workers may have no internet); a missing file is a ConfigError that says
which file to put where and where to fetch it from.
"""
from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from core.errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
"""Per-channel mean of ImageNet pixels in [0, 1]; what torchvision's pretrained weights expect."""
IMAGENET_STD = [0.229, 0.224, 0.225]
"""Per-channel std of ImageNet pixels in [0, 1]."""


def hub_checkpoint_path(url: str) -> Path:
    """Where torch.hub (and torchvision) caches the file at `url`: `$TORCH_HOME/hub/checkpoints/<file name>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def load_cached_state_dict(model_name: str, url: str) -> dict[str, Any]:
    """The state dict behind `url` from the local hub cache; ConfigError (with instructions) when it is not there."""
    path = hub_checkpoint_path(url)
    if not path.is_file():
        raise ConfigError.on(
            "model.pretrained", True,
            f"{model_name} needs its ImageNet weights file at {path}, which is missing; nothing is "
            f"downloaded at run time. On a machine with internet fetch {url} and copy it to that path (or set "
            f"TORCH_HOME to a folder whose hub/checkpoints/ holds it), or set model.pretrained: false."
        )
    return load_state_dict_file(model_name, path, url)


def load_state_dict_file(model_name: str, path: str | Path, url: str | None = None) -> dict[str, Any]:
    """torch.load a plain state dict safely (weights_only); an unreadable file is a ConfigError, not a crash."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:  # truncated, wrong file, ...
        again = f" and fetch {url} again" if url else ""
        raise ConfigError.on(
            "model.pretrained", True,
            f"{model_name} weights file {path} is unreadable ({err}); delete it{again}"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError.on("model.pretrained", True, f"{model_name} weights file {path} does not hold a state dict")
    return state


def load_into(model: nn.Module, state: dict[str, Any], model_name: str, path: str | Path) -> None:
    """Strict load: a key or shape mismatch means the file is for another architecture, so say so."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError.on("model.pretrained", True,
                             f"{path} does not match {model_name}: {str(err)[:500]}") from None


def adapt_in_chans_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Turn an RGB kernel [out, 3, k, k] into one for `in_chans` inputs, keeping the pretrained response.

    1 channel: the sum of the RGB kernels, exactly what the RGB conv computes on a grey image copied to R, G and B.
    Other counts: the RGB kernels tiled over the channels and scaled by 3 / in_chans (as timm does), so a constant
    input gives the same activation.
    """
    if in_chans == weight.shape[1]:
        return weight.clone()
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def _mass_preserving_resize_matrix(src: int, dst: int) -> torch.Tensor:
    """[dst, src] linear-interpolation weights whose columns sum to 1: each source tap hands all its weight on."""
    matrix = torch.zeros(dst, src)
    for a in range(src):
        t = (a + 0.5) * dst / src - 0.5  # source tap centre in target coordinates
        lo = math.floor(t)
        for idx, w in ((lo, 1.0 - (t - lo)), (lo + 1, t - lo)):
            matrix[min(max(idx, 0), dst - 1), a] += w
    return matrix


def resample_kernel(weight: torch.Tensor, size: int) -> torch.Tensor:
    """Shrink a kxk kernel to sizexsize, preserving its sum exactly (its response to a flat patch).

    Used when a small-image stem replaces ResNet's 7x7/2 conv by a 3x3/1 one: small images show objects at a smaller
    scale, so a shrunk copy of the pretrained kernel matches what the pretrained BatchNorm after it expects far
    better than a random kernel (which a frozen backbone could never fix).
    """
    rows = _mass_preserving_resize_matrix(weight.shape[-2], size).to(weight)
    cols = _mass_preserving_resize_matrix(weight.shape[-1], size).to(weight)
    return torch.einsum("ia,jb,ocab->ocij", rows, cols, weight)


def replace_conv(
    conv: nn.Conv2d, *, in_chans: int, kernel_size: int | None = None, stride: int | None = None,
    padding: int | None = None, carry_weights: bool = True,
) -> nn.Conv2d:
    """A copy of `conv` with another input-channel count / kernel / stride / padding.

    With `carry_weights` the (pretrained) weights are adapted and kept; without, the new conv gets torchvision's conv
    init (Kaiming normal, fan_out), the same as the rest of an untrained torchvision model.
    """
    k = kernel_size if kernel_size is not None else conv.kernel_size[0]
    new = nn.Conv2d(
        in_chans, conv.out_channels, kernel_size=k,
        stride=stride if stride is not None else conv.stride,
        padding=padding if padding is not None else conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
    )
    if not carry_weights:
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if new.bias is not None:
            nn.init.zeros_(new.bias)
        return new
    with torch.no_grad():
        weight = conv.weight
        if k != weight.shape[-1]:
            weight = resample_kernel(weight, k)
        new.weight.copy_(adapt_in_chans_weight(weight, in_chans))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new
