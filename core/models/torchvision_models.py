"""torchvision ImageNet classifiers, adapted to any class count, channel count and (small) input size.

Each is built with `weights=None`; when pretrained, the ImageNet weights come from the local torch hub cache only (see
`weights.load_cached_state_dict`). The adaptations happen after loading so the pretrained tensors are reused:
first conv for in_chans != 3, small-image stem, new final Linear.

torchvision is imported inside the factories: `import core.models` must stay cheap (config validation imports it).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from core.models.registry import register_model
from core.models.weights import IMAGENET_MEAN, IMAGENET_STD, load_cached_state_dict, load_into, replace_conv

IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)


def _build(name: str, weights_enum_name: str, pretrained: bool) -> nn.Module:
    """torchvision's `name` with 1000 classes; if pretrained, the enum's DEFAULT ImageNet weights from the hub cache."""
    import torchvision.models

    model = getattr(torchvision.models, name)(weights=None)
    if pretrained:
        weights: Any = getattr(torchvision.models, weights_enum_name).DEFAULT
        state = load_cached_state_dict(name, weights.url)
        load_into(model, state, name, weights.url)
    return model


def _resnet(name: str, weights_enum_name: str, *, num_classes: int, in_chans: int, pretrained: bool,
            small_input: bool, dropout: float, **_: Any) -> nn.Module:
    model = _build(name, weights_enum_name, pretrained)
    if small_input:
        # CIFAR-style stem: 3x3/1 conv and no max-pool, so a 32 px image is not cut to 8 px before the first block.
        model.conv1 = replace_conv(model.conv1, in_chans=in_chans, kernel_size=3, stride=1, padding=1,
                                   carry_weights=pretrained)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = replace_conv(model.conv1, in_chans=in_chans, carry_weights=pretrained)
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    model.head_name = "fc.1"
    return model


def _first_conv_stride1(features: nn.Sequential, *, in_chans: int, small_input: bool, pretrained: bool) -> None:
    """MobileNet/EfficientNet stem (`features[0][0]`, a 3x3/2 conv): adapt channels, stride 1 for small inputs."""
    stem = features[0][0]
    if in_chans != 3 or small_input:
        features[0][0] = replace_conv(stem, in_chans=in_chans, stride=1 if small_input else None,
                                      carry_weights=pretrained)


@register_model(normalization=IMAGENET)
def resnet18(**kwargs: Any) -> nn.Module:
    """ResNet-18 (11.2 M parameters at 10 classes); the usual CIFAR baseline with the small-image stem."""
    return _resnet("resnet18", "ResNet18_Weights", **kwargs)


@register_model(normalization=IMAGENET)
def resnet50(**kwargs: Any) -> nn.Module:
    """ResNet-50 (23.5 M parameters at 10 classes); pretrained = torchvision's IMAGENET1K_V2 weights."""
    return _resnet("resnet50", "ResNet50_Weights", **kwargs)


def _with_classifier(name: str, weights: str, head: int, *, num_classes: int, in_chans: int, pretrained: bool,
                     small_input: bool, dropout: float, **_: Any) -> nn.Module:
    """A model made of `features` and a `classifier` Sequential whose Linear `classifier[head]` is preceded by its
    Dropout: the stem adapted, the dropout set, the head replaced."""
    model = _build(name, weights, pretrained)
    _first_conv_stride1(model.features, in_chans=in_chans, small_input=small_input, pretrained=pretrained)
    model.classifier[head - 1].p = dropout
    model.classifier[head] = nn.Linear(model.classifier[head].in_features, num_classes)
    model.head_name = f"classifier.{head}"
    return model


@register_model(normalization=IMAGENET)
def mobilenet_v3_small(**kwargs: Any) -> nn.Module:
    """MobileNetV3-Small (1.5 M parameters at 10 classes). The head is the last Linear; the pretrained 576→1024
    Linear before it stays part of the backbone (it is ImageNet-trained feature extraction)."""
    return _with_classifier("mobilenet_v3_small", "MobileNet_V3_Small_Weights", 3, **kwargs)


@register_model(normalization=IMAGENET)
def efficientnet_b0(**kwargs: Any) -> nn.Module:
    """EfficientNet-B0 (4.0 M parameters at 10 classes), torchvision's port of the original (SiLU, SE blocks)."""
    return _with_classifier("efficientnet_b0", "EfficientNet_B0_Weights", 1, **kwargs)
