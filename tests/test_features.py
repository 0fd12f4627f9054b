"""core.features: when the feature cache applies, what it holds, and that a head trained on it is the whole model's."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from core.config import load_config, save_config
from core.data.fast import TensorBatchLoader
from core.errors import Cancelled, ConfigError, TrainingError
from core.events import read_jsonl
from core.features import (
    FeatureBatchLoader,
    Progress,
    effective_views,
    embed,
    feature_cache_bytes,
    head_module,
    plan_feature_cache,
    static_backbone,
)
from core.models import create_model, freeze_backbone
from core.train import train

ROOT = Path(__file__).resolve().parents[1]

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


def test_cancel_stops_the_embedding_pass_at_the_next_batch() -> None:
    model = freeze_backbone(create_model("efficientnet_lite0", 3, image_size=32))
    batches = [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))] * 3
    flag = {"stop": False}
    seen = []

    def report(done: int, total: int, ips: float) -> None:
        seen.append(done)
        flag["stop"] = True  # SIGTERM arrives after the first batch

    def check() -> None:  # the train loop's Runtime.check_stop
        if flag["stop"]:
            raise Cancelled("received SIGTERM: run cancelled")

    progress = Progress(6, report, check)
    progress._last = -1e9  # report every batch
    with pytest.raises(Cancelled):
        embed(model, batches, torch.device("cpu"), progress=progress)
    assert seen == [2]


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
    # auto needs the config's frozen backbone, whatever the model looks like (a head-only model is not one)
    plan, why = plan_feature_cache(load_config(None, ["model.name=efficientnet_lite0"]), model, bundle)
    assert plan is None and "model.freeze" in why


def test_config_refuses_feature_cache_on_without_a_frozen_backbone() -> None:
    with pytest.raises(ConfigError, match=r"train.feature_cache: 'on' needs model.freeze: backbone"):
        load_config(None, ["train.feature_cache=on"])
    with pytest.raises(ConfigError, match=r"data.feature_views"):
        load_config(None, ["data.feature_views=0"])


# ------------------------------------------------------------------------------------------------ through core.train
def tiny_transfer(*extra: str) -> list[str]:
    """Lite0 with its real weights on 150 synthetic 32 px images, 3 classes: seconds per run on 2 cores."""
    return [*TRANSFER, "data.name=synthetic", "data.synthetic_size=150", "data.synthetic_classes=3",
            "data.synthetic_image_size=32", "train.batch_size=16", "train.epochs=3", "train.log_every=2",
            "data.feature_views=2", *extra]


def _records(run: Path, kind: str) -> list[dict[str, Any]]:
    return [r["data"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == kind]


def test_transfer_run_with_the_feature_cache(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = load_config(None, tiny_transfer("export.enabled=false"))
    report = train(cfg, run)
    start = _records(run, "start")[0]
    assert start["data_path"] == "feature_cache" and report["data_path"] == "feature_cache"
    counts = report["data"]["counts"]
    fc = report["feature_cache"]
    assert fc["views"] == 2 and fc["feature_dim"] == 1280 and fc["precision"] == "fp32"
    assert fc["images_embedded"] == 2 * counts["train"] + counts["val"]  # test is not cached: the whole model tests
    embeds = _records(run, "embed")
    assert embeds and embeds[-1]["done"] == embeds[-1]["total"] == fc["images_embedded"]
    phases = [p["phase"] for p in _records(run, "phase")]
    assert phases.index("embed") < phases.index("train") < phases.index("test")
    assert [e["epoch"] for e in _records(run, "epoch")] == [1, 2, 3]
    assert all(s["images_per_sec"] > 0 for s in _records(run, "step"))
    # only the head learned: the backbone is still the pretrained one
    weights = torch.load(run / "checkpoints/last.pt", weights_only=True)["model"]
    fresh = create_model("efficientnet_lite0", 3, pretrained=True, image_size=32)
    assert all(torch.equal(weights[k], v) for k, v in fresh.state_dict().items() if not k.startswith("fc."))
    assert not torch.equal(weights["fc.weight"], fresh.state_dict()["fc.weight"])
    # report.test is the whole fp32 network's on the test images (the best checkpoint, as export loads it)
    from core.data import build_datasets

    fresh.load_state_dict(torch.load(run / "checkpoints/best.pt", weights_only=True)["model"])
    test = build_datasets(cfg).test
    with torch.no_grad():
        preds = fresh.eval()(torch.stack([test[i][0] for i in range(len(test))])).argmax(1)
    saved = [json.loads(line)["pred"] for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert preds.tolist() == saved
    assert report["test"]["accuracy"] == pytest.approx(float((preds == torch.from_numpy(test.labels)).float().mean()))


@pytest.mark.slow
def test_transfer_run_with_the_feature_cache_exports_the_whole_model(tmp_path: Path) -> None:
    """`python -m pytest -m slow tests/test_features.py` (ONNX export of Lite0: a few minutes on 2 busy cores)."""
    report = train(load_config(None, tiny_transfer("export.int8=false", "train.epochs=1")), tmp_path / "run")
    assert report["data_path"] == "feature_cache"
    onnx = report["export"]["onnx"]
    assert onnx["top1_agreement"] == 1.0 and onnx["max_abs_diff"] <= 1e-3
    assert onnx["accuracy"] == pytest.approx(report["test"]["accuracy"])  # the exported network's test accuracy


def test_feature_cache_trains_what_the_current_path_trains(tmp_path: Path) -> None:
    """Without augmentation (one view) and without dropout the head sees the same features in the same batches
    (the epoch order is drawn like the tensor cache's): both paths end with the same head and the same metrics."""
    common = tiny_transfer("data.augment=none", "export.enabled=false")
    cached = train(load_config(None, [*common, "train.feature_cache=on"]), tmp_path / "cached")
    current = train(load_config(None, [*common, "train.feature_cache=off"]), tmp_path / "current")
    assert cached["data_path"] == "feature_cache" and current["data_path"] == "tensor_cache"
    assert cached["feature_cache"]["views"] == 1
    a = torch.load(tmp_path / "cached/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "current/checkpoints/last.pt", weights_only=True)["model"]
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"], rtol=0, atol=1e-4)
    assert cached["val"]["accuracy"] == current["val"]["accuracy"]
    assert cached["test"]["confusion_matrix"] == current["test"]["confusion_matrix"]


def test_resume_rebuilds_the_cache_and_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = load_config(None, tiny_transfer("export.enabled=false", "train.early_stopping=5"))
    whole = train(cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", sink=_CrashAfter(2))
    resumed = train(load_config(tmp_path / "cut/config.yaml"), tmp_path / "cut", resume=True)
    assert resumed["test"]["confusion_matrix"] == whole["test"]["confusion_matrix"]
    a = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)["model"]
    assert torch.equal(a["fc.weight"], b["fc.weight"]), "the resumed head differs from the uninterrupted run's"
    assert [e["epoch"] for e in _records(tmp_path / "cut", "epoch")] == [1, 2, 3]


def test_time_limit_ends_the_embedding_pass(tmp_path: Path) -> None:
    """train.time_limit is checked between embedding batches too: a long embedding pass cannot overrun it."""
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"timed out: the run exceeded train.time_limit=0.001 s"):
        train(load_config(None, tiny_transfer("export.enabled=false", "train.time_limit=0.001")), run)
    phases = [p["phase"] for p in _records(run, "phase")]
    assert phases[-1] == "embed" and not _records(run, "embed")  # stopped before the first batch was embedded


def test_auto_views_follow_the_epochs() -> None:
    """data.feature_views auto: one view per EPOCHS_PER_VIEW epochs, 1 to FEATURE_VIEWS_MAX; 1 without augmentation;
    a number is taken as it is."""
    def views(*overrides: str) -> int:
        return effective_views(load_config(None, [*TRANSFER, *overrides]))

    assert load_config(None, []).data.feature_views is None  # auto is the default
    assert [views(f"train.epochs={e}") for e in (1, 10, 11, 20, 30, 40, 300)] == [1, 1, 2, 2, 3, 4, 4]
    assert views("train.epochs=300", "data.augment=none") == 1
    assert views("train.epochs=1", "data.feature_views=8") == 8
    assert load_config(None, ["data.feature_views=auto"]).data.feature_views is None


def test_auto_falls_back_to_the_current_path_over_the_memory_cap(tmp_path: Path) -> None:
    report = train(load_config(None, tiny_transfer("export.enabled=false", "train.epochs=1", "data.cache_max_mb=1",
                                                   "data.feature_views=64")), tmp_path / "run")
    assert report["data_path"] != "feature_cache" and "feature_cache" not in report
    start = _records(tmp_path / "run", "start")[0]
    assert "data.cache_max_mb=1" in start["feature_cache"]["off"]


class _CrashAfter:
    """A sink that raises KeyboardInterrupt after a given epoch's event: a real interruption of the loop."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def emit(self, type: str, data: dict[str, Any]) -> None:
        if type == "epoch" and data["epoch"] == self.epoch:
            raise KeyboardInterrupt

    def close(self) -> None:
        pass


@pytest.mark.slow
def test_torchrun_two_ranks_each_embed_their_shard(tmp_path: Path) -> None:
    """`python -m pytest -m slow tests/test_features.py` (about a minute): 2 gloo ranks, each embeds its shard."""
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    config = tmp_path / "tiny.yaml"
    save_config(load_config(None, tiny_transfer("export.enabled=false", "train.feature_cache=on")), config)
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "core.train", str(config), "--out",
                           str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    counts = report["data"]["counts"]
    assert report["world_size"] == 2 and report["data_path"] == "feature_cache"
    # rank 0 embedded half of the train split (2 views) and its half of val
    assert report["feature_cache"]["images_embedded"] == 2 * (counts["train"] // 2) + -(-counts["val"] // 2)
    assert [e["epoch"] for e in _records(out, "epoch")] == [1, 2, 3]
    assert sum(sum(r) for r in report["test"]["confusion_matrix"]) == counts["test"]


def test_views_come_from_the_pil_pipeline_when_the_tensor_cache_is_off(tmp_path: Path) -> None:
    """`strong` augmentation (and datasets over data.cache_max_mb) keep the DataLoader: views are its PIL transforms."""
    run = tmp_path / "run"
    report = train(load_config(None, tiny_transfer("export.enabled=false", "data.augment=strong", "train.epochs=2")),
                   run)
    counts = report["data"]["counts"]
    assert report["data_path"] == "feature_cache"
    assert report["feature_cache"]["images_embedded"] == 2 * counts["train"] + counts["val"]
    assert [e["epoch"] for e in _records(run, "epoch")] == [1, 2]
