"""Fine-tuning helpers: which parameters are the head, freezing the backbone, and train mode for a frozen backbone.

How train.py must use them (frozen backbone, `model.freeze: backbone`):

    freeze_backbone(model)                     # before building the optimizer (and again after loading a checkpoint)
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], ...)
    for epoch in ...:
        set_train_mode(model)                  # instead of model.train(): frozen parts stay in eval mode
        ...
        model.eval()                           # evaluation as usual

`model.train()` alone would put the frozen backbone's BatchNorm back in training mode: it would normalise with batch
statistics and overwrite the pretrained running statistics, so the frozen "features" would drift. `set_train_mode` is
harmless for unfrozen models (it is exactly `model.train()` there), so train.py can always call it. It also works on
DistributedDataParallel / torch.compile wrappers, since it looks at `requires_grad`, not at names.

Fine-tuning with a smaller backbone learning rate (`model.backbone_lr_scale`): `split_parameters(model)` gives the two
parameter groups.
"""
from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (`.module`) and/or torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def get_head(model: nn.Module) -> nn.Linear:
    """The final classifier Linear (named by the model's `head_name`)."""
    inner = unwrap_model(model)
    return inner.get_submodule(inner.head_name)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone parameters, head parameters): every parameter lands in exactly one list, frozen ones included.

    The head is the final Linear only; everything before it (including e.g. MobileNetV3's pretrained 576→1024 Linear)
    is backbone, because that is what carries pretrained knowledge.
    """
    head_ids = {id(p) for p in get_head(model).parameters()}
    backbone, head = [], []
    for p in unwrap_model(model).parameters():
        (head if id(p) in head_ids else backbone).append(p)
    return backbone, head


def freeze_backbone(model: nn.Module) -> nn.Module:
    """Make only the head trainable (requires_grad False elsewhere), and put the frozen parts in eval mode.

    Eval mode for frozen parts lasts only until the next `model.train()`; call `set_train_mode(model)` instead.
    """
    backbone, head = split_parameters(model)
    for p in backbone:
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    set_train_mode(model, model.training)
    return model


def set_train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """`model.train(mode)`, except that every submodule whose parameters are all frozen stays in eval mode.

    Eval mode is what a frozen part needs: BatchNorm uses (and keeps) its pretrained running statistics, and
    stochastic depth / dropout inside the frozen backbone are off, so the head trains on the same features it will see
    at inference. Parameter-free modules (e.g. the dropout before the head) follow their parent.
    """
    model.train(mode)
    if mode:
        for module in model.modules():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()
    return model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (optionally only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
