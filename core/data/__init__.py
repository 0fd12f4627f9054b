"""Datasets for training: `build_datasets(cfg)`, the transform presets and the dataset health report.

Modules: build (the five datasets → DataBundle), imagefolder (folder/zip scanning shared by build and inspect),
archive (safe zip extraction into the cache), split (stratified seeded splits), transforms (eval geometry and
augmentation presets), datasets (sources, split Dataset, DataBundle), inspect (inspect_dataset), defaults (constants).
"""
from __future__ import annotations

from core.data.build import build_datasets
from core.data.datasets import DataBundle, ImageDataset
from core.data.inspect import inspect_dataset
from core.data.split import stratified_split
from core.data.transforms import create_transform

__all__ = ["DataBundle", "ImageDataset", "build_datasets", "create_transform", "inspect_dataset", "stratified_split"]
