"""Who may call an inference server: one fixed bearer token (`serve`), or a deployment's tokens, which can be rotated
and revoked while the server runs.

A deployment keeps no usable user token anywhere: Redis holds the SHA-256 of the token shown once (at deploy or
rotate) beside the dashboard's internal token (worker/deployments.py). Its server compares digests: it re-reads them
every REFRESH_SECONDS in a thread of its own (a revoked or replaced token stops working within that), and at once when
a token it does not know arrives, so a token rotated a moment ago works on its very first request.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

TOKEN_ENV = "SERVE_TOKEN"
"""Environment variable holding the bearer token of a `serve` that listens off loopback (not of a deployment)."""

REFRESH_SECONDS = 0.25
"""Seconds between a deployment server's reads of its accepted token digests (a revocation's delay)."""

BEARER = "Bearer "


def digest(token: str) -> str:
    """The SHA-256 hex of a token: what Redis keeps and servers compare."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(header: str) -> str:
    """The token of an `Authorization: Bearer TOKEN` header ("" for anything else)."""
    return header[len(BEARER):].strip() if header.startswith(BEARER) else ""


class Authorizer(Protocol):
    async def allows(self, authorization: str) -> bool:
        """Whether a request with this Authorization header may be served."""
        ...


class FixedToken:
    """`serve`'s token, given at start (SERVE_TOKEN or made and printed once); it lives as long as the server."""

    def __init__(self, token: str) -> None:
        self._digest = digest(token)

    async def allows(self, authorization: str) -> bool:
        given = bearer(authorization)
        return bool(given) and hmac.compare_digest(digest(given), self._digest)


class LiveTokens:
    """A deployment's tokens: `read()` returns the accepted digests (an empty set when revoked or gone)."""

    def __init__(self, read: Callable[[], frozenset[str]], refresh: float = REFRESH_SECONDS) -> None:
        self._read, self._accepted = read, frozenset[str]()
        self._lock = threading.Lock()
        self._refresh_now()
        threading.Thread(target=self._poll, args=(refresh,), name="tokens", daemon=True).start()

    def _refresh_now(self) -> None:
        try:
            accepted = self._read()
        except Exception as err:  # noqa: BLE001 - Redis away: keep what we knew (a revocation waits for Redis)
            log.warning("deployment tokens not refreshed: %s: %s", type(err).__name__, err)
            return
        with self._lock:
            self._accepted = accepted

    def _poll(self, refresh: float) -> None:
        while True:  # a daemon thread: it ends with the server process
            time.sleep(refresh)
            self._refresh_now()

    async def allows(self, authorization: str) -> bool:
        given = bearer(authorization)
        if not given:
            return False
        wanted = digest(given)
        if wanted in self._accepted:
            return True
        await asyncio.to_thread(self._refresh_now)  # rotated since the last read? (one Redis read, off the loop)
        return wanted in self._accepted
