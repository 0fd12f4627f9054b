"""PyTorch → ONNX: torch.export (the program saved as model.pt2), the ONNX exporters, and the ONNX contract check."""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import ExportError


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """The exporters print progress and warnings; keep them out of the run's log unless something fails."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield buf


def trace_model(model: nn.Module, example: torch.Tensor) -> tuple[Any, str | None]:
    """torch.export with a dynamic batch axis → (ExportedProgram, None) or (None, why it failed)."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with quiet():
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
            with quiet():
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
        with quiet():
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
