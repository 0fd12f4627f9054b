"""core.features: when the feature cache applies, what it holds, and that a head trained on it is the whole model's."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from core.config import load_config
from core.data.fast import TensorBatchLoader
from core.errors import ConfigError
from core.features import (
    FeatureBatchLoader,
    embed,
    feature_cache_bytes,
    head_module,
    plan_feature_cache,
    static_backbone,
)
from core.models import create_model, freeze_backbone

TRANSFER = ["model.name=efficientnet_lite0", "model.pretrained=true", "model.freeze=backbone"]


class _TwoDropouts(nn.Module):
    """A frozen backbone with a parameter-free dropout of its own: its features vary in training mode."""

    head_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.drop_features = nn.Dropout2d(0.1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.drop_features(self.conv(x))).flatten(1)))


def test_static_backbone_is_read_from_the_model() -> None:
    model = create_model("efficientnet_lite0", 3, image_size=32, dropout=0.2)
    reason, _ = static_backbone(model)
    assert reason is not None and "model.freeze: backbone" in reason  # everything trains
    freeze_backbone(model)
    assert static_backbone(model) == (None, 0.2)  # the dropout right before the head is the head's own
    assert model.training  # the check leaves the model's mode as it was
    odd = freeze_backbone(_TwoDropouts())
    reason, _ = static_backbone(odd)
    assert reason is not None and "drop_features (Dropout2d)" in reason


def test_head_on_embedded_features_is_the_whole_model() -> None:
    torch.manual_seed(0)
    model = freeze_backbone(create_model("efficientnet_lite0", 3, image_size=32, dropout=0.3))
    x, y = torch.randn(10, 3, 32, 32), torch.arange(10) % 3
    feats, labels = embed(model, [(x[:6], y[:6]), (x[6:], y[6:])], torch.device("cpu"))
    assert feats.shape == (10, 1280) and labels.tolist() == y.tolist()
    head = head_module(model, 0.3).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(feats), model(x), rtol=1e-4, atol=1e-5)
    assert head[1] is model.fc  # shared parameters: the optimizer and checkpoints see one model


def test_feature_loader_one_view_per_image_per_epoch_seeded() -> None:
    views, n, dim = 3, 10, 2
    # feature value = 100 * view + image index, so every batch says which view of which image it holds
    feats = torch.stack([torch.stack([torch.full((dim,), 100.0 * v + i) for i in range(n)]) for v in range(views)])
    labels = torch.arange(n)
    loader = FeatureBatchLoader(feats, labels, batch_size=4, train=True, seed=5)
    picks = []
    for epoch in (1, 2, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        got = torch.cat([f[:, 0] for f, _ in batches])
        ys = torch.cat([y for _, y in batches])
        assert sorted(ys.tolist()) == list(range(n))  # every image once (no drop_last)
        assert torch.equal(got % 100, ys.float())  # the features of the labelled image
        picks.append((got // 100).tolist())
    assert picks[0] == picks[2] != picks[1]  # seeded by epoch
    assert set(picks[0] + picks[1]) == {0, 1, 2}
    val = FeatureBatchLoader(feats[:1], labels, batch_size=4, train=False)
    assert torch.cat([y for _, y in val]).tolist() == list(range(n))
    assert len(FeatureBatchLoader(feats, labels, batch_size=4, train=True, drop_last=True)) == 2


def test_ordered_pass_is_one_seeded_augmented_view_in_stored_order() -> None:
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(7)
    loader = TensorBatchLoader(images, labels, batch_size=3, mean=[0.5] * 3, std=[0.25] * 3, train=True,
                               augment="classic", drop_last=True)
    a, b, c = (list(loader.ordered_pass(s)) for s in (1, 1, 2))
    assert torch.cat([y for _, y in a]).tolist() == list(range(7))  # all 7, in order, despite drop_last
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(a, b))
    assert not all(torch.equal(x, x3) for (x, _), (x3, _) in zip(a, c))


def test_memory_cap_falls_back_or_refuses() -> None:
    assert feature_cache_bytes(10_000, 8, 0, 1280) == 409_600_000
    model = freeze_backbone(create_model("efficientnet_lite0", 3, image_size=32))
    bundle = SimpleNamespace(train=range(10_000), val=range(2_000))
    cfg = load_config(None, [*TRANSFER, "data.feature_views=8", "data.cache_max_mb=100"])
    plan, why = plan_feature_cache(cfg, model, bundle)
    assert plan is None and "data.cache_max_mb=100" in why and "400 MiB" in why, why
    with pytest.raises(ConfigError, match=r"train.feature_cache: .*over data.cache_max_mb=100.*data.feature_views"):
        plan_feature_cache(cfg.model_copy(update={"train": cfg.train.model_copy(update={"feature_cache": "on"})}),
                           model, bundle)
    plan, _ = plan_feature_cache(load_config(None, [*TRANSFER, "data.feature_views=8"]), model, bundle, world_size=2)
    assert plan is not None and (plan.n_train, plan.n_val, plan.views) == (5_000, 1_000, 8)
    plan, _ = plan_feature_cache(load_config(None, [*TRANSFER, "data.augment=none"]), model, bundle)
    assert plan is not None and plan.views == 1  # without augmentation every view would be the same image
    assert plan_feature_cache(load_config(None, [*TRANSFER, "train.feature_cache=off"]), model, bundle)[0] is None


def test_config_refuses_feature_cache_on_without_a_frozen_backbone() -> None:
    with pytest.raises(ConfigError, match=r"train.feature_cache: 'on' needs model.freeze: backbone"):
        load_config(None, ["train.feature_cache=on"])
    with pytest.raises(ConfigError, match=r"data.feature_views"):
        load_config(None, ["data.feature_views=0"])
