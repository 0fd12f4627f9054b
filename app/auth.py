"""Optional dashboard login: a shared password, or Streamlit's OIDC login (`st.login`).

- Shared password: env `DASHBOARD_PASSWORD`, else `dashboard_password` in `.streamlit/secrets.toml`. Every session
  must type it once; the comparison is constant-time and the password is never shown or logged.
- OIDC: an `[auth]` section in `.streamlit/secrets.toml` (redirect_uri, cookie_secret, client_id, client_secret,
  server_metadata_url; see Streamlit's `st.login` docs) turns on "Log in" with that identity provider.
- Neither: no login (the dashboard is meant for a trusted network then; it listens where `--server.address` says).
"""
from __future__ import annotations

import hmac
import os
from typing import Any

import streamlit as st

PASSWORD_ENV = "DASHBOARD_PASSWORD"
"""Environment variable holding the shared dashboard password (empty or unset: no password)."""

PASSWORD_SECRET = "dashboard_password"
"""Key in Streamlit secrets holding the shared password, used when the environment variable is unset."""

_OK = "auth:ok"


def _secret(key: str) -> Any:
    try:
        return st.secrets.get(key)
    except Exception:  # noqa: BLE001 - no secrets.toml at all is the common case, and not an error
        return None


def shared_password() -> str | None:
    return os.environ.get(PASSWORD_ENV, "").strip() or (str(_secret(PASSWORD_SECRET) or "").strip() or None)


def oidc_configured() -> bool:
    return bool(_secret("auth"))


def require_login() -> bool:
    """True when this session may see the dashboard; otherwise the login form is drawn and False returned."""
    if oidc_configured():
        if st.user.get("is_logged_in"):  # (a mapping: the key is absent where Streamlit has no auth context)
            st.sidebar.button("Log out", on_click=st.logout)
            return True
        st.title("Sign in")
        st.button("Log in", on_click=st.login, type="primary")
        return False
    password = shared_password()
    if not password or st.session_state.get(_OK):
        if password:
            st.sidebar.button("Log out", on_click=lambda: st.session_state.pop(_OK, None))
        return True
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
