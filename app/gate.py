"""The dashboard's front door, an ASGI middleware in front of every request Streamlit serves (`app/asgi.py`).

- **Host check** (DNS rebinding): a web page whose name re-resolves to 127.0.0.1 could otherwise drive a loopback
  dashboard, which needs no login. A request (page, assets, API or websocket) is served only when its `Host` is an IP
  address, `localhost`, or a name listed in `DASHBOARD_HOSTS` (comma-separated; `*.example.com` matches its
  subdomains). This is Jupyter's rule: a rebinding attack always arrives under the attacker's own name.
- **No upload before sign-in**: Streamlit's upload route is refused for a session that has not passed the sign-in
  (`app.auth` records the sessions that have; with no login configured every session passes on its first run), so
  nothing is read into memory for it.
"""
from __future__ import annotations

import ipaddress
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from app.defaults import HOSTS_ENV

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

UPLOAD_PREFIX = "/_stcore/upload_file/"
"""Streamlit's upload route: /_stcore/upload_file/{session_id}/{file_id}."""


def configured_hosts() -> list[str]:
    """DASHBOARD_HOSTS as lower-case names (`*.example.com` patterns kept)."""
    raw = os.environ.get(HOSTS_ENV, "")
    return [h.strip().lower().rstrip(".") for h in raw.split(",") if h.strip()]


def host_allowed(host: str | None, names: list[str]) -> bool:
    """Whether a Host header may reach the dashboard: an IP literal, localhost, or one of `names`."""
    if not host:
        return False
    try:
        hostname = urlsplit(f"//{host}").hostname
    except ValueError:
        return False
    if not hostname:
        return False
    hostname = hostname.lower().rstrip(".")
    if hostname == "localhost":
        return True
    try:
        ipaddress.ip_address(hostname)
        return True
    except ValueError:
        pass
    return any(hostname == n or (n.startswith("*.") and hostname.endswith(n[1:])) for n in names)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class Gate:
    """ASGI middleware: the Host check and the upload gate (module docstring)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.names = configured_hosts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = _header(scope, b"host")
        if not host_allowed(host, self.names):
            return await self._refuse(scope, send, 400, f"Host {host!r} is not allowed: open the dashboard by its "
                                      f"IP address or localhost, or add the name to {HOSTS_ENV}")
        if scope["type"] == "http" and scope.get("path", "").startswith(UPLOAD_PREFIX):
            from app.auth import session_signed_in

            session_id = scope["path"][len(UPLOAD_PREFIX):].split("/", 1)[0]
            if not session_signed_in(session_id):
                return await self._refuse(scope, send, 403, "sign in before uploading")
        return await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
        if scope["type"] == "websocket":  # closing before accepting makes the server answer the handshake with 403
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        body = (message + "\n").encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
