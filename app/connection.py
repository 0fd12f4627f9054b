"""The connections every page shares, cached once per server process, and the Redis-down banner.

Redis clients are lazy and reconnect by themselves, so one cached client per URL survives a Redis restart; the
banner's fragment pings every few seconds and reruns the page once Redis answers again.
"""
from __future__ import annotations

import redis
import streamlit as st

from app.defaults import REDIS_RECONNECT_SECONDS
from worker.api import (
    ArtifactStore,
    RedisUnavailableError,
    check,
    connect,
    redis_url,
    store_url,
)

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, RedisUnavailableError)
"""What "Redis is unreachable" looks like to a page (a refused password is a ConnectionError too)."""


@st.cache_resource(max_entries=4, show_spinner=False)
def _client(url: str) -> redis.Redis:
    return connect(url)


@st.cache_resource(max_entries=4, show_spinner=False)
def _store(url: str) -> ArtifactStore:
    return ArtifactStore(url)


def artifact_store() -> ArtifactStore:
    """The artifact store of `worker.api.store_url()` (ARTIFACTS_DIR, read on every call: tests and honcho point it
    elsewhere)."""
    return _store(store_url())


def try_redis() -> tuple[redis.Redis | None, str | None]:
    """(checked client, None), or (None, why not)."""
    try:
        conn = _client(redis_url())
        check(conn)
        return conn, None
    except (RedisUnavailableError, redis.exceptions.RedisError) as err:
        return None, str(err)


def require_redis() -> redis.Redis:
    """A checked client; otherwise the banner is drawn and the page stops there (no traceback)."""
    conn, err = try_redis()
    if conn is None:
        redis_down(err or "unknown error")
        st.stop()
    return conn


def redis_down(message: str) -> None:
    """The banner: what failed, that jobs are safe, and a reconnect loop that reruns the page when Redis is back."""
    st.error(
        f"**Redis is unreachable.** {message}\n\n"
        "Jobs already submitted are kept by Redis and the workers; nothing can be listed or submitted until it is "
        f"back. This page retries every {REDIS_RECONNECT_SECONDS:g} s and recovers by itself.",
        icon=":material/cloud_off:",
    )
    st.session_state["redis:checks"] = 0
    _reconnect()


@st.fragment(run_every=REDIS_RECONNECT_SECONDS)
def _reconnect() -> None:
    checks = st.session_state.get("redis:checks", 0) + 1
    st.session_state["redis:checks"] = checks
    if checks == 1:  # drawn with the banner: the failure was just seen
        return
    conn, _ = try_redis()
    if conn is not None:
        st.rerun()
    st.caption(f"Still unreachable after {checks - 1} retr{'y' if checks == 2 else 'ies'}.")
