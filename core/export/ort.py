"""ONNX Runtime: sessions, parity with PyTorch, latency, and one prediction pass over a split for several models."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.export.defaults import EVAL_BATCH_SIZE, LATENCY_MAX_SECONDS, LATENCY_RUNS, LATENCY_WARMUP, PARITY_ATOL
from core.export.inputs import batches


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
