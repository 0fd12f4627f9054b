"""Static INT8 quantization of the FP32 ONNX model (QDQ, per-channel weights, calibrated on training images)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from core.export.defaults import EVAL_BATCH_SIZE, INT8_ACTIVATION_TYPE, INT8_REDUCE_RANGE
from core.export.inputs import batches
from core.export.onnx_export import quiet


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
        with quiet():
            quant_pre_process(str(fp32), str(pre))
    except Exception:  # noqa: BLE001 - symbolic shape inference does not know every op; quantize the plain model then
        pre_processed = False
        shutil.copyfile(fp32, pre)
    with quiet():
        quantize_static(str(pre), str(out), reader_cls(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, weight_type=QuantType.QInt8,
                        activation_type=getattr(QuantType, activation_type), calibrate_method=CalibrationMethod.MinMax)
    pre.unlink(missing_ok=True)
    return {"format": "QDQ", "per_channel": True, "weight_type": "QInt8", "activation_type": activation_type,
            "reduce_range": reduce_range, "calibration": "MinMax", "calib_images": len(calib),
            "pre_processed": pre_processed}
