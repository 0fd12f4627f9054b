"""Row 5: ONNX Runtime FP32 vs PyTorch eager (batch 1 and 32; SimpleCNN and ResNet-18 at 32 and 224 px), ≥ 1.5× at
batch 1; ORT static INT8 vs ORT FP32 at 224 px, ≥ 2×."""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tests.bench.harness import Row, Section, log


def _time_interleaved(fns: dict[str, Callable[[], Any]], budget_s: float, max_runs: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while len(next(iter(times.values()))) < max_runs and (time.perf_counter() - start < budget_s
                                                          or len(next(iter(times.values()))) < 3):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_inference(quick: bool) -> list[Row]:
    from core.export import export_onnx, ort_session, quantize_int8, trace_model
    from core.models import create_model

    cases = [("simple_cnn", 32), ("simple_cnn", 224), ("resnet18", 32), ("resnet18", 224)]
    if quick:
        cases = [("simple_cnn", 32), ("resnet18", 224)]
    rows: list[Row] = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        for name, size in cases:
            torch.manual_seed(0)
            model = create_model(name, 10, in_chans=3, image_size=size).eval()
            example = torch.randn(2, 3, size, size)
            path = Path(tmp) / f"{name}-{size}.onnx"
            t = time.perf_counter()
            program, _ = trace_model(model, example)
            info = export_onnx(model, program, example, path, 18)
            fp32 = ort_session(path)
            log(f"row 5: exported {name} @ {size} px in {time.perf_counter() - t:.1f} s ({info['exporter']})")
            int8 = None
            if size == 224:
                calib = rng.standard_normal((32, 3, size, size)).astype(np.float32)
                quantize_int8(path, Path(tmp) / f"{name}-{size}.int8.onnx", calib, Path(tmp))
                int8 = ort_session(Path(tmp) / f"{name}-{size}.int8.onnx")
            for batch in (1, 32):
                x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
                xt = torch.from_numpy(x)
                fns: dict[str, Callable[[], Any]] = {
                    "eager": lambda m=model, xt=xt: _eager(m, xt),
                    "ort": lambda s=fp32, x=x: s.run(["logits"], {"input": x}),
                }
                if int8 is not None:
                    fns["int8"] = lambda s=int8, x=x: s.run(["logits"], {"input": x})
                heavy = size == 224 and batch == 32
                med = _time_interleaved(fns, budget_s=(4 if quick else 10) if heavy else 3, max_runs=200)
                ms = ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in med.items())
                rows.append(Row(f"ORT FP32 vs eager, {name} {size} px, batch {batch}", med["eager"] / med["ort"],
                                1.5 if batch == 1 else None, "×", note=ms))
                if int8 is not None:
                    rows.append(Row(f"ORT INT8 vs ORT FP32, {name} {size} px, batch {batch}", med["ort"] / med["int8"],
                                    2.0, "×", note=ms))
    return rows


def _eager(model: nn.Module, x: torch.Tensor) -> Any:
    with torch.inference_mode():
        return model(x)


SECTION = Section("inference", "row 5", bench_inference, (
    Row("ORT FP32 vs eager, batch 1", None, 1.5, "×"), Row("ORT INT8 vs ORT FP32, 224 px", None, 2.0, "×")))
