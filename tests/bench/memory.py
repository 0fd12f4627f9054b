"""Row 8's sizes, computed without training: the tensor cache for 50,000 CIFAR-sized images (≤ 154 MB) and the feature
cache for 10,000 images × 8 views of Lite0."""
from __future__ import annotations

import torch

from tests.bench.harness import Row, Section


def bench_cache_size() -> Row:
    from core.data.fast import cache_bytes

    n = 50_000
    cache = torch.empty((n, 3, 32, 32), dtype=torch.uint8)
    nbytes = cache.numel() * cache.element_size()
    assert nbytes == cache_bytes(n, 3, (32, 32))
    return Row("memory: tensor cache of 50,000 CIFAR-sized (3×32×32) images", nbytes / 1e6, 154.0, "MB",
               higher_is_better=False, note=f"{nbytes:,} bytes uint8 ({nbytes / 2**20:.1f} MiB)")


def bench_feature_cache_size() -> Row:
    from core.features import FEATURE_BYTES, feature_cache_bytes
    from core.models import create_model, get_head

    dim = get_head(create_model("efficientnet_lite0", 2, image_size=224)).in_features
    cache = torch.empty((8, 10_000, dim), dtype=torch.float32)  # what FeatureBatchLoader holds for train
    nbytes = cache.numel() * cache.element_size()
    assert nbytes == feature_cache_bytes(10_000, 8, 0, dim) and cache.element_size() == FEATURE_BYTES
    return Row("memory: feature cache of 10,000 images × 8 views (Lite0)", nbytes / 1e6, None, "MB",
               higher_is_better=False, note=f"{nbytes:,} bytes: 8 × 10,000 × {dim} float32 ({nbytes / 2**20:.1f} "
                                            "MiB); val images add one row each")


def bench_memory(quick: bool) -> list[Row]:
    return [bench_cache_size(), bench_feature_cache_size()]


SECTION = Section("memory", "memory rows", bench_memory, (
    Row("memory: tensor cache of 50,000 CIFAR-sized (3×32×32) images", None, 154.0, "MB", False),
    Row("memory: feature cache of 10,000 images × 8 views (Lite0)", None, None, "MB", False)))
