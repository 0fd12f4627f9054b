"""The infer request and response of the Open Inference Protocol (KServe v2) over HTTP, in JSON or with the binary
tensor data extension.

JSON: `{"id", "inputs": [{"name", "shape", "datatype": "FP32", "data": [...]}], "outputs"?, "parameters"?}`, answered
with the logits in `outputs[0].data`.

Binary tensor data (the extension KServe and Triton document, and what Triton's Python client `tritonclient.http`
sends by default): the header `Inference-Header-Content-Length: N` says the body's first N bytes are the JSON request,
in which the input carries `"parameters": {"binary_data_size": B}` instead of `data`; its B bytes of raw little-endian
FP32 follow the JSON. The answer is binary the same way when the request asks for it (`parameters.binary_data_output`,
or `binary_data` in a requested output's parameters), else JSON. It spares the server the JSON decode of every
number, which standard clients already avoid.

JSON is parsed with orjson (0.03 ms for a request of 768 floats on this project's CPU, where the standard library's
`json` took 0.45 ms: a quarter of the server's own time per request, docs/benchmarks.md "Serving"); a body orjson
refuses is read again by `json`, which also takes NaN and Infinity, so that the answer names what is wrong.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import orjson

from worker.serving.limits import Limits
from worker.serving.model import BadInput, LoadedModel

HEADER_LENGTH = "inference-header-content-length"
"""HTTP header of the binary extension: the length in bytes of the JSON part at the start of the body."""

BINARY_CONTENT_TYPE = "application/octet-stream"
"""Content type of a binary answer (JSON part, then raw tensor bytes)."""


@dataclasses.dataclass
class InferRequest:
    """A decoded infer request: the input batch and how the client wants the answer."""
    x: np.ndarray
    """float32 N×C×H×W, checked against the model."""
    id: Any
    binary_output: bool
    """Answer with the binary extension (the client asked for it)."""


def parse_json(raw: bytes) -> Any:
    """JSON `raw` parsed by orjson, or, where orjson refuses it, by `json` (NaN, Infinity; its errors for the rest)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def _dumps(answer: dict[str, Any]) -> bytes:
    """`answer` as JSON by orjson, or by `json` for what orjson refuses (a request id beyond 64-bit integers)."""
    try:
        return orjson.dumps(answer)
    except orjson.JSONEncodeError:
        return json.dumps(answer, separators=(",", ":")).encode()


def _json_part(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """(the JSON request, the binary bytes after it: empty without the extension's header)."""
    split = len(body)
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            split = -1
        if not 0 <= split <= len(body):
            raise BadInput(f"Inference-Header-Content-Length {header_length!r} must be a whole number from 0 to the "
                           f"body's {len(body)} bytes")
    try:
        request = parse_json(body[:split])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput("the body is not JSON (the Open Inference Protocol's JSON request, or its JSON part as long as "
                       "Inference-Header-Content-Length says)") from None
    if not isinstance(request, dict):
        raise BadInput("the request must be a JSON object with 'inputs'")
    return request, body[split:]


def _shape(spec: dict[str, Any], limits: Limits) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) != 4:
        raise BadInput(f"shape must be [N, C, H, W] of whole numbers, got {shape!r}")
    if shape[0] < 1 or shape[0] > limits.max_rows:
        raise BadInput(f"a request carries 1 to {limits.max_rows} samples, got {shape[0]}")
    return shape


def _tensor(spec: Any, binary: bytes, model: LoadedModel, limits: Limits) -> np.ndarray:
    """The request's input tensor as float32 N×C×H×W, or BadInput naming what is wrong."""
    if not isinstance(spec, dict):
        raise BadInput("each entry of 'inputs' must be an object with name, shape, datatype and data")
    if spec.get("datatype") != "FP32":
        raise BadInput(f"datatype {spec.get('datatype')!r} is not supported; send FP32")
    shape = _shape(spec, limits)
    count = int(np.prod(shape))
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or size != len(binary) or size != 4 * count:
            raise BadInput(f"binary_data_size {size!r}: shape {shape} in FP32 needs {4 * count} bytes, and "
                           f"{len(binary)} follow the JSON part")
        x = np.frombuffer(binary, dtype="<f4").astype(np.float32, copy=False)
    else:
        if binary:
            raise BadInput(f"{len(binary)} bytes follow the JSON part, but the input has no binary_data_size")
        try:
            x = np.asarray(spec.get("data"), dtype=np.float32)
        except (TypeError, ValueError):
            raise BadInput("data must be numbers (a flat list, or nested as the shape)") from None
        if x.size != count:
            raise BadInput(f"data has {x.size} values; shape {shape} needs {count}")
    x = x.reshape(shape)
    model.check_input(x)
    if not np.isfinite(x).all():
        raise BadInput("data holds NaN or infinity")
    return x


def _wants_binary(request: dict[str, Any], model: LoadedModel) -> bool:
    """Whether the answer should use the binary extension; BadInput for a requested output this model lacks."""
    parameters = request.get("parameters") or {}
    binary = bool(isinstance(parameters, dict) and parameters.get("binary_data_output"))
    outputs = request.get("outputs")
    if outputs is None:
        return binary
    if not isinstance(outputs, list):
        raise BadInput("'outputs' must be a list of {\"name\": ...} objects")
    for out in outputs:
        name = out.get("name") if isinstance(out, dict) else None
        if name != model.output_name:
            raise BadInput(f"output {name!r} does not exist; the model's output is {model.output_name!r}")
        params = out.get("parameters") or {}
        binary = binary or bool(isinstance(params, dict) and params.get("binary_data"))
    return binary


def decode(body: bytes, header_length: str | None, model: LoadedModel, limits: Limits) -> InferRequest:
    """The infer request in `body` (JSON, or the binary extension when `header_length` is given)."""
    request, binary = _json_part(body, header_length)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise BadInput(f"'inputs' must be a list of one tensor (the model's input {model.input_name!r})")
    return InferRequest(_tensor(inputs[0], binary, model, limits), request.get("id"), _wants_binary(request, model))


def encode(request: InferRequest, model: LoadedModel, logits: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the answer with `logits`, in the form the request asked for."""
    logits = np.ascontiguousarray(logits, dtype="<f4")
    output: dict[str, Any] = {"name": model.output_name, "datatype": "FP32", "shape": list(logits.shape)}
    answer = {"model_name": model.name, "model_version": str(model.version.version), "id": request.id,
              "outputs": [output]}
    if not request.binary_output:
        output["data"] = logits.ravel().tolist()
        return _dumps(answer), {"content-type": "application/json"}
    raw = logits.tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    head = _dumps(answer)
    return head + raw, {"content-type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(head))}
