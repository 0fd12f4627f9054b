"""The training loop end to end on real data (scikit-learn digits): accuracy, outputs, resume, DDP, failures."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from core.config import load_config
from core.events import read_jsonl
from core.train import main, train

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs/digits.yaml"
NO_EXPORT = ["export.enabled=false"]
FIXTURE_EPOCHS = 6
"""The digits preset at half its epochs: enough for ≥ 0.95 test accuracy, and half the time."""


def _epochs(run: Path) -> list[int]:
    return [r["data"]["epoch"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "epoch"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("digits") / "run"
    report = train(load_config(DIGITS, NO_EXPORT + [f"train.epochs={FIXTURE_EPOCHS}"]), out)
    return out, report


def test_digits_preset_reaches_95_percent(digits_run: tuple[Path, dict[str, Any]]) -> None:
    _, report = digits_run
    assert report["test"]["accuracy"] >= 0.95, report["test"]["accuracy"]
    assert report["test"]["macro_f1"] >= 0.94


def test_run_folder_holds_the_contract_files(digits_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = digits_run
    for name in ("config.yaml", "metrics.jsonl", "labels.json", "report.json", "split.json", "predictions.jsonl",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).exists(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard's files (core/tracking.py)
    report = json.loads((out / "report.json").read_text())
    assert json.loads((out / "labels.json").read_text()) == [str(i) for i in range(10)] == report["data"]["classes"]
    test = report["test"]
    assert set(test) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix", "top5_accuracy", "weighted_f1"}
    assert len(test["per_class"]) == 10 and len(test["confusion_matrix"]) == 10
    counts = report["data"]["counts"]
    assert sum(counts.values()) == 1797 and counts["train"] > counts["val"] > counts["test"]
    assert sum(map(sum, test["confusion_matrix"])) == counts["test"]
    assert report["epochs_completed"] == FIXTURE_EPOCHS and report["world_size"] == 1
    assert report["val"]["accuracy"] > 0.9 and "skipped_files" in report and report["seconds"] > 0
    # every epoch once, 1-based, with the fields the dashboard draws
    epochs = [r["data"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, report["epochs_completed"] + 1))
    assert {"train_loss", "val_loss", "train_acc", "val_acc", "val_macro_f1", "lr", "images_per_sec"} <= set(epochs[0])
    assert any(r["type"] == "step" for r in read_jsonl(out / "metrics.jsonl"))
    # per-sample predictions agree with the reported accuracy; misclassified images exist as files
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == counts["test"]
    assert sum(p["true"] == p["pred"] for p in preds) / len(preds) == pytest.approx(test["accuracy"])
    for m in report["misclassified"]:
        assert (out / m["image"]).is_file() and m["true"] != m["pred"]
    # checkpoints load safely
    ckpt = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert ckpt["epoch"] == report["epochs_completed"] and {"model", "optimizer", "lr_scheduler", "rng"} <= set(ckpt)


class _CrashAfter:
    """A sink that raises after a given epoch's event: a real interruption of the loop."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def emit(self, type: str, data: dict[str, Any]) -> None:
        if type == "epoch" and data["epoch"] == self.epoch:
            raise KeyboardInterrupt("simulated crash")

    def close(self) -> None:
        pass


def test_resume_ends_with_the_same_metrics_as_an_uninterrupted_run(tmp_path: Path) -> None:
    overrides = NO_EXPORT + ["train.epochs=3", "data.augment=classic"]
    cfg = load_config(DIGITS, overrides)
    whole = train(cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", sink=_CrashAfter(2))
    assert (tmp_path / "cut/CANCELLED").exists() and not (tmp_path / "cut/report.json").exists()
    assert main([str(DIGITS), "--out", str(tmp_path / "cut"), "--resume", *[arg for o in overrides for arg in ("--set", o)]]) == 0
    resumed = json.loads((tmp_path / "cut/report.json").read_text())
    assert resumed["test"]["accuracy"] == whole["test"]["accuracy"]
    assert resumed["test"]["confusion_matrix"] == whole["test"]["confusion_matrix"]
    a = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert _epochs(tmp_path / "cut") == [1, 2, 3]
    start = [r["data"] for r in read_jsonl(tmp_path / "cut/metrics.jsonl") if r["type"] == "start"]
    assert start[-1]["resumed_from"] == 2


def test_same_seed_same_result_different_seed_different(tmp_path: Path) -> None:
    base = NO_EXPORT + ["train.epochs=1"]
    a = train(load_config(DIGITS, base), tmp_path / "a")
    b = train(load_config(DIGITS, base), tmp_path / "b")
    c = train(load_config(DIGITS, base + ["train.seed=1"]), tmp_path / "c")
    assert a["test"]["confusion_matrix"] == b["test"]["confusion_matrix"]
    assert json.loads((tmp_path / "a/split.json").read_text()) != json.loads((tmp_path / "c/split.json").read_text())
    assert a["val"]["loss"] != c["val"]["loss"]


class _DivergingNet(torch.nn.Module):
    """A real model whose logits overflow after a few steps: the loop must notice, not train on NaN."""

    head_name = "fc"

    def __init__(self, in_chans: int, num_classes: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(in_chans, num_classes)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        scale = 1e39 if self.calls > 3 else 1.0  # overflows float32 to inf on the 4th training step
        return self.fc(x.mean(dim=(2, 3))) * scale


def _register_diverging_net() -> None:
    from core.models import list_models, register_model

    if "diverging_net" not in list_models():
        def diverging_net(*, num_classes: int, in_chans: int, **_: Any) -> torch.nn.Module:
            return _DivergingNet(in_chans, num_classes)

        register_model(diverging_net)


def test_nan_loss_stops_with_a_clear_error(tmp_path: Path) -> None:
    from core.errors import TrainingError

    _register_diverging_net()
    cfg = load_config(DIGITS, NO_EXPORT + ["model.name=diverging_net", "train.epochs=2", "train.log_every=1"])
    with pytest.raises(TrainingError) as exc:
        train(cfg, tmp_path / "r")
    assert "loss became" in str(exc.value) and "optim.lr" in str(exc.value)
    assert (tmp_path / "r/FAILED").exists() and not (tmp_path / "r/report.json").exists()


def test_time_limit_fails_the_run_as_timed_out(tmp_path: Path) -> None:
    from core.errors import TrainingError

    with pytest.raises(TrainingError, match=r"timed out: the run exceeded train.time_limit=0.001 s"):
        train(load_config(DIGITS, NO_EXPORT + ["train.epochs=2", "train.time_limit=0.001"]), tmp_path / "r")
    assert _epochs(tmp_path / "r") == []  # stopped at the first step, before any epoch ended
    assert (tmp_path / "r/FAILED").exists() and not (tmp_path / "r/report.json").exists()


def test_early_stopping_ends_before_the_epoch_budget(tmp_path: Path) -> None:
    report = train(load_config(DIGITS, NO_EXPORT + ["train.epochs=30", "train.early_stopping=1", "optim.lr=1e-9",
                                                    "sched.name=none", "sched.warmup_epochs=0"]), tmp_path / "r")
    # with a learning rate of ~0 val accuracy stalls, and patience 1 stops one epoch after the best one
    assert report["epochs_completed"] < 30
    assert report["epochs_completed"] == report["val"]["epoch"] + 1


def test_torchrun_two_gloo_ranks_only_rank0_writes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "core.train", str(DIGITS), "--out", str(out),
         "--set", "train.epochs=2", "--set", "export.enabled=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["epochs_completed"] == 2
    assert proc.stdout.count("done: test accuracy") == 1, "only rank 0 prints the summary"
    assert _epochs(out) == [1, 2], "only rank 0 writes events: each epoch once"
    assert sum(report["data"]["counts"].values()) == 1797
    assert report["test"]["accuracy"] > 0.6
