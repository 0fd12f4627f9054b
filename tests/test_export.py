"""Export end to end on real runs: ONNX contract and parity, INT8 accuracy, PyTorch files, the standalone predict.py
and preprocess.json, the CLI's errors, a torchvision model, and the export at the end of `python -m core.train`."""
from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import load_config
from core.export import PARITY_ATOL, check_parity, export_onnx, load_run, main, ort_session, trace_model
from tests.fixtures_runs import digits_run_exported, synthetic_torchvision_run

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_FILES = ("model.onnx", "model.int8.onnx", "model.pt", "labels.json", "preprocess.json", "predict.py",
                  "model_card.md", "bundle.zip")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_run_exported(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def bundle(run: Path) -> Any:
    """The digits run's data, rebuilt from its own config (the same seeded split as training)."""
    from core.data import build_datasets

    return build_datasets(load_config(run / "config.yaml"))


def _report(run: Path) -> dict[str, Any]:
    return json.loads((run / "report.json").read_text())


def _load_predict(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bundle_predict_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _raw_image(bundle: Any, split: str, i: int) -> Image.Image:
    """Sample i of a split as stored (digits: 8×8), before any resize: what a user would hand to predict.py."""
    ds = bundle.dataset(split)
    return ds.source.load(int(ds.indices[i]))


# ------------------------------------------------------------------------------------------ export after training
def test_training_cli_exports_every_contract_file(tmp_path_factory: pytest.TempPathFactory, run: Path) -> None:
    _, log = digits_run_exported(tmp_path_factory)
    assert "export:" in log
    export_dir = run / "export"
    for name in CONTRACT_FILES:
        assert (export_dir / name).is_file(), name
    assert not (run / "export.partial").exists()
    export = _report(run)["export"]
    assert {"max_abs_diff", "top1_agreement", "opset", "bytes"} <= set(export["onnx"])
    assert {"accuracy", "accuracy_drop", "bytes"} <= set(export["int8"])
    assert export["onnx"]["opset"] == 18 and export["onnx"]["exporter"] in ("dynamo", "torchscript")
    assert export["tensorrt"]["available"] or export["tensorrt"]["reason"].startswith("not available")
    with zipfile.ZipFile(export_dir / "bundle.zip") as zf:
        assert set(CONTRACT_FILES) - {"bundle.zip"} <= set(zf.namelist())
    assert json.loads((export_dir / "labels.json").read_text()) == json.loads((run / "labels.json").read_text())
    pp = json.loads((export_dir / "preprocess.json").read_text())
    assert pp["input_name"] == "input" and pp["color_mode"] == "L" and pp["input_size"] == [32, 32]
    assert {"resize_shorter", "center_crop", "mean", "std"} <= set(pp)
    card = (export_dir / "model_card.md").read_text()
    for heading in ("## Intended use", "## Data", "## Metrics", "Confusion matrix", "## Export verification"):
        assert heading in card


def test_onnx_contract_parity_and_dynamic_batch(run: Path, bundle: Any) -> None:
    import onnx

    path = run / "export/model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    onnx_info = _report(run)["export"]["onnx"]
    assert onnx_info["parity_images"] >= 64 and onnx_info["max_abs_diff"] <= PARITY_ATOL
    assert onnx_info["top1_agreement"] == 1.0 and onnx_info["bytes"] == path.stat().st_size
    # independently of the export's own check: batch sizes 1 and 7 against the checkpoint in PyTorch
    from core.export import build_model

    torch_model = build_model(load_run(run))
    session = ort_session(path)
    for n in (1, 7):
        x = torch.stack([bundle.test[i][0] for i in range(n)])
        got = session.run(["logits"], {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = torch_model(x).numpy()
        assert got.shape == (n, 10)
        assert np.abs(got - ref).max() <= PARITY_ATOL and (got.argmax(1) == ref.argmax(1)).all()


def test_int8_is_static_qdq_and_keeps_digits_accuracy(run: Path) -> None:
    import onnx

    int8 = _report(run)["export"]["int8"]
    assert int8["ok"], int8
    assert int8["accuracy_drop"] <= 0.01, int8  # at most 1 point
    assert int8["accuracy"] >= 0.9 and int8["bytes"] < _report(run)["export"]["onnx"]["bytes"] / 2
    ops = {n.op_type for n in onnx.load(str(run / "export/model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "ConvInteger" not in ops


def test_pytorch_files_load_and_match(run: Path, bundle: Any) -> None:
    from core.models import create_model

    r = load_run(run)
    state = torch.load(run / "export/model.pt", weights_only=True)
    model = create_model(r.cfg.model.name, len(r.classes), in_chans=1, image_size=32).eval()
    model.load_state_dict(state)
    x = torch.stack([bundle.test[i][0] for i in range(4)])
    pt2 = _report(run)["export"]["pt2"]
    with torch.no_grad():
        ref = model(x)
        if pt2["ok"]:
            program = torch.export.load(str(run / "export/model.pt2"))
            assert torch.allclose(program.module()(x), ref, atol=1e-5)
        else:
            assert pt2["error"]


# --------------------------------------------------------------------------------- preprocess.json and predict.py
def test_preprocess_json_reproduces_the_eval_transform_on_digits(run: Path, bundle: Any) -> None:
    predict = _load_predict(run / "export/predict.py")
    pp = json.loads((run / "export/preprocess.json").read_text())
    for i in range(10):
        ours = predict.preprocess_image(_raw_image(bundle, "test", i), pp)
        theirs = bundle.test[i][0].numpy()
        assert ours.shape == theirs.shape == (1, 32, 32) and ours.dtype == np.float32
        assert np.abs(ours - theirs).max() <= 1e-6


@pytest.mark.parametrize("size", [(37, 53), (53, 37), (120, 90), (20, 20)])
@pytest.mark.parametrize("mode", ["RGB", "L", "P"])
def test_preprocess_json_reproduces_resize_and_center_crop(size: tuple[int, int], mode: str) -> None:
    """The resize-shorter + centre-crop geometry (used from 96 px) and a plain resize, on odd-sized images."""
    from core.data.transforms import ClassificationPresetEval

    predict = _load_predict(ROOT / "core/predict_template.py")
    rgb = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(rgb, "RGB")
    if mode == "P":
        img = img.quantize(16)
        img.info["transparency"] = 0
    elif mode == "L":
        img = img.convert("L")
    geometries = [{"input_size": [24, 28], "resize_shorter": None, "center_crop": None},
                  {"input_size": [32, 32], "resize_shorter": 37, "center_crop": [32, 32]},
                  {"input_size": [16, 16], "resize_shorter": 20, "center_crop": [16, 16]}]
    for color_mode, mean, std in (("RGB", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), ("L", [0.45], [0.23])):
        for geometry in geometries:
            pp = {"input_name": "input", "color_mode": color_mode, **geometry, "mean": mean, "std": std}
            ours = predict.preprocess_image(img, pp)
            theirs = ClassificationPresetEval(preprocess=pp)(img).numpy()
            assert ours.shape == theirs.shape, (pp, ours.shape, theirs.shape)
            assert np.abs(ours - theirs).max() <= 1e-6, pp


def test_predict_py_imports_only_onnxruntime_numpy_pillow() -> None:
    tree = ast.parse((ROOT / "core/predict_template.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names - set(sys.stdlib_module_names) == {"onnxruntime", "numpy", "PIL"}


def test_predict_py_from_the_unzipped_bundle_matches_core_evaluation(run: Path, bundle: Any, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    with zipfile.ZipFile(run / "export/bundle.zip") as zf:
        zf.extractall(folder)
    files = []
    for i in range(20):  # the stored 8×8 digits: predict.py does the resize itself
        name = f"digit_{i:02d}.png"
        _raw_image(bundle, "test", i).save(folder / name)
        files.append(name)
    # -I: no PYTHONPATH, no user site, no script folder magic — only the bundle and the installed packages
    proc = subprocess.run([sys.executable, "-I", "predict.py", "model.onnx", *files, "--json", "--top-k", "3"],
                          cwd=folder, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["file"] for r in out] == files
    classes = json.loads((run / "labels.json").read_text())
    preds = {p["index"]: p["pred"] for p in map(json.loads, (run / "predictions.jsonl").read_text().splitlines())}
    assert [r["top"][0]["label"] for r in out] == [classes[preds[i]] for i in range(20)]
    for r in out:
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # the INT8 model and the plain-text output work the same way
    proc = subprocess.run([sys.executable, "-I", "predict.py", "model.int8.onnx", files[0]], cwd=folder,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith(f"{files[0]}: "), proc.stderr


# -------------------------------------------------------------------------------------------------- errors, parity
def test_export_cli_rejects_a_missing_or_half_written_run(run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    half = tmp_path / "half"
    half.mkdir()
    for name in ("config.yaml", "labels.json", "preprocess.json"):
        shutil.copy(run / name, half / name)
    (half / "checkpoints").mkdir()
    shutil.copy(run / "checkpoints/best.pt", half / "checkpoints/best.pt")
    proc = subprocess.run([sys.executable, "-m", "core.export", str(half)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "report.json" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (half / "report.json").write_text('{"test": {"accuracy": 0.9')  # torn write
    assert main([str(half)]) == 2
    assert "half-written" in capsys.readouterr().err
    (half / "report.json").write_text((run / "report.json").read_text())
    (half / "checkpoints/best.pt").write_bytes((run / "checkpoints/best.pt").read_bytes()[:1000])
    assert main([str(half)]) == 2
    assert "best.pt" in capsys.readouterr().err
    assert not (half / "export").exists()


def test_parity_check_catches_a_model_that_does_not_match(tmp_path: Path) -> None:
    torch.manual_seed(0)
    good = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 5)).eval()
    x = torch.randn(9, 3, 8, 8)
    program, error = trace_model(good, x[:2])
    info = export_onnx(good, program, x[:2], tmp_path / "m.onnx", 18)
    assert info["opset"] == 18, error
    session = ort_session(tmp_path / "m.onnx")
    assert check_parity(good, session, x)["ok"]
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 5)).eval()
    bad = check_parity(other, session, x)
    assert not bad["ok"] and bad["max_abs_diff"] > PARITY_ATOL


def test_torchscript_exporter_covers_what_dynamo_cannot(tmp_path: Path) -> None:
    """No ExportedProgram (torch.export failed): the legacy exporter. A lower opset is honoured by one or the other."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(144, 5)).eval()
    x = torch.randn(9, 3, 8, 8)
    info = export_onnx(model, None, x[:2], tmp_path / "a.onnx", 18)
    assert info["exporter"] == "torchscript" and info["opset"] == 18 and "torch.export failed" in info["fallback_reason"]
    assert check_parity(model, ort_session(tmp_path / "a.onnx"), x)["ok"]
    program, _ = trace_model(model, x[:2])
    info = export_onnx(model, program, x[:2], tmp_path / "b.onnx", 17)
    assert info["opset"] == 17, info  # dynamo's version converter, or the TorchScript fallback where it fails
    assert check_parity(model, ort_session(tmp_path / "b.onnx"), x)["ok"]


# ------------------------------------------------------------------------------------------------ torchvision model
def test_torchvision_model_exports_with_parity(tmp_path_factory: pytest.TempPathFactory,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = synthetic_torchvision_run(tmp_path_factory)
    assert main([str(run)]) == 0, capsys.readouterr().err
    export = _report(run)["export"]
    onnx_info = export["onnx"]
    assert onnx_info["max_abs_diff"] <= PARITY_ATOL and onnx_info["top1_agreement"] == 1.0
    assert onnx_info["parity_images"] >= 64 and "train" in onnx_info["images_from"]  # test split of 10 borrowed
    assert export["int8"]["ok"] and export["int8"]["accuracy"] >= 0
    session = ort_session(run / "export/model.onnx")
    for n in (1, 7):
        x = np.random.default_rng(n).normal(size=(n, 3, 16, 16)).astype(np.float32)
        assert session.run(["logits"], {"input": x})[0].shape == (n, 4)
    # the logits depend on the image, so the parity above compared something real
    from core.data import build_datasets

    data = build_datasets(load_config(run / "config.yaml"))
    x = torch.stack([data.train[i][0] for i in range(16)]).numpy()
    assert session.run(["logits"], {"input": x})[0].std(axis=0).max() > 1e-2


# ---------------------------------------------------------------------------------------------- the file to deploy
def test_the_file_to_deploy_is_the_faster_one_at_equal_accuracy() -> None:
    from core.export.deploy import choose_deploy

    fp32 = {"accuracy": 0.95, "latency_ms_batch1": 2.0, "test_images": 1000}

    def int8(accuracy: float, ms: float) -> dict[str, Any]:
        return {"ok": True, "accuracy": accuracy, "accuracy_drop": 0.95 - accuracy, "latency_ms_batch1": ms}

    faster = choose_deploy(fp32, int8(0.948, 0.8))  # ResNet-18-like: 2.5x, 0.2 points
    assert faster["file"] == "model.int8.onnx" and faster["int8_speedup_batch1"] == 2.5
    assert "2.50× the speed of FP32" in faster["reason"] and "tolerance 0.50" in faster["reason"]
    slower = choose_deploy(fp32, int8(0.95, 2.2))  # SimpleCNN at 224 px: 0.9x
    assert slower["file"] == "model.onnx" and slower["reason"].startswith("INT8 is not faster here: INT8 runs 0.91×")
    worse = choose_deploy(fp32, int8(0.93, 0.8))
    assert worse["file"] == "model.onnx" and worse["reason"].startswith("INT8 is less accurate")
    missing = choose_deploy(fp32, {"ok": False, "error": "disabled by export.int8: false"})
    assert missing["file"] == "model.onnx" and "disabled by export.int8: false" in missing["reason"]
    small = choose_deploy({**fp32, "test_images": 180}, int8(0.95 - 1 / 180, 0.8))  # one test image of 180
    assert small["file"] == "model.int8.onnx" and small["accuracy_tolerance"] == pytest.approx(1 / 180)


def test_report_card_and_bundle_name_the_file_to_deploy(run: Path, tmp_path: Path) -> None:
    deploy = _report(run)["export"]["deploy"]
    assert deploy["file"] in ("model.onnx", "model.int8.onnx") and deploy["reason"]
    card = (run / "export/model_card.md").read_text()
    assert f"**Deploy `{deploy['file']}`**: {deploy['reason']}" in card
    folder = tmp_path / "bundle"
    with zipfile.ZipFile(run / "export/bundle.zip") as zf:
        zf.extractall(folder)
    predict = _load_predict(folder / "predict.py")
    assert predict.DEFAULT_MODEL == deploy["file"]
    template = (ROOT / "core/predict_template.py").read_text().splitlines()
    changed = [line for line in (folder / "predict.py").read_text().splitlines() if line not in template]
    assert len(changed) == 2 and changed[0].startswith("# Recommended by the export: ")  # only the default changes
    digit = folder / "digit.png"
    Image.fromarray(np.full((8, 8), 128, np.uint8), "L").save(digit)
    proc = subprocess.run([sys.executable, "-I", "predict.py", digit.name, "--json"], cwd=folder,
                          capture_output=True, text=True, timeout=300, check=False)  # no model named: the default
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["file"] == "digit.png"
