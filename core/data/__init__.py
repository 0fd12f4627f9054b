"""Datasets for training: `build_datasets(cfg)`, the transform presets and the dataset health report.

Modules: build (the five datasets → DataBundle), imagefolder (folder/zip scanning shared by build and inspect),
archive (safe zip extraction into the cache), split (stratified seeded splits), transforms (eval geometry and
augmentation presets), datasets (sources, split Dataset, DataBundle), inspect (inspect_dataset), builtin (the
built-in datasets table), defaults (constants).

The names below are imported on first use, so `core.data.builtin` (read by the dashboard) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataBundle": "core.data.datasets", "ImageDataset": "core.data.datasets", "build_datasets": "core.data.build",
    "create_transform": "core.data.transforms", "inspect_dataset": "core.data.inspect",
    "stratified_split": "core.data.split",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'core.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
