"""Finished run folders for the export and prune tests, trained once per test session.

Training is the expensive part of these tests (the CI machine has two shared cores), so a run is cached under pytest's
session temp folder by name: the first module that asks trains it, later modules reuse it. Each is a real run made by
the real CLI or `core.train.train`, nothing is faked.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs/digits.yaml"
DIGITS_EPOCHS = 4
"""Enough for ~0.97 test accuracy on digits, few enough to keep the suite short."""


def digits_run_exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`python -m core.train configs/digits.yaml` with export on (the default): (run folder, the CLI's output)."""
    base = tmp_path_factory.getbasetemp() / "digits_exported"
    run, log = base / "run", base / "train.log"
    if not (run / "report.json").exists() or "export" not in json.loads((run / "report.json").read_text()):
        base.mkdir(exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "core.train", str(DIGITS), "--out", str(run),
                               "--set", f"train.epochs={DIGITS_EPOCHS}"],
                              check=False, cwd=ROOT, capture_output=True, text=True, timeout=900)
        log.write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, log.read_text()


def synthetic_torchvision_run(tmp_path_factory: pytest.TempPathFactory, model: str = "resnet18") -> Path:
    """A torchvision model trained one epoch on a tiny synthetic RGB set at 16 px, export off (the test exports it).

    Small on purpose: the point is the architecture going through torch.export/ONNX/INT8, not its accuracy. 100 images
    still give the 64 parity images (test 10, then val and train). ResNet-18 rather than MobileNetV3: measured here its
    dynamo export takes about half as long, and one epoch of MobileNetV3 leaves near-constant logits, a weak parity test.
    """
    from core.config import load_config
    from core.train import train

    run = tmp_path_factory.getbasetemp() / f"synthetic_{model}" / "run"
    if not (run / "report.json").exists():
        cfg = load_config(None, ["data.name=synthetic", "data.synthetic_size=100", "data.synthetic_classes=4",
                                 "data.synthetic_image_size=16", f"model.name={model}", "train.epochs=1",
                                 "train.batch_size=16", "export.enabled=false", "export.calib_images=32"])
        train(cfg, run)
    return run
