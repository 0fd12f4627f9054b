"""The inference server: the Open Inference Protocol (KServe v2) over HTTP, plus `classify` and `/metrics`.

Routes (README "Models and deployments"):
- `GET /v2/health/live`, `GET /v2/health/ready` (open, for probes); `GET /v2` (server metadata);
- `GET /v2/models/NAME[/versions/V]` (inputs, outputs, datatypes, shapes), `GET /v2/models/NAME/ready`;
- `POST /v2/models/NAME[/versions/V]/infer`: JSON `{"inputs": [{"name", "shape", "datatype": "FP32", "data"}]}`, the
  preprocessed batch (preprocess.json's size and normalisation), answering the logits;
- `POST /v2/models/NAME/classify`: multipart field `files` (one or more images), optional `top_k`; answers
  predict.py's JSON: `[{"file", "top": [{"label", "prob"}]}]`;
- `GET /metrics`: Prometheus text (requests, errors, latency, batch sizes, queue depth).

A bad request gets a 4xx with `{"error": reason}` and never takes the server down. With a token, every route but the
health probes needs `Authorization: Bearer TOKEN` (worker/serving/tokens.py: a fixed one, or a deployment's). The
model is held by a `ModelHolder`, which can swap in another version (an alias that moved) while requests run: each
request keeps the model it started with.
"""
from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from worker.serving.batcher import DynamicBatcher
from worker.serving.limits import Limits
from worker.serving.model import BadInput, LoadedModel
from worker.serving.tokens import Authorizer

OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
"""Routes answered without a token (load balancers and probes)."""


class ModelHolder:
    """The model being served and its batcher; `swap` replaces both for new requests (a moved alias), while requests
    already queued finish on the model they were checked against."""

    def __init__(self, model: LoadedModel, *, max_batch: int, max_delay: float) -> None:
        self.max_batch, self.max_delay = max_batch, max_delay
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self.on_batch: Callable[[int], None] | None = None
        self.model = model
        self.batcher = self._batcher(model)

    def _batcher(self, model: LoadedModel) -> DynamicBatcher:
        return DynamicBatcher(model.infer, max_batch=self.max_batch, max_delay=self.max_delay, pool=self.pool,
                              on_batch=lambda n: self.on_batch(n) if self.on_batch else None)

    def swap(self, model: LoadedModel) -> None:
        old = self.batcher
        self.model, self.batcher = model, self._batcher(model)
        old.retire()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _tensor(spec: Any, model: LoadedModel, limits: Limits) -> np.ndarray:
    """The request's input tensor as float32 N×C×H×W, or BadInput naming what is wrong."""
    if not isinstance(spec, dict):
        raise BadInput("each entry of 'inputs' must be an object with name, shape, datatype and data")
    if spec.get("datatype") != "FP32":
        raise BadInput(f"datatype {spec.get('datatype')!r} is not supported; send FP32")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) != 4:
        raise BadInput(f"shape must be [N, C, H, W] of whole numbers, got {shape!r}")
    if shape[0] < 1 or shape[0] > limits.max_rows:
        raise BadInput(f"a request carries 1 to {limits.max_rows} samples, got {shape[0]}")
    try:
        x = np.asarray(spec.get("data"), dtype=np.float32)
    except (TypeError, ValueError):
        raise BadInput("data must be numbers (a flat list, or nested as the shape)") from None
    if x.size != int(np.prod(shape)):
        raise BadInput(f"data has {x.size} values; shape {shape} needs {int(np.prod(shape))}")
    x = x.reshape(shape)
    model.check_input(x)
    if not np.isfinite(x).all():
        raise BadInput("data holds NaN or infinity")
    return x


def create_app(holder: ModelHolder, *, auth: Authorizer | None, limits: Limits) -> Starlette:
    """The server's routes; `auth` None: no token asked (a loopback `serve` without one)."""
    registry = CollectorRegistry()
    requests = Counter("inference_requests", "Requests by route and status", ["route", "status"],
                       registry=registry)
    latency = Histogram("inference_request_seconds", "Request latency", ["route"], registry=registry,
                        buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
    batch_sizes = Histogram("inference_batch_size", "Samples per model run", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    depth = Gauge("inference_queue_depth", "Requests waiting for a batch", registry=registry)
    depth.set_function(lambda: holder.batcher.depth())
    holder.on_batch = batch_sizes.observe

    def measured(route: str, handler: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
        async def run(request: Request) -> Response:
            started = time.perf_counter()
            if auth is not None and request.url.path not in OPEN_PATHS:
                if not await auth.allows(request.headers.get("authorization", "")):
                    requests.labels(route, "401").inc()
                    return _error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
            length = int(request.headers.get("content-length") or 0)
            if length > limits.max_body_bytes:
                requests.labels(route, "413").inc()
                return _error(413, f"the request is {length:,} bytes; at most {limits.max_body_bytes:,}")
            try:
                response = await handler(request)
            except BadInput as err:
                response = _error(400, str(err))
            except _NotFound as err:
                response = _error(404, str(err))
            latency.labels(route).observe(time.perf_counter() - started)
            requests.labels(route, str(response.status_code)).inc()
            return response
        return run

    def model_for(request: Request) -> LoadedModel:
        model = holder.model
        name = request.path_params.get("name")
        if name != model.name:
            raise _NotFound(f"no model {name!r} here (this server serves {model.name!r})")
        version = request.path_params.get("version")
        if version is not None and version != str(model.version.version):
            raise _NotFound(f"{model.name} version {version} is not served (serving version {model.version.version})")
        return model

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def server_meta(request: Request) -> Response:
        return JSONResponse({"name": "image-classifier", "version": "2", "extensions": ["classify", "metrics"]})

    async def metadata(request: Request) -> Response:
        model = model_for(request)
        c, h, w = model.input_shape
        return JSONResponse({
            "name": model.name, "versions": [str(model.version.version)], "platform": "onnxruntime_onnx",
            "inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [-1, c, h, w]}],
            "outputs": [{"name": model.output_name, "datatype": "FP32", "shape": [-1, len(model.labels)]}],
            "parameters": {"labels": model.labels, "preprocess": model.version.preprocess,
                           "file": model.version.deploy}})

    async def model_ready(request: Request) -> Response:
        model = model_for(request)
        return JSONResponse({"name": model.name, "ready": True})

    async def infer(request: Request) -> Response:
        model, batcher = model_for(request), holder.batcher
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadInput("the body is not JSON (the Open Inference Protocol's JSON request)") from None
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if not isinstance(inputs, list) or len(inputs) != 1:
            raise BadInput(f"'inputs' must be a list of one tensor (the model's input {model.input_name!r})")
        x = _tensor(inputs[0], model, limits)
        logits = await batcher.run(x)
        return JSONResponse({
            "model_name": model.name, "model_version": str(model.version.version), "id": body.get("id"),
            "outputs": [{"name": model.output_name, "datatype": "FP32", "shape": list(logits.shape),
                         "data": logits.astype(np.float32).ravel().tolist()}]})

    async def classify(request: Request) -> Response:
        model, batcher = model_for(request), holder.batcher
        try:
            # one file over the limit still parses, so that the count check below names it; more stop the parser
            form = await request.form(max_files=limits.max_images + 1, max_fields=16,
                                      max_part_size=limits.max_body_bytes)
        except Exception as err:  # noqa: BLE001 - the multipart parser's own errors (too many files, malformed)
            detail = getattr(err, "detail", None) or str(err)
            raise BadInput(f"the multipart form was refused: {detail} (at most {limits.max_images} images per "
                           "request, in the field 'files')") from None
        files = form.getlist("files")
        if not files:
            raise BadInput("send one or more images in the multipart field 'files'")
        if len(files) > limits.max_images:
            raise BadInput(f"{len(files)} images; at most {limits.max_images} per request")
        try:
            k = int(form.get("top_k") or request.query_params.get("top_k") or 5)
        except ValueError:
            raise BadInput("top_k must be a whole number") from None
        k = max(1, min(k, len(model.labels)))
        names, rows = [], []
        for f in files:
            if isinstance(f, str):
                raise BadInput("'files' must be file uploads, not text fields")
            rows.append(model.image_tensor(await f.read(), f.filename or "image", limits.max_pixels))
            names.append(f.filename or "image")
        logits = await batcher.run(np.stack(rows))
        return JSONResponse([{"file": n, "top": top} for n, top in zip(names, model.top_k(logits, k))])

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v2/health/live", measured("live", live)),
        Route("/v2/health/ready", measured("ready", ready)),
        Route("/v2", measured("server", server_meta)),
        Route("/v2/models/{name}", measured("metadata", metadata)),
        Route("/v2/models/{name}/versions/{version}", measured("metadata", metadata)),
        Route("/v2/models/{name}/ready", measured("model_ready", model_ready)),
        Route("/v2/models/{name}/infer", measured("infer", infer), methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", measured("infer", infer), methods=["POST"]),
        Route("/v2/models/{name}/classify", measured("classify", classify), methods=["POST"]),
        Route("/metrics", measured("metrics", metrics)),
    ]
    return Starlette(routes=routes)


class _NotFound(Exception):
    """A model name or version this server does not serve (404)."""
