"""Which exported file to deploy, and why: INT8 only when it is faster here at equal accuracy.

INT8 is not always faster: measured on this project's machines, SimpleCNN at 224 px runs 0.86-0.94× the speed of FP32
in INT8 while ResNet-18 gains 2.3-2.9× (docs/export.md). So the export decides from its own measurements on the
machine that exported: `model.int8.onnx` when its test accuracy is within DEPLOY_ACCURACY_TOLERANCE of FP32's and its
median batch-1 latency is at least DEPLOY_MIN_SPEEDUP times lower; `model.onnx` otherwise. The choice and the reason
go into report.json (`export.deploy`), the model card, the dashboard's Export tab and the default model of the
bundle's predict.py.
"""
from __future__ import annotations

import math
from typing import Any

from core import runfolder
from core.export.defaults import DEPLOY_ACCURACY_TOLERANCE, DEPLOY_MIN_SPEEDUP

DEFAULT_MODEL_LINE = 'DEFAULT_MODEL = "model.onnx"'
"""The line of core/predict_template.py that an export rewrites with the file it recommends."""


def choose_deploy(onnx_info: dict[str, Any], int8: dict[str, Any]) -> dict[str, Any]:
    """{"file", "reason", "accuracy_tolerance", "int8_speedup_batch1", "int8_accuracy_drop"} from the export's own
    FP32 and INT8 measurements (accuracy on the test split, median batch-1 latency)."""
    n = int(onnx_info.get("test_images") or 0)
    tolerance = max(DEPLOY_ACCURACY_TOLERANCE, 1.0 / n if n else 0.0)
    out: dict[str, Any] = {"file": runfolder.ONNX, "accuracy_tolerance": tolerance, "int8_speedup_batch1": None,
                           "int8_accuracy_drop": None}
    if not int8.get("ok"):
        out["reason"] = f"there is no INT8 model ({int8.get('error') or 'not produced'})"
        return out
    fp32_ms, int8_ms = onnx_info.get("latency_ms_batch1"), int8.get("latency_ms_batch1")
    speedup = fp32_ms / int8_ms if fp32_ms and int8_ms else float("nan")
    drop = float(int8.get("accuracy_drop") or 0.0)
    out.update(int8_speedup_batch1=None if math.isnan(speedup) else round(speedup, 3), int8_accuracy_drop=drop)
    timing = (f"INT8 runs {speedup:.2f}× the speed of FP32 at batch 1 ({int8_ms:.2f} vs {fp32_ms:.2f} ms, median, on "
              "the exporting machine's CPU)")
    accuracy = (f"its test accuracy is {100 * int8['accuracy']:.2f} % vs {100 * onnx_info['accuracy']:.2f} % "
                f"(drop {100 * drop:.2f} points; tolerance {100 * tolerance:.2f})")
    if drop > tolerance:
        out["reason"] = f"INT8 is less accurate: {accuracy}; {timing}"
    elif not speedup >= DEPLOY_MIN_SPEEDUP:
        out["reason"] = (f"INT8 is not faster here: {timing}, less than the {DEPLOY_MIN_SPEEDUP:.2f}× that would "
                         f"make it worth it; {accuracy}")
    else:
        out["file"] = runfolder.INT8_ONNX
        out["reason"] = f"{timing}, and {accuracy}"
    return out


def predict_script(template: str, deploy: dict[str, Any]) -> str:
    """The bundle's predict.py: the template with DEFAULT_MODEL set to the recommended file (and why, as a comment)."""
    if DEFAULT_MODEL_LINE not in template:
        raise ValueError(f"core/predict_template.py lost its line {DEFAULT_MODEL_LINE!r}")
    why = " ".join(str(deploy["reason"]).split())
    return template.replace(DEFAULT_MODEL_LINE, f"# Recommended by the export: {why}\n"
                                                f"DEFAULT_MODEL = {deploy['file']!r}", 1)
