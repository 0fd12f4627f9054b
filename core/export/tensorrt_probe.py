"""TensorRT, timed only where it really exists (ONNX Runtime's TensorRT provider, else the tensorrt package)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.export.defaults import LATENCY_RUNS, LATENCY_WARMUP
from core.export.ort import latency_ms, ort_session


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
