"""Constants of the export, each with its unit. Change them here, nowhere else."""
from __future__ import annotations

from pathlib import Path

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

PREDICT_TEMPLATE = Path(__file__).parent.parent / "predict_template.py"
"""The standalone script copied into every export as predict.py."""

DEPLOY_ACCURACY_TOLERANCE = 0.005
"""INT8 counts as "equal accuracy" when its test accuracy is at most this much (0.5 points) below FP32's, or at most
one test image's worth on a small test split (core/export/deploy.py)."""

DEPLOY_MIN_SPEEDUP = 1.05
"""INT8 counts as faster when FP32's median batch-1 latency is at least this many times INT8's (5 %: less is within
the timing noise of a shared machine)."""
