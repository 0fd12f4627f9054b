"""`python -m worker serve MODEL_REF --host H --port P`: one model version served in the foreground (uvicorn).

`MODEL_REF` is `NAME` (the latest version when the server starts), `NAME:VERSION`, or `NAME@ALIAS`: then the server
follows the alias, loading the version it moves to in the background and swapping it in between batches, so no
request fails or waits for the load. Off loopback a bearer token is required: `SERVE_TOKEN`, or one the server makes
and prints once.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.util
import os
import secrets
import sys
from collections.abc import AsyncIterator
from typing import Any

import redis

from worker.artifacts import ArtifactStore
from worker.connection import is_loopback
from worker.models import ModelRef, parse_ref, resolve
from worker.serving import model as loader
from worker.serving.app import ModelHolder, create_app
from worker.serving.limits import Limits
from worker.serving.tokens import TOKEN_ENV, Authorizer, FixedToken, LiveTokens

ALIAS_POLL_SECONDS = 0.5
"""How often a server that follows an alias reads it (a move is served within this plus the new version's load)."""



@dataclasses.dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch: int = 32
    max_delay_ms: float = 0.0
    use_gpu: bool = False
    instances: int | None = None
    """Model runs at once (None: worker/serving/model.py `instances`, from the device and the cores)."""
    token: str | None = None
    deployment: str | None = None
    """A managed deployment's id: its tokens (read from Redis, rotated and revoked live) replace `token`."""


def required_token(host: str, given: str | None) -> tuple[str | None, bool]:
    """(token, made): a loopback server needs none (unless given); elsewhere the given one, SERVE_TOKEN, or a new one."""
    token = given or os.environ.get(TOKEN_ENV, "").strip() or None
    if token or is_loopback(host):
        return token, False
    return secrets.token_urlsafe(24), True


def authorizer(conn: redis.Redis, options: ServeOptions) -> Authorizer | None:
    """A deployment's live tokens, the fixed token, or None (a loopback server without a token)."""
    if options.deployment:
        from worker.deployments import accepted_digests

        return LiveTokens(functools.partial(accepted_digests, conn, options.deployment))
    return FixedToken(options.token) if options.token else None


async def follow_alias(conn: redis.Redis, ref: ModelRef, holder: ModelHolder, store: ArtifactStore,
                       use_gpu: bool) -> None:
    """Swap in the version the alias points at whenever it moves (a failed load keeps the current version)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(ALIAS_POLL_SECONDS)
        try:
            version = await loop.run_in_executor(None, resolve, conn, ref)
            if version.version == holder.model.version.version:
                continue
            model = await loop.run_in_executor(None, functools.partial(loader.load, version, store, use_gpu=use_gpu,
                                                                       instances=holder.instances))
        except Exception as err:  # noqa: BLE001 - Redis away, a version removed: keep serving what we have
            print(f"alias {ref}: keeping version {holder.model.version.version}: {err}", file=sys.stderr, flush=True)
            continue
        holder.swap(model)
        print(f"alias {ref} moved: now serving {version.ref}", flush=True)


def build(conn: redis.Redis, ref_text: str, options: ServeOptions, store: ArtifactStore | None = None) -> Any:
    """(ASGI app, holder, lifespan-aware app) for `ref_text`; ModelError when the reference does not resolve."""
    store = store or ArtifactStore()
    ref = parse_ref(ref_text)
    version = resolve(conn, ref)
    runs = options.instances or loader.instances(options.use_gpu)
    holder = ModelHolder(loader.load(version, store, use_gpu=options.use_gpu, instances=runs),
                         max_batch=options.max_batch, max_delay=options.max_delay_ms / 1000.0, instances=runs)
    app = create_app(holder, auth=authorizer(conn, options), limits=Limits())

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(follow_alias(conn, ref, holder, store, options.use_gpu)) \
            if ref.alias else None
        yield
        if task:
            task.cancel()

    app.router.lifespan_context = lifespan
    return app, holder


def serve(conn: redis.Redis, ref_text: str, options: ServeOptions) -> int:
    import uvicorn

    options.token, made = (None, False) if options.deployment else required_token(options.host, options.token)
    app, holder = build(conn, ref_text, options)
    url = f"http://{options.host}:{options.port}"
    http, loop = http_stack()
    print(f"serving {holder.model.version.ref} ({holder.model.version.deploy}) as model {holder.model.name!r} at "
          f"{url} (Open Inference Protocol v2: {url}/v2/models/{holder.model.name}; {holder.instances} model "
          f"instance(s); HTTP {http}, loop {loop})",
          flush=True)
    if made:
        print(f"bearer token (shown once; set {TOKEN_ENV} to choose your own): {options.token}", flush=True)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning", access_log=False, http=http, loop=loop)
    return 0


def http_stack() -> tuple[str, str]:
    """(uvicorn's HTTP parser, its event loop): httptools and uvloop (requirements.txt) where installed, else uvicorn's
    pure-Python h11 and asyncio's own loop, which serve the same requests more slowly.

    Named rather than left to uvicorn's "auto", so that the choice is this module's and the start-up line says which
    ran. Measured side by side under ab on 2 shared cores (ResNet-18 at 16 px): the server's CPU per request 0-0.7 ms
    lower with httptools and uvloop (7.9 against 8.6 ms without batching at 32 clients); the latencies moved
    with the machine's load (6-13) more than with the parser (docs/benchmarks.md "Serving")."""
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return http, loop
