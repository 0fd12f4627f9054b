"""Downloads streamed from the artifact store: a route of the dashboard's ASGI app (`app/asgi.py`), not
`st.download_button`, which reads the whole file into the server's memory (an ONNX model, a bundle or a checkpoint can
be gigabytes, and every click of every viewer would hold a copy).

The page asks for a link with `download_url(job, name)`: an unguessable grant (a random token, kept in this server
process) for that session, job and file. `GET /download/<job>/<name>?grant=<token>` then checks, in order: the grant
exists and names this job and file; when a login is configured, its session is still signed in (app/auth.py: logging
out ends every link the session was given, as it ends its uploads); the job id is well formed and the name is one of
the job's files (`worker.api.open_artifact`: only names its listing produced reach the filesystem, so no path escapes
the run folder). The file is then sent in DOWNLOAD_CHUNK_BYTES pieces, each read when the client has taken the one
before (the server's send waits for the socket to drain), so the server holds a few chunks whatever the file's size.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import threading
import time
from collections.abc import Iterator
from typing import IO
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from app.defaults import DOWNLOAD_CHUNK_BYTES, DOWNLOAD_GRANT_SECONDS, DOWNLOAD_GRANTS_MAX
from worker.api import NAMED_ARTIFACTS, ArtifactError, ArtifactStore, NoSuchJobError, open_artifact, store_url

DOWNLOAD_PREFIX = "/download"
"""Path of the download route: /download/<job id>/<file name>?grant=<token>."""


@dataclasses.dataclass(frozen=True)
class Grant:
    """What one link may fetch, for whom, until when."""

    session_id: str
    job: str
    name: str
    expires: float


_GRANTS: dict[str, Grant] = {}
"""Token → grant, oldest first (bounded by DOWNLOAD_GRANTS_MAX)."""
_BY_KEY: dict[tuple[str, str, str], str] = {}
"""(session, job, name) → its current token: a page's reruns reuse one link instead of minting new ones."""
_LOCK = threading.Lock()


def _session_id() -> str | None:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx.session_id if ctx else None


def grant(session_id: str, job: str, name: str) -> str:
    """A token letting `session_id` fetch `name` of `job` for DOWNLOAD_GRANT_SECONDS (reused while it has over half
    of that left)."""
    now = time.monotonic()
    with _LOCK:
        token = _BY_KEY.get((session_id, job, name))
        held = _GRANTS.get(token) if token else None
        if held is not None and held.expires - now > DOWNLOAD_GRANT_SECONDS / 2:
            return token  # type: ignore[return-value]
        token = secrets.token_urlsafe(24)
        _GRANTS[token] = Grant(session_id, job, name, now + DOWNLOAD_GRANT_SECONDS)
        _BY_KEY[(session_id, job, name)] = token
        while len(_GRANTS) > DOWNLOAD_GRANTS_MAX:
            old = _GRANTS.pop(next(iter(_GRANTS)))
            _BY_KEY.pop((old.session_id, old.job, old.name), None)
        return token


def download_url(job: str, name: str) -> str:
    """The link a page shows for one of `job`'s files (`name`: a short name such as `onnx`, or a listed path)."""
    token = grant(_session_id() or "", job, name)
    return f"{DOWNLOAD_PREFIX}/{quote(job)}/{quote(name)}?grant={token}"


def _refusal(request: Request) -> str | None:
    """Why this request may not download (None: it may)."""
    from app.auth import login_configured, session_signed_in

    job, name = request.path_params["job"], request.path_params["name"]
    held = _GRANTS.get(request.query_params.get("grant") or "")
    if held is None or held.expires < time.monotonic() or (held.job, held.name) != (job, name):
        return "this download link is not valid (expired, or from another server start): reload the page"
    if login_configured() and not session_signed_in(held.session_id):
        return "sign in to download"
    return None


def _size(fh: IO[bytes]) -> int | None:
    size = getattr(fh, "size", None)  # fsspec files know it
    if isinstance(size, int):
        return size
    try:
        return os.fstat(fh.fileno()).st_size
    except (OSError, AttributeError, ValueError):
        return None


def _chunks(fh: IO[bytes]) -> Iterator[bytes]:
    """The file in pieces; Starlette runs this in its thread pool, one piece per send."""
    try:
        while chunk := fh.read(DOWNLOAD_CHUNK_BYTES):
            yield chunk
    finally:
        fh.close()


async def download(request: Request) -> Response:
    """The route: the checks in the module docstring, then the file as an attachment, streamed."""
    if why := _refusal(request):
        return PlainTextResponse(why + "\n", status_code=403)
    job, name = request.path_params["job"], request.path_params["name"]
    try:
        fh = open_artifact(job, name, store=ArtifactStore(store_url()))
    except (ArtifactError, NoSuchJobError, OSError) as err:
        return PlainTextResponse(f"{err}\n", status_code=404)
    filename = f"{job}-{NAMED_ARTIFACTS.get(name, name).rsplit('/', 1)[-1]}"
    headers = {"content-disposition": f"attachment; filename*=UTF-8''{quote(filename)}",
               "cache-control": "no-store"}
    if (size := _size(fh)) is not None:
        headers["content-length"] = str(size)
    return StreamingResponse(_chunks(fh), media_type="application/octet-stream", headers=headers)


_MOUNTED: list[bool] = []
"""Non-empty once app/asgi.py took the route (this process serves it)."""


def routes() -> list[Route]:
    """What app/asgi.py mounts next to Streamlit's own routes."""
    _MOUNTED.append(True)
    return [Route(DOWNLOAD_PREFIX + "/{job}/{name:path}", download, methods=["GET"])]


def streamed() -> bool:
    """Whether this server has the download route: `python -m app` (app/asgi.py) does; a plain `streamlit run
    app/streamlit_app.py` and AppTest do not, and the pages then fall back to Streamlit's download button."""
    return bool(_MOUNTED)
