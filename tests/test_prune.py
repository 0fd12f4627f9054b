"""Pruning on a real digits run: 50 % global L1 keeps accuracy after one fine-tune epoch and the new run folder is a
complete, exported run; structured pruning zeroes whole channels; bad input exits 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from core.export import load_run
from core.prune import main, prune_run
from tests.fixtures_runs import digits_run_exported

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_run_exported(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def pruned(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("pruned") / "run"
    proc = subprocess.run([sys.executable, "-m", "core.prune", str(source), "--amount", "0.5", "--finetune-epochs", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    return out, proc


def _weights(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Conv2d and Linear weights by module name."""
    names = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    return {n: state[f"{n}.weight"] for n in names}


def test_prune_50_percent_keeps_accuracy_and_reports_it(pruned: tuple[Path, Any], source: Path) -> None:
    out, proc = pruned
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    pr = report["pruning"]
    assert {"amount", "structured", "sparsity", "nonzero_params", "total_params", "before", "after",
            "finetune_epochs"} <= set(pr)
    assert pr["amount"] == 0.5 and pr["structured"] is False and pr["finetune_epochs"] == 1
    assert abs(pr["sparsity"] - 0.5) < 0.01
    assert pr["nonzero_params"] < 0.6 * pr["total_params"]
    before = json.loads((source / "report.json").read_text())["test"]["accuracy"]
    assert pr["before"]["test_accuracy"] == pytest.approx(before, abs=1e-9)
    assert pr["after"]["test_accuracy"] >= pr["before"]["test_accuracy"] - 0.02, pr
    assert report["test"]["accuracy"] == pr["after"]["test_accuracy"]
    # the checkpoint really is that sparse, and loads like any run's
    run = load_run(out)
    from core.export import build_model

    model = build_model(run)
    weights = _weights(run.checkpoint["model"], model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert abs(zeros / sum(w.numel() for w in weights.values()) - pr["sparsity"]) < 1e-9


def test_pruned_run_is_a_complete_exported_run(pruned: tuple[Path, Any]) -> None:
    out, proc = pruned
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("config.yaml", "labels.json", "preprocess.json", "split.json", "checkpoints/best.pt",
                 "metrics.jsonl", "predictions.jsonl", "export/model.onnx", "export/model.int8.onnx",
                 "export/bundle.zip"):
        assert (out / name).exists(), name
    export = json.loads((out / "report.json").read_text())["export"]
    assert export["onnx"]["max_abs_diff"] <= 1e-3 and export["onnx"]["top1_agreement"] == 1.0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["data"]["epoch"] for e in events if e["type"] == "epoch"] == [1]
    assert "sparsity" in (out / "export/model_card.md").read_text()


def test_structured_pruning_zeroes_whole_output_channels(source: Path, tmp_path: Path) -> None:
    report = prune_run(source, tmp_path / "structured", amount=0.5, structured=True, finetune_epochs=0, export=False)
    pr = report["pruning"]
    assert pr["structured"] is True and abs(pr["sparsity"] - 0.5) < 0.05
    run = load_run(tmp_path / "structured")
    from core.export import build_model

    model = build_model(run)
    head = model.head_name
    for name, w in _weights(run.checkpoint["model"], model).items():
        rows = w.reshape(w.shape[0], -1)
        dead = (rows == 0).all(dim=1)
        if name == head:
            assert not dead.any()  # the classifier keeps every class
        else:
            assert int(dead.sum()) == round(0.5 * w.shape[0]), name
            assert int((rows[~dead] == 0).sum()) == 0  # the survivors are untouched
    assert not (tmp_path / "structured/export").exists()


def test_prune_cli_bad_input_exits_2(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(source), "--amount", "1.5", "--out", str(tmp_path / "a")]) == 2
    assert "--amount" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--amount", "0.5", "--out", str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    assert main([str(source), "--amount", "0.5", "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
