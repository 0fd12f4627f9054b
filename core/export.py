"""Export a finished run as verified deployable files: `python -m core.export RUN_DIR` → `RUN_DIR/export/`.

Nothing leaves this module unchecked. The FP32 ONNX model is compared with the PyTorch model on real test images
(max |Δlogit| ≤ PARITY_ATOL and identical top-1) and the export fails, offering no file, when they disagree. The INT8
model's test accuracy is measured with ONNX Runtime and stored beside the FP32 accuracy; an INT8 failure is reported
but does not fail the export. TensorRT is timed only where it really exists.

Steps: check the run folder → rebuild the model from config.yaml + labels.json + preprocess.json and load
checkpoints/best.pt → rebuild the data (seeded split: the same test split as training) → torch.export (model.pt2) →
ONNX (model.onnx) → parity → static INT8 quantization (model.int8.onnx) → accuracy of both on the test split → model.pt,
labels.json, preprocess.json, predict.py, model_card.md, bundle.zip → report.json gains "export".

Files are built in `RUN_DIR/export.partial/` and swapped in as `RUN_DIR/export/` only when everything checked out, so a
failed or interrupted export never leaves a half-written or unverified export folder behind.

Exporter: the torch.export-based ONNX exporter (`dynamo=True`, the default since torch 2.9; the TorchScript exporter
is deprecated). The ExportedProgram it starts from is the one saved as model.pt2, so both files come from one trace.
When torch.export cannot trace a model, or cannot produce the requested opset, the TorchScript exporter is tried
(`dynamo=False` with `dynamic_axes`) and the report records which one made the file and why.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shutil
import statistics
import sys
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core import runfolder as rf
from core.errors import CoreError, ExportError, RunDirError, exit_code
from core.runfolder import BUNDLE_FILES, Run, build_model, load_run

PARITY_MIN_IMAGES = 64
"""Images: parity is checked on at least this many real images (export.parity_images may raise it)."""

PARITY_ATOL = 1e-3
"""Largest allowed |ONNX Runtime logit − PyTorch logit| over the parity images (FP32)."""

EVAL_BATCH_SIZE = 64
"""Images per ONNX Runtime call when measuring test accuracy and calibrating."""

LATENCY_RUNS = 20
"""Timed batch-1 inferences per model (after LATENCY_WARMUP); the median is reported, in milliseconds."""

LATENCY_WARMUP = 3
"""Untimed batch-1 inferences before timing (first runs allocate and pick kernels)."""

LATENCY_MAX_SECONDS = 1.5
"""Stop timing a model after this many seconds even if fewer than LATENCY_RUNS ran (big models on a slow CPU)."""

INT8_ACTIVATION_TYPE = "QUInt8"
"""Activation type for static quantization (weights are always QInt8, per channel). Measured on digits and a
ResNet-18: see docs/export.md. U8S8 with reduce_range is ONNX Runtime's recommended CPU format."""

INT8_REDUCE_RANGE = True
"""7-bit weights: avoids the U8S8 int16-accumulation saturation ONNX Runtime warns about on AVX2 CPUs without VNNI."""

PREDICT_TEMPLATE = Path(__file__).with_name("predict_template.py")
"""The standalone script copied into every export as predict.py."""

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------- inputs
def eval_dataset(bundle: Any, split: str) -> Any:
    """A split under the evaluation transform (train images are calibrated on without augmentation)."""
    from core.data import create_transform

    ds = bundle.dataset(split)
    return ds if split != "train" else ds.with_transform(create_transform(bundle.preprocess))


def take_images(bundle: Any, n: int, splits: Iterable[str]) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The first n eval-transformed images over `splits` in order (test first: a small test split borrows from val)."""
    xs: list[torch.Tensor] = []
    where: list[tuple[str, int]] = []
    for split in splits:
        ds = eval_dataset(bundle, split)
        for i in range(min(len(ds), n - len(xs))):
            xs.append(ds[i][0])
            where.append((split, i))
        if len(xs) >= n:
            break
    if not xs:
        raise ExportError("the dataset has no images to check the export on")
    return torch.stack(xs), where


def calibration_images(bundle: Any, n: int, seed: int) -> torch.Tensor:
    """n training images (seeded random choice, eval transform): the activation ranges INT8 is calibrated on."""
    ds = eval_dataset(bundle, "train")
    order = np.random.default_rng(seed).permutation(len(ds))[:n]
    return torch.stack([ds[int(i)][0] for i in order])


def batches(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), size):
        yield x[start:start + size]


# ------------------------------------------------------------------------------------------------------- exporters
@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """The exporters print progress and warnings; keep them out of the run's log unless something fails."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield buf


def trace_model(model: nn.Module, example: torch.Tensor) -> tuple[Any, str | None]:
    """torch.export with a dynamic batch axis → (ExportedProgram, None) or (None, why it failed)."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet():
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), None
    except Exception as err:  # noqa: BLE001
        return None, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"


def onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(model: nn.Module, program: Any, example: torch.Tensor, path: Path, opset: int) -> dict[str, Any]:
    """Write model.onnx (weights inside the file) from the ExportedProgram, else with the TorchScript exporter."""
    attempts: list[str] = []
    if program is not None:
        try:
            with _quiet():
                onnx_program = torch.onnx.export(program, (example,), None, dynamo=True, input_names=["input"],
                                                 output_names=["logits"], opset_version=opset, optimize=True,
                                                 verbose=False)
                onnx_program.save(str(path), external_data=False)
            got = onnx_opset(path)
            if got == opset:
                return {"exporter": "dynamo", "opset": got}
            attempts.append(f"dynamo: produced opset {got} instead of the requested {opset}")
        except Exception as err:  # noqa: BLE001
            attempts.append(f"dynamo: {type(err).__name__}: {str(err)[:300]}")
    else:
        attempts.append("dynamo: torch.export failed (see pt2.error)")
    try:
        with _quiet():
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                              output_names=["logits"], opset_version=opset,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        return {"exporter": "torchscript", "opset": onnx_opset(path), "fallback_reason": "; ".join(attempts)}
    except Exception as err:  # noqa: BLE001
        attempts.append(f"torchscript: {type(err).__name__}: {str(err)[:300]}")
    if program is not None and path.exists():  # the dynamo file with another opset beats no file
        return {"exporter": "dynamo", "opset": onnx_opset(path), "opset_requested": opset,
                "fallback_reason": "; ".join(attempts)}
    raise ExportError("ONNX export failed: " + "; ".join(attempts))


def check_onnx(path: Path, in_chans: int, size: tuple[int, int]) -> None:
    """onnx.checker plus the contract: one input `input` [batch, C, H, W] with a symbolic batch, output `logits`."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"{path.name}: onnx.checker rejected the model: {err}") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if [i.name for i in inputs] != ["input"] or [o.name for o in graph.output] != ["logits"]:
        raise ExportError(f"{path.name}: inputs {[i.name for i in inputs]} / outputs {[o.name for o in graph.output]}"
                          ", expected ['input'] / ['logits']")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_param or d.dim_value for d in dims]
    if len(dims) != 4 or not dims[0].dim_param or shape[1:] != [in_chans, *size]:
        raise ExportError(f"{path.name}: input shape {shape}, expected [batch, {in_chans}, {size[0]}, {size[1]}] "
                          "with a dynamic batch axis")


def ort_session(path: Path, providers: list[Any] | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT warns about unused initializers etc. on every session
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])


def run_session(session: Any, x: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
    return np.concatenate([session.run(["logits"], {"input": b})[0] for b in batches(x, batch_size)])


def check_parity(model: nn.Module, session: Any, x: torch.Tensor) -> dict[str, Any]:
    """ONNX Runtime vs PyTorch logits on real images, run at batch sizes 1, 7 and EVAL_BATCH_SIZE (dynamic axis)."""
    with torch.no_grad():
        ref = model(x).float().numpy()
    xn = x.numpy()
    got = np.concatenate([session.run(["logits"], {"input": xn[:1]})[0], run_session(session, xn[1:8], 7),
                          run_session(session, xn[8:])]) if len(xn) > 1 else run_session(session, xn)
    diff = float(np.abs(got - ref).max())
    agree = got.argmax(1) == ref.argmax(1)
    # a disagreement is excused only where PyTorch's own top-2 logits are within the tolerance: a genuine tie
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    ties = int(((~agree) & (top2[:, 1] - top2[:, 0] <= PARITY_ATOL)).sum())
    return {"max_abs_diff": diff, "top1_agreement": float(agree.mean()), "parity_images": len(xn),
            "tolerance": PARITY_ATOL, "ties": ties, "ok": bool(diff <= PARITY_ATOL and int((~agree).sum()) == ties)}


def latency_ms(session: Any, x1: np.ndarray) -> float:
    """Median wall time of one batch-1 inference on this machine, in milliseconds."""
    for _ in range(LATENCY_WARMUP):
        session.run(["logits"], {"input": x1})
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < LATENCY_RUNS and time.perf_counter() - start < LATENCY_MAX_SECONDS:
        t = time.perf_counter()
        session.run(["logits"], {"input": x1})
        times.append((time.perf_counter() - t) * 1000)
    return float(statistics.median(times))


# ------------------------------------------------------------------------------------------------------------ int8
class _ArrayReader:
    """onnxruntime CalibrationDataReader over an in-memory array (duck-typed: get_next → dict | None, rewind)."""

    def __init__(self, x: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> None:
        self.x = x
        self.batch_size = batch_size
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = ({"input": b} for b in batches(self.x, self.batch_size))


def quantize_int8(fp32: Path, out: Path, calib: np.ndarray, work: Path, *, activation_type: str = INT8_ACTIVATION_TYPE,
                  reduce_range: bool = INT8_REDUCE_RANGE) -> dict[str, Any]:
    """Static QDQ quantization, per-channel QInt8 weights, MinMax-calibrated on `calib` (training images).

    quant_pre_process first: its shape inference and graph optimisation (Conv+BatchNorm folding) give the quantizer
    fused convolutions to quantize, which is both faster and more accurate than quantizing around BatchNorm.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader_cls = type("CalibReader", (_ArrayReader, CalibrationDataReader), {})
    pre = work / "model.pre.onnx"
    pre_processed = True
    try:
        with _quiet():
            quant_pre_process(str(fp32), str(pre))
    except Exception:  # noqa: BLE001 - symbolic shape inference does not know every op; quantize the plain model then
        pre_processed = False
        shutil.copyfile(fp32, pre)
    with _quiet():
        quantize_static(str(pre), str(out), reader_cls(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, weight_type=QuantType.QInt8,
                        activation_type=getattr(QuantType, activation_type), calibrate_method=CalibrationMethod.MinMax)
    pre.unlink(missing_ok=True)
    return {"format": "QDQ", "per_channel": True, "weight_type": "QInt8", "activation_type": activation_type,
            "reduce_range": reduce_range, "calibration": "MinMax", "calib_images": len(calib),
            "pre_processed": pre_processed}


def ort_predictions(sessions: dict[str, Any], dataset: Any,
                    num_workers: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, float]]:
    """One pass over a split: (each session's top-1 predictions, labels, each session's inference seconds).

    Images are decoded once for all sessions, which matters for large image folders.
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, shuffle=False, num_workers=num_workers)
    preds: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    seconds = dict.fromkeys(sessions, 0.0)
    labels = []
    for x, y in loader:
        xn = x.numpy()
        for name, session in sessions.items():
            t = time.perf_counter()
            preds[name].append(session.run(["logits"], {"input": xn})[0].argmax(1))
            seconds[name] += time.perf_counter() - t
        labels.append(y.numpy())
    empty = np.zeros(0, np.int64)
    return ({name: np.concatenate(p) if p else empty for name, p in preds.items()},
            np.concatenate(labels) if labels else empty, seconds)


# -------------------------------------------------------------------------------------------------------- tensorrt
def probe_tensorrt(onnx_path: Path, x1: np.ndarray, cpu_logits: np.ndarray) -> dict[str, Any]:
    """Build and time TensorRT where it exists (ORT's TensorRT provider, else the tensorrt package); never pretend."""
    import onnxruntime as ort

    reasons = []
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        try:
            session = ort_session(onnx_path, [("TensorrtExecutionProvider", {}), "CUDAExecutionProvider",
                                              "CPUExecutionProvider"])
            if session.get_providers()[0] != "TensorrtExecutionProvider":
                raise RuntimeError(f"session fell back to {session.get_providers()}")
            got = session.run(["logits"], {"input": x1})[0]
            return {"available": True, "backend": "onnxruntime TensorrtExecutionProvider", "precision": "fp32",
                    "latency_ms_batch1": latency_ms(session, x1),
                    "max_abs_diff_vs_cpu": float(np.abs(got - cpu_logits).max())}
        except Exception as err:  # noqa: BLE001
            reasons.append(f"onnxruntime TensorrtExecutionProvider failed: {type(err).__name__}: {str(err)[:300]}")
    else:
        reasons.append("onnxruntime has no TensorrtExecutionProvider")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        reasons.append("python package tensorrt not installed")
    else:
        if not torch.cuda.is_available():
            reasons.append("tensorrt is installed but there is no CUDA device")
        else:
            try:
                return _tensorrt_native(onnx_path, x1, cpu_logits)
            except Exception as err:  # noqa: BLE001
                return {"available": True, "ok": False, "backend": "tensorrt",
                        "error": f"{type(err).__name__}: {str(err)[:500]}", "reason": "; ".join(reasons)}
    return {"available": False, "reason": "not available: " + "; ".join(reasons)}


def _tensorrt_native(onnx_path: Path, x1: np.ndarray, cpu_logits: np.ndarray) -> dict[str, Any]:
    """TensorRT 10 API: parse the ONNX file, build an FP32 engine for batch 1, time execute_async_v3."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", x1.shape, x1.shape, x1.shape)
    config.add_optimization_profile(profile)
    t = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("build_serialized_network returned None")
    build_seconds = time.perf_counter() - t
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    context.set_input_shape("input", x1.shape)
    x = torch.from_numpy(x1).cuda()
    y = torch.empty(tuple(cpu_logits.shape), dtype=torch.float32, device="cuda")
    context.set_tensor_address("input", x.data_ptr())
    context.set_tensor_address("logits", y.data_ptr())
    stream = torch.cuda.Stream()
    for _ in range(LATENCY_WARMUP):
        context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    times = []
    for _ in range(LATENCY_RUNS):
        t = time.perf_counter()
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    return {"available": True, "backend": f"tensorrt {trt.__version__}", "precision": "fp32",
            "build_seconds": build_seconds, "latency_ms_batch1": float(statistics.median(times)),
            "max_abs_diff_vs_cpu": float(np.abs(y.cpu().numpy() - cpu_logits).max())}


# ------------------------------------------------------------------------------------------------------ model card
def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f} %"


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def model_card(run: Run, export: dict[str, Any]) -> str:
    """model_card.md: what the model is, what it was trained and tested on, how well, and what was verified."""
    cfg, report, pp = run.cfg, run.report, run.preprocess
    test = report.get("test", {})
    data = report.get("data", {})
    counts = data.get("counts", {})
    onnx_info, int8 = export["onnx"], export["int8"]
    h, w = pp["input_size"]
    geometry = (f"resize to {h}×{w} (bilinear)" if not pp.get("resize_shorter") else
                f"resize shorter side to {pp['resize_shorter']} (bilinear), centre-crop {pp['center_crop']}")
    lines = [
        f"# Model card: {cfg.model.name} on {cfg.data.name}", "",
        (f"An image classifier for {len(run.classes)} classes, trained with this project's managed training "
        f"(run folder `{run.path.name}`). Exported {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."), "",
        "## Use it", "",
        "```", "pip install onnxruntime numpy pillow", "python predict.py model.onnx image.png --top-k 5 [--json]", "```",
        "", (f"Input `input` float32 [batch, {run.in_chans}, {h}, {w}]; output `logits` [batch, {len(run.classes)}] "
        "(softmax gives probabilities). Preprocessing (preprocess.json): convert to "
        f"{pp['color_mode']}, {geometry}, pixels / 255, subtract mean {pp['mean']}, divide by std {pp['std']}, CHW."),
        "", "## Intended use and limitations", "",
        (f"- Classifies images that look like the training data ({cfg.data.name}) into exactly these classes: "
        f"{', '.join(run.classes[:50])}{' …' if len(run.classes) > 50 else ''}. Anything else is still forced into "
        "one of them; a low top-1 probability is a hint, not a guarantee, that an image is out of scope."),
        ("- Accuracy below is measured on a held-out split of the same dataset; expect lower accuracy on images from "
        "other cameras, lighting, framing or populations. Validate on your own data before relying on it."),
        ("- Not for decisions about people or safety-critical uses without further evaluation. EXIF orientation is "
        "not applied (training did not apply it either)."), "",
        "## Data", "",
        (f"- Dataset: {cfg.data.name}{f' ({cfg.data.path})' if cfg.data.path else ''}; split train/val/test "
        f"{counts.get('train', '?')}/{counts.get('val', '?')}/{counts.get('test', '?')} images "
        f"(fractions {cfg.data.split}, seed {cfg.train.seed})."),
        f"- Skipped unreadable files: {len(report.get('skipped_files', []))}.", "",
        "## Training", "",
        (f"- Model `{cfg.model.name}` (pretrained: {cfg.model.pretrained}, freeze: {cfg.model.freeze}), "
        f"{report.get('model', {}).get('parameters', '?')} parameters."),
        (f"- {report.get('epochs_completed', '?')} epochs, batch {cfg.train.batch_size}, {cfg.optim.name} lr "
        f"{cfg.optim.lr:g} wd {cfg.optim.weight_decay:g}, schedule {cfg.sched.name}, augment {cfg.data.augment}, "
        f"AMP {cfg.train.amp}, {report.get('world_size', 1)} process(es) on {report.get('device', '?')}, "
        f"{report.get('seconds', 0):.0f} s."),
    ]
    if "pruning" in report:
        pr = report["pruning"]
        lines.append(f"- Pruned: {'structured (channels)' if pr.get('structured') else 'global L1 unstructured'}, "
                     f"amount {pr.get('amount')}, sparsity {_pct(pr.get('sparsity'))} of pruned weights, "
                     f"fine-tuned {pr.get('finetune_epochs')} epoch(s).")
    lines += [
        "", "## Metrics (test split, best checkpoint by validation accuracy)", "",
        "| metric | value |", "|---|---|",
        f"| accuracy (PyTorch) | {_pct(test.get('accuracy'))} |",
        f"| accuracy (ONNX FP32, ONNX Runtime) | {_pct(onnx_info.get('accuracy'))} |",
        f"| accuracy (ONNX INT8, ONNX Runtime) | {_pct(int8.get('accuracy'))} |",
        f"| macro F1 | {test.get('macro_f1', float('nan')):.4f} |",
        f"| validation accuracy | {_pct(report.get('val', {}).get('accuracy'))} |",
    ]
    if "top5_accuracy" in test:
        lines.append(f"| top-5 accuracy | {_pct(test['top5_accuracy'])} |")
    per_class = test.get("per_class", [])
    if per_class:
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
                  for c in per_class]
    cm = test.get("confusion_matrix", [])
    if cm and len(cm) <= 30:
        lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
                  "| true \\ pred | " + " | ".join(run.classes) + " |", "|---" * (len(cm) + 1) + "|"]
        lines += [f"| {run.classes[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(cm)]
    elif cm:
        lines += ["", f"Confusion matrix: {len(cm)}×{len(cm)}, see report.json (too large for this card)."]
    lines += [
        "", "## Export verification", "",
        (f"- `model.onnx`: FP32, opset {onnx_info['opset']}, exporter {onnx_info['exporter']}, "
        f"{_mb(onnx_info['bytes'])}. ONNX Runtime vs PyTorch on {onnx_info['parity_images']} real images: "
        f"max |Δlogit| {onnx_info['max_abs_diff']:.2e} (limit {PARITY_ATOL:g}), top-1 agreement "
        f"{_pct(onnx_info['top1_agreement'])}. Batch-1 latency {onnx_info.get('latency_ms_batch1', float('nan')):.2f} "
        "ms on the exporting machine's CPU."),
    ]
    if int8.get("ok"):
        lines.append(f"- `model.int8.onnx`: static QDQ INT8 (per-channel {int8['weight_type']} weights, "
                     f"{int8['activation_type']} activations), calibrated on {int8['calib_images']} training images; "
                     f"{_mb(int8['bytes'])}; test accuracy {_pct(int8['accuracy'])} vs FP32 {_pct(int8['fp32_accuracy'])}"
                     f" (drop {100 * int8['accuracy_drop']:.2f} points); agrees with FP32 on "
                     f"{_pct(int8['top1_agreement_with_fp32'])} of test images; batch-1 latency "
                     f"{int8.get('latency_ms_batch1', float('nan')):.2f} ms.")
    else:
        lines.append(f"- `model.int8.onnx`: not produced ({int8.get('error', 'disabled')}).")
    pt2 = export["pt2"]
    lines.append(f"- `model.pt`: state_dict ({_mb(export['files'].get('model.pt'))}); rebuild with "
                 f"`core.models.create_model({cfg.model.name!r}, {len(run.classes)}, in_chans={run.in_chans}, "
                 f"image_size={run.image_size})` and load it with `torch.load(path, weights_only=True)`.")
    lines.append(f"- `model.pt2`: torch.export program ({_mb(pt2.get('bytes'))}), load with `torch.export.load`."
                 if pt2.get("ok") else f"- `model.pt2`: not produced ({pt2.get('error')}).")
    trt = export.get("tensorrt", {})
    lines.append(f"- TensorRT: {trt['backend']}, batch-1 latency {trt['latency_ms_batch1']:.3f} ms."
                 if trt.get("latency_ms_batch1") is not None else f"- TensorRT: {trt.get('reason') or trt.get('error')}.")
    lines += ["", "## Versions", "",
              (f"torch {torch.__version__}, onnx {export['versions'].get('onnx')}, onnxruntime "
              f"{export['versions'].get('onnxruntime')}, python {sys.version.split()[0]}."), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- export
def _record_failure(run: Run, message: str) -> None:
    """report.json says why the export failed (the dashboard shows it); the export folder is left untouched."""
    report = rf.read_json(run.path / "report.json")
    report["export"] = {"ok": False, "error": message}
    rf.write_json(run.path / "report.json", report)


def export_run(run_dir: str | Path, *, log: Log = print) -> dict[str, Any]:
    """Export and verify a finished run; returns report.json's new "export" section (also written to report.json).

    Raises RunDirError for a missing or half-written run folder, ExportError when a file cannot be made or fails
    its check (report.json then records the error and no export/ folder from this attempt remains).
    """
    t0 = time.time()
    run = load_run(run_dir)
    partial = run.path / "export.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        export = _export_files(run, partial, log)
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, Exception):
            message = str(err) if isinstance(err, CoreError) else f"{type(err).__name__}: {err}"
            with contextlib.suppress(CoreError, OSError):
                _record_failure(run, message)
        raise
    final, old = run.path / "export", run.path / "export.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
    export["seconds"] = time.time() - t0
    report = rf.read_json(run.path / "report.json")
    report["export"] = export
    rf.write_json(run.path / "report.json", report)
    log(f"export: done in {export['seconds']:.1f}s → {final}")
    return export


def _export_files(run: Run, out: Path, log: Log) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    from core.data import build_datasets

    cfg = run.cfg
    model = build_model(run)
    bundle = build_datasets(cfg)
    if list(bundle.classes) != run.classes:
        raise RunDirError(f"the dataset's classes {list(bundle.classes)[:20]} no longer match labels.json "
                          f"{run.classes[:20]}: the data changed since training")
    size = (int(run.preprocess["input_size"][0]), int(run.preprocess["input_size"][1]))
    export: dict[str, Any] = {"ok": True, "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                                                       "onnxruntime": ort.__version__}}

    # ---- torch.export → model.pt2 (and the graph the ONNX exporter starts from)
    n_parity = max(cfg.export.parity_images, PARITY_MIN_IMAGES)
    parity_x, where = take_images(bundle, n_parity, ("test", "val", "train"))
    example = parity_x[:2] if len(parity_x) >= 2 else parity_x.repeat(2, 1, 1, 1)  # batch 1 would be specialised
    t = time.time()
    program, trace_error = trace_model(model, example)
    pt2: dict[str, Any] = {"ok": program is not None}
    if program is not None:
        try:
            torch.export.save(program, str(out / "model.pt2"))
            pt2["bytes"] = (out / "model.pt2").stat().st_size
        except Exception as err:  # noqa: BLE001
            pt2 = {"ok": False, "error": f"torch.export.save: {type(err).__name__}: {str(err)[:300]}"}
    else:
        pt2["error"] = f"torch.export: {trace_error}"
    export["pt2"] = pt2

    # ---- ONNX FP32, checked, then parity with PyTorch on real images
    onnx_path = out / "model.onnx"
    onnx_info = export_onnx(model, program, example, onnx_path, cfg.export.opset)
    onnx_info["opset_requested"] = cfg.export.opset
    onnx_info["export_seconds"] = time.time() - t
    check_onnx(onnx_path, run.in_chans, size)
    session = ort_session(onnx_path)
    parity = check_parity(model, session, parity_x)
    parity["images_from"] = sorted({split for split, _ in where})
    onnx_info.update(parity, bytes=onnx_path.stat().st_size)
    log(f"export: model.onnx ({onnx_info['exporter']}, opset {onnx_info['opset']}) parity on {len(parity_x)} images: "
        f"max |Δlogit| {parity['max_abs_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.4f}")
    if not parity["ok"]:
        raise ExportError(f"ONNX parity failed on {len(parity_x)} images: max |Δlogit| {parity['max_abs_diff']:.3g} "
                          f"(allowed {PARITY_ATOL:g}), top-1 agreement {parity['top1_agreement']:.4f} (required 1.0); "
                          "no model was exported")
    export["onnx"] = onnx_info

    # ---- INT8 (static QDQ), calibrated on training images; failure is reported, not fatal
    sessions = {"fp32": session}
    int8: dict[str, Any] = {"ok": False}
    if cfg.export.int8:
        try:
            t = time.time()
            calib = calibration_images(bundle, cfg.export.calib_images, cfg.train.seed).numpy()
            int8.update(quantize_int8(onnx_path, out / "model.int8.onnx", calib, out))
            onnx.checker.check_model(str(out / "model.int8.onnx"))
            sessions["int8"] = ort_session(out / "model.int8.onnx")
            int8.update(ok=True, bytes=(out / "model.int8.onnx").stat().st_size, quantize_seconds=time.time() - t)
        except Exception as err:  # noqa: BLE001
            (out / "model.int8.onnx").unlink(missing_ok=True)
            int8 = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:500]}"}
            log(f"export: INT8 quantization failed, FP32 export continues: {int8['error']}")
    else:
        int8["error"] = "disabled by export.int8: false"

    # ---- accuracy of the ONNX files on the whole test split (ONNX Runtime, one pass)
    preds, labels, seconds = ort_predictions(sessions, bundle.test, cfg.data.num_workers)
    fp32_acc = float((preds["fp32"] == labels).mean()) if len(labels) else float("nan")
    onnx_info["accuracy"] = fp32_acc
    onnx_info["pytorch_accuracy"] = run.report.get("test", {}).get("accuracy")
    onnx_info["test_images"] = len(labels)
    x1 = parity_x[:1].numpy()
    onnx_info["latency_ms_batch1"] = latency_ms(session, x1)
    if "int8" in sessions:
        acc = float((preds["int8"] == labels).mean()) if len(labels) else float("nan")
        int8.update(accuracy=acc, fp32_accuracy=fp32_acc, accuracy_drop=fp32_acc - acc,
                    top1_agreement_with_fp32=float((preds["int8"] == preds["fp32"]).mean()) if len(labels) else None,
                    latency_ms_batch1=latency_ms(sessions["int8"], x1),
                    speedup_vs_fp32_test_pass=seconds["fp32"] / max(seconds["int8"], 1e-9))
        log(f"export: INT8 test accuracy {acc:.4f} vs FP32 {fp32_acc:.4f} (drop {100 * (fp32_acc - acc):.2f} points), "
            f"{int8['bytes'] / 1e6:.2f} MB vs {onnx_info['bytes'] / 1e6:.2f} MB")
    export["int8"] = int8
    export["tensorrt"] = probe_tensorrt(onnx_path, x1, session.run(["logits"], {"input": x1})[0])

    # ---- PyTorch weights, the client contract files, the card and the bundle
    torch.save(model.state_dict(), out / "model.pt")
    rf.write_json(out / "labels.json", run.classes)
    rf.write_json(out / "preprocess.json", {**run.preprocess, "input_name": "input"})
    shutil.copyfile(PREDICT_TEMPLATE, out / "predict.py")
    export["files"] = {name: (out / name).stat().st_size for name in BUNDLE_FILES if (out / name).exists()}
    (out / "model_card.md").write_text(model_card(run, export), encoding="utf-8")
    export["files"]["model_card.md"] = (out / "model_card.md").stat().st_size
    with zipfile.ZipFile(out / "bundle.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in BUNDLE_FILES:
            if (out / name).exists():
                zf.write(out / name, arcname=name)
    export["files"]["bundle.zip"] = (out / "bundle.zip").stat().st_size
    return export


# -------------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.export",
                                description="Export a finished run to RUN_DIR/export/ (ONNX FP32 + INT8, verified).")
    p.add_argument("run_dir", help="a finished run folder (holds report.json, config.yaml, checkpoints/best.pt)")
    args = p.parse_args(argv)
    try:
        export = export_run(args.run_dir)
    except CoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_code(err)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("error: export failed (traceback above)", file=sys.stderr)
        return 1
    o, q = export["onnx"], export["int8"]
    print(f"onnx: max |Δlogit| {o['max_abs_diff']:.2e}, top-1 agreement {o['top1_agreement']:.4f}, "
          f"accuracy {o['accuracy']:.4f}, {o['bytes'] / 1e6:.2f} MB")
    if q.get("ok"):
        print(f"int8: accuracy {q['accuracy']:.4f} (drop {100 * q['accuracy_drop']:.2f} points), {q['bytes'] / 1e6:.2f} MB")
    else:
        print(f"int8: not produced: {q.get('error')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
