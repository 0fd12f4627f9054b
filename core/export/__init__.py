"""Export a finished run as verified deployable files: `python -m core.export RUN_DIR` → `RUN_DIR/export/`.

Nothing leaves this package unchecked. The FP32 ONNX model is compared with the PyTorch model on real test images
(max |Δlogit| ≤ PARITY_ATOL and identical top-1) and the export fails, offering no file, when they disagree. The INT8
model's test accuracy is measured with ONNX Runtime and stored beside the FP32 accuracy; an INT8 failure is reported
but does not fail the export. TensorRT is timed only where it really exists.

Steps: check the run folder → rebuild the model from config.yaml + labels.json + preprocess.json and load
checkpoints/best.pt → rebuild the data (seeded split: the same test split as training) → torch.export (model.pt2) →
ONNX (model.onnx) → parity → static INT8 quantization (model.int8.onnx) → accuracy of both on the test split → which to deploy (deploy.py: the faster at equal accuracy) → model.pt,
labels.json, preprocess.json, predict.py (defaulting to that file), model_card.md, bundle.zip → report.json gains
"export".

Files are built in `RUN_DIR/export.partial/` and swapped in as `RUN_DIR/export/` only when everything checked out, so a
failed or interrupted export never leaves a half-written or unverified export folder behind.

Exporter: the torch.export-based ONNX exporter (`dynamo=True`, the default since torch 2.9; the TorchScript exporter
is deprecated). The ExportedProgram it starts from is the one saved as model.pt2, so both files come from one trace.
When torch.export cannot trace a model, or cannot produce the requested opset, the TorchScript exporter is tried
(`dynamo=False` with `dynamic_axes`) and the report records which one made the file and why.

Modules, one step each: defaults (constants), inputs (the images checked and calibrated on), onnx_export
(torch.export, ONNX, the ONNX contract), ort (ONNX Runtime: parity, latency, predictions), int8 (quantization),
tensorrt_probe, deploy (the file to deploy and why), card (model_card.md), pipeline (`export_run`: the steps in
order, the folder swap), cli (`main`).
Loading a run and rebuilding its model is core/runfolder.py's (`load_run`, `build_model`), re-exported here.
"""
from __future__ import annotations

from core.export.card import model_card
from core.export.cli import main
from core.export.defaults import (
    EVAL_BATCH_SIZE,
    INT8_ACTIVATION_TYPE,
    INT8_REDUCE_RANGE,
    LATENCY_RUNS,
    PARITY_ATOL,
    PARITY_MIN_IMAGES,
    PREDICT_TEMPLATE,
)
from core.export.inputs import calibration_images, eval_dataset, take_images
from core.export.int8 import quantize_int8
from core.export.onnx_export import check_onnx, export_onnx, onnx_opset, trace_model
from core.export.ort import check_parity, latency_ms, ort_predictions, ort_session, run_session
from core.export.pipeline import export_run
from core.export.tensorrt_probe import probe_tensorrt
from core.runfolder import BUNDLE_FILES, Run, build_model, load_run

__all__ = [
    "BUNDLE_FILES", "EVAL_BATCH_SIZE", "INT8_ACTIVATION_TYPE", "INT8_REDUCE_RANGE", "LATENCY_RUNS", "PARITY_ATOL",
    "PARITY_MIN_IMAGES", "PREDICT_TEMPLATE", "Run", "build_model", "calibration_images", "check_onnx", "check_parity",
    "eval_dataset", "export_onnx", "export_run", "latency_ms", "load_run", "main", "model_card", "onnx_opset",
    "ort_predictions", "ort_session", "probe_tensorrt", "quantize_int8", "run_session", "take_images", "trace_model",
]
