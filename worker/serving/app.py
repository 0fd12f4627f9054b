"""The inference server: the Open Inference Protocol (KServe v2) over HTTP, plus `classify` and `/metrics`.

Routes (README "Models and deployments"):
- `GET /v2/health/live`, `GET /v2/health/ready` (open, for probes); `GET /v2` (server metadata);
- `GET /v2/models/NAME[/versions/V]` (inputs, outputs, datatypes, shapes), `GET /v2/models/NAME/ready`;
- `POST /v2/models/NAME[/versions/V]/infer`: JSON `{"inputs": [{"name", "shape", "datatype": "FP32", "data"}]}`, the
  preprocessed batch (preprocess.json's size and normalisation), answering the logits; or the same with the binary
  tensor data extension (protocol.py);
- `POST /v2/models/NAME/classify`: multipart field `files` (one or more images), optional `top_k`; answers
  predict.py's JSON: `[{"file", "top": [{"label", "prob"}]}]`;
- `GET /metrics`: Prometheus text (requests, errors, latency, batch sizes, queue depth).

A bad request gets a 4xx with `{"error": reason}` and never takes the server down. With a token, every route but the
health probes needs `Authorization: Bearer TOKEN` (worker/serving/tokens.py: a fixed one, or a deployment's). The
model is held by a `ModelHolder`, which can swap in another version (an alias that moved) while requests run: each
request keeps the model it started with.
"""
from __future__ import annotations

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

from worker.serving import protocol
from worker.serving.batcher import DynamicBatcher
from worker.serving.limits import Limits
from worker.serving.model import BadInput, LoadedModel
from worker.serving.tokens import Authorizer

OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
"""Routes answered without a token (load balancers and probes)."""


class ModelHolder:
    """The model being served and its batcher; `swap` replaces both for new requests (a moved alias), while requests
    already queued finish on the model they were checked against."""

    def __init__(self, model: LoadedModel, *, max_batch: int, max_delay: float, instances: int = 1) -> None:
        self.max_batch, self.max_delay, self.instances = max_batch, max_delay, max(1, instances)
        self.pool = ThreadPoolExecutor(self.instances, thread_name_prefix="infer")
        self.on_batch: Callable[[int], None] | None = None
        self.model = model
        self.batcher = self._batcher(model)

    def _batcher(self, model: LoadedModel) -> DynamicBatcher:
        return DynamicBatcher(model.infer, max_batch=self.max_batch, max_delay=self.max_delay, pool=self.pool,
                              runs=self.instances, on_batch=lambda n: self.on_batch(n) if self.on_batch else None)

    def swap(self, model: LoadedModel) -> None:
        old = self.batcher
        self.model, self.batcher = model, self._batcher(model)
        old.retire()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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
        return JSONResponse({"name": "image-classifier", "version": "2",
                             "extensions": ["binary_tensor_data", "classify", "metrics"]})

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
        decoded = protocol.decode(await request.body(), request.headers.get(protocol.HEADER_LENGTH), model, limits)
        logits = await batcher.run(decoded.x)
        body, headers = protocol.encode(decoded, model, logits)
        return Response(body, headers=headers)

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
