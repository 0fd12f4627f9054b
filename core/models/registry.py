"""The model registry: `@register_model` factories fill it, `create_model` is the one way to build a model.

Kept free of torchvision imports so that `list_models()` (called by config validation) stays cheap.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from core.errors import ConfigError

SMALL_INPUT_MAX_SIZE = 64
"""Inputs of at most this many pixels a side get the small-image stem when `small_input` is None (auto)."""

Normalization = tuple[list[float], list[float]]
ModelFactory = Callable[..., nn.Module]

_MODELS: dict[str, ModelFactory] = {}
_NORMALIZATION: dict[str, Normalization | None] = {}
_HAS_PRETRAINED: dict[str, bool] = {}


def register_model(
    fn: ModelFactory | None = None, *, normalization: Normalization | None = None
) -> ModelFactory | Callable[[ModelFactory], ModelFactory]:
    """Register a factory under its function name.

    Usable bare (`@register_model`) for models without pretrained weights, or as
    `@register_model(normalization=(mean, std))` for models whose pretrained weights expect that input normalisation;
    the normalisation is how the data pipeline learns what the weights were trained on.

    A factory is called with keyword arguments `num_classes, in_chans, pretrained, image_size, small_input (a bool,
    already resolved), dropout` and must return a module with a `head_name` attribute naming its final `nn.Linear`.
    """

    def decorate(factory: ModelFactory) -> ModelFactory:
        name = factory.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = factory
        _NORMALIZATION[name] = normalization
        _HAS_PRETRAINED[name] = normalization is not None
        return factory

    return decorate(fn) if fn is not None else decorate


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise ConfigError.on("model.name", name, f"unknown model {name!r}; choose from {', '.join(list_models())}")


def has_pretrained(name: str) -> bool:
    """Whether `create_model(name, ..., pretrained=True)` is supported (weights may still need to be fetched)."""
    _check_name(name)
    return _HAS_PRETRAINED[name]


def pretrained_normalization(name: str, in_chans: int = 3) -> Normalization | None:
    """Mean/std (per channel, for pixels scaled to [0, 1]) that the model's pretrained weights expect, or None.

    None means the model has no pretrained weights and any normalisation (e.g. the dataset's own statistics) will do.
    With `in_chans=1` the channel means/stds are averaged: the first conv of a 1-channel pretrained model holds the
    summed RGB kernels, which equals feeding the grey image to all three channels when they share one mean/std.
    """
    _check_name(name)
    norm = _NORMALIZATION[name]
    if norm is None:
        return None
    mean, std = norm
    if in_chans == 3:
        return list(mean), list(std)
    return [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans


def create_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    pretrained: bool = False,
    image_size: int = 32,
    small_input: bool | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """Build a registered model whose forward returns logits [B, num_classes].

    `image_size` is the side of the (square) training input; it picks the stem when `small_input` is None
    (small stem for sides ≤ SMALL_INPUT_MAX_SIZE) and fixes the static "same" padding of efficientnet_lite0.
    `dropout` is the dropout right before the final linear layer (it replaces torchvision's built-in 0.2).
    The returned model carries `model_name` and `head_name` (the dotted name of its final `nn.Linear`).
    """
    _check_name(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError.on("num_classes", num_classes, f"must be a positive integer, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError.on("in_chans", in_chans,
                             f"must be a positive integer (1 for grey, 3 for RGB), got {in_chans!r}")
    if not isinstance(image_size, int) or image_size < 4:
        raise ConfigError.on("data.image_size", image_size, f"must be an integer ≥ 4, got {image_size!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError.on("model.dropout", dropout, f"must be in [0, 1), got {dropout!r}")
    if pretrained and not _HAS_PRETRAINED[name]:
        with_weights = ", ".join(n for n in list_models() if _HAS_PRETRAINED[n])
        raise ConfigError.on("model.pretrained", pretrained,
                             f"{name!r} has no pretrained weights; models that have: {with_weights}")
    if small_input is None:
        small_input = image_size <= SMALL_INPUT_MAX_SIZE
    model = _MODELS[name](
        num_classes=num_classes,
        in_chans=in_chans,
        pretrained=pretrained,
        image_size=image_size,
        small_input=bool(small_input),
        dropout=float(dropout),
    )
    head = model.get_submodule(model.head_name)
    if not isinstance(head, nn.Linear) or head.out_features != num_classes:
        raise AssertionError(f"factory {name!r} broke the contract: head {model.head_name!r} is {head}")
    model.model_name = name
    return model
