"""Models: a timm-style registry (`create_model(name, num_classes, ...)`) plus fine-tuning helpers.

Importing this package is cheap (torch only): torchvision and the EfficientNet-Lite packages are imported by the
factories that need them, because config validation imports `list_models`.

Every model returns logits [B, num_classes] and has `head_name`, the dotted name of its final `nn.Linear`; see
`finetune` for how a frozen backbone must be put in training mode.
"""
from __future__ import annotations

from core.models import efficientnet_lite, simple, torchvision_models  # noqa: F401  (fill the registry)
from core.models.finetune import (
    count_parameters,
    freeze_backbone,
    get_head,
    set_train_mode,
    split_parameters,
    unwrap_model,
)
from core.models.registry import (
    SMALL_INPUT_MAX_SIZE,
    create_model,
    has_pretrained,
    list_models,
    pretrained_normalization,
    register_model,
)

__all__ = [
    "SMALL_INPUT_MAX_SIZE",
    "count_parameters",
    "create_model",
    "freeze_backbone",
    "get_head",
    "has_pretrained",
    "list_models",
    "pretrained_normalization",
    "register_model",
    "set_train_mode",
    "split_parameters",
    "unwrap_model",
]
