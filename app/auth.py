"""Optional dashboard login: a shared password, or Streamlit's OIDC login (`st.login`).

- Shared password: env `DASHBOARD_PASSWORD`, else `dashboard_password` in `.streamlit/secrets.toml`. Every session
  must type it once; the comparison is constant-time and the password is never shown or logged.
- OIDC: an `[auth]` section in `.streamlit/secrets.toml` (redirect_uri, cookie_secret, client_id, client_secret,
  server_metadata_url; see Streamlit's `st.login` docs) turns on "Log in" with that identity provider.
- Neither: no login. That is allowed only while the dashboard listens on loopback (the default, 127.0.0.1): an
  exposed one (`DASHBOARD_ADDRESS=0.0.0.0` or any other non-loopback address) refuses to start without a login unless
  `DASHBOARD_ALLOW_OPEN=1` says so (`exposure_refusal`, checked by `python -m app` before the server starts and by
  the entry page on every run, for a `streamlit run` started by hand).
"""
from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Any

import streamlit as st

from app.defaults import ADDRESS_ENV, ALLOW_OPEN_ENV

PASSWORD_ENV = "DASHBOARD_PASSWORD"
"""Environment variable holding the shared dashboard password (empty or unset: no password)."""

PASSWORD_SECRET = "dashboard_password"
"""Key in Streamlit secrets holding the shared password, used when the environment variable is unset."""

_OK = "auth:ok"

_SIGNED_IN: dict[str, None] = {}
"""Ids of this server's sessions that have signed in (insertion-ordered; app/gate.py lets only them upload)."""
_SIGNED_IN_MAX = 10_000
"""Most session ids remembered; the oldest is forgotten first (it must sign in again to upload)."""


def _session_id() -> str | None:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx.session_id if ctx else None


def _mark_signed_in(signed_in: bool) -> None:
    sid = _session_id()
    if sid is None:
        return
    if not signed_in:
        _SIGNED_IN.pop(sid, None)
        return
    _SIGNED_IN[sid] = None
    while len(_SIGNED_IN) > _SIGNED_IN_MAX:
        _SIGNED_IN.pop(next(iter(_SIGNED_IN)))


def session_signed_in(session_id: str) -> bool:
    """Whether the session with this id has signed in (and not logged out) on this server."""
    return session_id in _SIGNED_IN


def _log_out() -> None:
    st.session_state.pop(_OK, None)
    _mark_signed_in(False)


def _secret(key: str) -> Any:
    try:
        return st.secrets.get(key)
    except Exception:  # noqa: BLE001 - no secrets.toml at all is the common case, and not an error
        return None


def shared_password() -> str | None:
    return os.environ.get(PASSWORD_ENV, "").strip() or (str(_secret(PASSWORD_SECRET) or "").strip() or None)


def oidc_configured() -> bool:
    return bool(_secret("auth"))


def login_configured() -> bool:
    """A shared password or OIDC sign-in is set up (every session must sign in before a page is drawn)."""
    return bool(shared_password()) or oidc_configured()


def is_loopback(address: str | None) -> bool:
    """Whether a listening address is reachable from this machine only. None or "" is Streamlit's default: every
    interface."""
    if not address:
        return False
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: whatever it resolves to, it is meant to be reached from elsewhere
        return False


def open_allowed() -> bool:
    return os.environ.get(ALLOW_OPEN_ENV, "").strip().lower() in ("1", "true", "yes")


def exposure_refusal(address: str | None) -> str | None:
    """Why the dashboard must not serve on `address` (None: it may): exposed beyond loopback with no login and no
    explicit `DASHBOARD_ALLOW_OPEN=1`. The message says how to do each of the three fixes."""
    if is_loopback(address) or login_configured() or open_allowed():
        return None
    if not address:
        where = "every interface (no server.address set)"
    else:
        where = f"{address} (every interface)" if address in ("0.0.0.0", "::") else address
    return (
        f"Refusing to serve the dashboard on {where} without a login: anyone who can reach this machine could submit "
        "jobs, use its GPUs and download every model and dataset. Do one of these:\n"
        "- set a shared password: `DASHBOARD_PASSWORD=...` in the environment (or `dashboard_password = \"...\"` in "
        ".streamlit/secrets.toml);\n"
        "- or set up single sign-on: an `[auth]` section in .streamlit/secrets.toml (OIDC, see README "
        "\"Dashboard access\");\n"
        f"- or listen on loopback only: unset `{ADDRESS_ENV}` (default 127.0.0.1) and reach it through an SSH tunnel "
        "(`ssh -L 8501:127.0.0.1:8501 HOST`) or a proxy that logs users in;\n"
        f"- or, on a network you trust completely, say so: `{ALLOW_OPEN_ENV}=1`."
    )


def require_login() -> bool:
    """True when this session may see the dashboard; otherwise the login form is drawn and False returned."""
    if oidc_configured():
        if st.user.get("is_logged_in"):  # (a mapping: the key is absent where Streamlit has no auth context)
            _mark_signed_in(True)
            st.sidebar.button("Log out", on_click=st.logout)
            return True
        _mark_signed_in(False)
        st.title("Sign in")
        st.button("Log in", on_click=st.login, type="primary")
        return False
    password = shared_password()
    if not password or st.session_state.get(_OK):
        if password:
            _mark_signed_in(True)
            st.sidebar.button("Log out", on_click=_log_out)
        return True
    _mark_signed_in(False)  # every run that shows the form (after a log-out too) closes the upload gate
    st.title("Sign in")
    with st.form("auth:form"):
        typed = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        if hmac.compare_digest(typed.encode(), password.encode()):
            st.session_state[_OK] = True
            st.rerun()
        st.error("Wrong password.")
    return False
