"""Who is using the dashboard: sign-in, the session's `Actor`, log-out (README "Dashboard access", "Users and roles").

How a session signs in, first match wins:
- OIDC: an `[auth]` section in `.streamlit/secrets.toml` turns on Streamlit's `st.login`. It is accepted only with an
  allow-list (e-mail addresses, domains, groups: `DASHBOARD_ALLOWED_EMAILS` / `_DOMAINS` / `_GROUPS`, or the
  `[access]` section of secrets.toml); without one the dashboard refuses to start (`access_refusal`). A signed-in
  address not on the list sees "not allowed" and nothing else. A registered user (found by e-mail) gets their role,
  another allowed person `DASHBOARD_DEFAULT_ROLE` (default viewer) under their e-mail address; while no user is
  registered every allowed person is the admin `operator`, as everywhere.
- Users registered (`python -m worker user add`): a form takes a user name and that user's token, also on loopback
  (roles would mean nothing otherwise); the shared password is then not asked for.
- No users: the shared password (env `DASHBOARD_PASSWORD`, else `dashboard_password` in secrets.toml) if set, else
  nothing; the actor is the admin `operator`. An exposed dashboard (`DASHBOARD_ADDRESS` beyond loopback) with no login
  refuses to start unless `DASHBOARD_ALLOW_OPEN=1` (`exposure_refusal`).

Wrong tries are throttled in Redis per client address and per session (worker/signin.py) and, like every sign-in and
log-out, written to the audit log. Log-out ends the session's power: every callback and fragment a page draws is
wrapped by `guarded`, which runs it only while the sign-in it was drawn under is still the session's current one.
"""
from __future__ import annotations

import dataclasses
import functools
import hmac
import ipaddress
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
import streamlit as st

from app.connection import redis_down, try_redis
from app.defaults import (
    ADDRESS_ENV,
    ALLOW_OPEN_ENV,
    ALLOWED_DOMAINS_ENV,
    ALLOWED_EMAILS_ENV,
    ALLOWED_GROUPS_ENV,
    DEFAULT_ROLE,
    DEFAULT_ROLE_ENV,
)
from worker.api import PermissionDeniedError, UserError, audit, signin, users

PASSWORD_ENV = "DASHBOARD_PASSWORD"
"""Environment variable holding the shared dashboard password (empty or unset: no password)."""

PASSWORD_SECRET = "dashboard_password"
"""Key in Streamlit secrets holding the shared password, used when the environment variable is unset."""

ACCESS_SECRET = "access"
"""Section of Streamlit secrets holding the OIDC allow-list (`emails`, `domains`, `groups`: lists of strings)."""

GROUPS_CLAIM = "groups"
"""The identity token's claim listing the person's groups (what `DASHBOARD_ALLOWED_GROUPS` is matched against)."""

_SIGN_IN = "auth:sign_in"
"""Session state: this session's `SignIn` (absent: not signed in)."""
_ACTOR = "auth:actor"
"""Session state: the `Actor` resolved for this session's latest run."""
_GEN = "auth:gen"
"""Session state: the sign-in generation, bumped by every sign-in and log-out (`guarded` compares it)."""
_NOTICE = "auth:notice"
_GONE = ("Your sign-in no longer holds (the user was removed, its token rotated, or users were added): sign in "
         "again.")

_SIGNED_IN: dict[str, None] = {}
"""Ids of this server's sessions that have signed in (insertion-ordered; app/gate.py lets only them upload)."""
_SIGNED_IN_MAX = 10_000
"""Most session ids remembered; the oldest is forgotten first (it must sign in again to upload)."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class SignIn:
    """How this session signed in: re-checked on every run, so that a removed user, a rotated token or an address
    taken off the allow-list loses the session at its next click."""

    method: str
    """`open` (no login), `password`, `token` or `oidc`."""
    name: str
    """The user name (token), the e-mail address (oidc), or `operator`."""
    token_sha256: str = ""
    """For `token`: the hash the user had when signing in (a rotation signs the session out)."""


@dataclasses.dataclass(frozen=True)
class AllowList:
    """Who an OIDC sign-in admits: exact e-mail addresses, e-mail domains (exact, no subdomains), groups."""

    emails: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.emails or self.domains or self.groups)

    def admits(self, email: str | None, groups: Any = None) -> bool:
        email = (email or "").strip().lower()
        if email and (email in self.emails or email.rpartition("@")[2] in self.domains):
            return True
        if isinstance(groups, str):
            groups = [groups]
        return bool(self.groups & {str(g) for g in (groups or ())})


# ----------------------------------------------------------------------------------------------- configuration
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
    """A shared password or OIDC sign-in is set up (registered users need Redis to be known; see require_login)."""
    return bool(shared_password()) or oidc_configured()


def allow_list() -> AllowList:
    """The OIDC allow-list: each kind from its environment variable (comma-separated) if set, else from the
    `[access]` section of secrets.toml."""
    section = _secret(ACCESS_SECRET) or {}

    def kind(env: str, key: str, lower: bool) -> frozenset[str]:
        raw = os.environ.get(env, "").strip()
        items = raw.split(",") if raw else list(section.get(key) or []) if isinstance(section, Mapping) else []
        return frozenset(s.strip().lower() if lower else s.strip() for s in items if str(s).strip())

    return AllowList(emails=kind(ALLOWED_EMAILS_ENV, "emails", True),
                     domains=frozenset(d.lstrip("@") for d in kind(ALLOWED_DOMAINS_ENV, "domains", True)),
                     groups=kind(ALLOWED_GROUPS_ENV, "groups", False))


def default_role() -> users.Role:
    """The role of an allowed OIDC person who is not a registered user (UserError for a bad setting)."""
    raw = os.environ.get(DEFAULT_ROLE_ENV, "").strip() or DEFAULT_ROLE
    try:
        return users.parse_role(raw)
    except UserError as err:
        raise UserError(f"{DEFAULT_ROLE_ENV}: {err}") from None


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


def access_refusal() -> str | None:
    """Why the sign-in setup must not be served (None: it may): OIDC without an allow-list (every account of the
    provider, all of Google or GitHub, would get in), or a `DASHBOARD_DEFAULT_ROLE` that is no role."""
    try:
        default_role()
    except UserError as err:
        return f"Refusing to serve the dashboard: {err}"
    if not oidc_configured() or not allow_list().empty:
        return None
    return (
        "Refusing to serve the dashboard with single sign-on (`[auth]` in .streamlit/secrets.toml) but no allow-list: "
        "every account of the identity provider could sign in. Say who may, with one or more of:\n"
        f"- `{ALLOWED_EMAILS_ENV}=ada@example.org,bob@example.org` (exact addresses);\n"
        f"- `{ALLOWED_DOMAINS_ENV}=example.org` (every address of that domain);\n"
        f"- `{ALLOWED_GROUPS_ENV}=ml-team` (the identity token's `{GROUPS_CLAIM}` claim);\n"
        f"- or the same as lists in .streamlit/secrets.toml: `[{ACCESS_SECRET}]` with `emails = [...]`, "
        "`domains = [...]`, `groups = [...]`.\n"
        f"People on the list who are not registered users get the role in `{DEFAULT_ROLE_ENV}` (default "
        f"{DEFAULT_ROLE})."
    )


def startup_refusal(address: str | None) -> str | None:
    """Everything that stops the dashboard from serving (checked by `python -m app` and by the entry page)."""
    return exposure_refusal(address) or access_refusal()


# ------------------------------------------------------------------------------------------------ the session
def _session_id() -> str | None:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx.session_id if ctx else None


def client_address() -> str:
    """The browser's address as the server sees it (127.0.0.1 over loopback, and in AppTest)."""
    try:
        ip = st.context.ip_address
    except Exception:  # noqa: BLE001 - no client context: a local client
        ip = None
    return ip if isinstance(ip, str) and ip else "127.0.0.1"  # (AppTest's runtime answers with a stand-in object)


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
    """Whether the session with this id has passed the sign-in (and not logged out) on this server."""
    return session_id in _SIGNED_IN


def current_actor() -> users.Actor:
    """Who this session acts as: what every page passes as `actor=` (PermissionDeniedError when not signed in)."""
    actor = st.session_state.get(_ACTOR)
    if actor is None or _SIGN_IN not in st.session_state:
        raise PermissionDeniedError("this session is not signed in")
    return actor


def users_exist() -> bool:
    """Whether the rules are on (a user is registered): pages then show "Mine" first and the Owner filter."""
    conn, _ = try_redis()
    return conn is not None and users.any_users(conn)


def guarded(fn: F) -> F:
    """`fn` (a callback or a fragment's function), run only while the sign-in it was drawn under is still current:
    after a log-out (or a new sign-in) nothing drawn before runs, whatever the browser sends."""
    drawn_gen = st.session_state.get(_GEN, 0)
    drawn_signed_in = _SIGN_IN in st.session_state

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not drawn_signed_in or _SIGN_IN not in st.session_state or st.session_state.get(_GEN, 0) != drawn_gen:
            return None
        if not _still_signed_in():  # callbacks run before the page: the user may have been removed or demoted since
            return None
        return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def _still_signed_in() -> bool:
    """Re-check the session's sign-in against Redis now, refreshing its actor (role, limits); False (and the session
    signed out) when it no longer holds, or when Redis cannot say."""
    sign_in = st.session_state.get(_SIGN_IN)
    conn, _ = try_redis()
    if sign_in is None or conn is None:
        return False
    actor = _resolve(conn, sign_in, client_address())
    if actor is None:
        _end(_GONE)
        return False
    st.session_state[_ACTOR] = actor
    return True


def _start(conn: redis.Redis, sign_in: SignIn, actor: users.Actor, **detail: Any) -> None:
    st.session_state[_SIGN_IN] = sign_in
    st.session_state[_ACTOR] = actor
    st.session_state[_GEN] = st.session_state.get(_GEN, 0) + 1
    if sign_in.method != "open":
        audit.record(conn, actor, audit.AuditAction.SIGN_IN, actor.name, method=sign_in.method, **detail)


def sign_in_as(conn: redis.Redis, user: users.User) -> None:
    """This session goes on as `user` (the Users page, after adding the first user: the rules are on from then)."""
    _start(conn, SignIn("token", user.name, user.token_sha256), user.actor("dashboard", client_address()),
           via="first user added")


def _end(notice: str | None = None) -> None:
    """Forget this session's sign-in: nothing drawn under it runs any more (`guarded`)."""
    st.session_state.pop(_SIGN_IN, None)
    st.session_state.pop(_ACTOR, None)
    st.session_state[_GEN] = st.session_state.get(_GEN, 0) + 1
    _mark_signed_in(False)
    if notice:
        st.session_state[_NOTICE] = notice


def _log_out() -> None:
    """The Log out button: written to the audit log, then the session's power ends."""
    actor = st.session_state.get(_ACTOR)
    method = getattr(st.session_state.get(_SIGN_IN), "method", "")
    conn, _ = try_redis()
    if conn is not None and actor is not None:
        audit.record(conn, actor, audit.AuditAction.SIGN_OUT, actor.name)
    _end()
    if method == "oidc":
        st.logout()


def _resolve(conn: redis.Redis, sign_in: SignIn, address: str) -> users.Actor | None:
    """The actor of a signed-in session now (roles and tokens change under it); None when it no longer holds."""
    if sign_in.method in ("open", "password"):
        return None if users.any_users(conn) else dataclasses.replace(
            users.OPERATOR_ACTOR, source="dashboard", address=address)
    if sign_in.method == "token":
        try:
            user = users.get_user(conn, sign_in.name)
        except UserError:
            return None
        if not hmac.compare_digest(user.token_sha256, sign_in.token_sha256):
            return None
        return user.actor("dashboard", address)
    if sign_in.method == "oidc" and st.user.get("is_logged_in"):
        claims = st.user.to_dict()
        if str(claims.get("email") or "").strip().lower() == sign_in.name:
            return oidc_actor(conn, claims, allow_list(), default_role(), address)
    return None


def oidc_actor(conn: redis.Redis, claims: Mapping[str, Any], allowed: AllowList, role: users.Role,
               address: str | None = None) -> users.Actor | None:
    """The actor of an OIDC identity, None when the allow-list does not admit it: a registered user (by e-mail)
    with their role, another allowed person under their address with `role`; while no user is registered, the
    admin `operator`. An address the provider says is unverified is not admitted."""
    email = str(claims.get("email") or "").strip()
    if claims.get("email_verified") is False or not allowed.admits(email, claims.get(GROUPS_CLAIM)):
        return None
    if not users.any_users(conn):
        return dataclasses.replace(users.OPERATOR_ACTOR, source="dashboard", address=address)
    user = users.by_email(conn, email) if email else None
    if user is not None:
        return user.actor("dashboard", address)
    name = email.lower() or str(claims.get("sub") or "")  # admitted by a group, with no address in the token
    return users.Actor(name, role, source="dashboard", address=address) if name else None


def _signed_in_chrome(actor: users.Actor, method: str) -> None:
    _mark_signed_in(True)
    if method != "open":
        st.sidebar.caption(f"Signed in as **{actor.name}** ({actor.role.value})")
        st.sidebar.button("Log out", on_click=_log_out, key="auth:logout")


def require_login() -> bool:
    """True when this session may see the dashboard (its actor is then `current_actor()`); otherwise the sign-in
    form (or the Redis-down banner: nobody can be checked without Redis) is drawn and False returned."""
    conn, err = try_redis()
    if conn is None:
        _mark_signed_in(False)
        redis_down(err or "unknown error")
        return False
    address = client_address()
    if oidc_configured():
        return _oidc(conn, address)
    sign_in = st.session_state.get(_SIGN_IN)
    if sign_in is not None:
        actor = _resolve(conn, sign_in, address)
        if actor is not None:
            st.session_state[_ACTOR] = actor
            _signed_in_chrome(actor, sign_in.method)
            return True
        _end(_GONE)
    if users.any_users(conn):
        return _form(conn, address, token=True)
    password = shared_password()
    if password:
        return _form(conn, address, token=False, password=password)
    _start(conn, SignIn("open", users.OPERATOR), dataclasses.replace(users.OPERATOR_ACTOR, source="dashboard",
                                                                      address=address))
    _mark_signed_in(True)
    return True


def _oidc(conn: redis.Redis, address: str) -> bool:
    if not st.user.get("is_logged_in"):  # (a mapping: the key is absent where Streamlit has no auth context)
        if st.session_state.get(_SIGN_IN) is not None:
            _end()
        _mark_signed_in(False)
        st.title("Sign in")
        st.button("Log in", on_click=st.login, type="primary")
        return False
    claims = st.user.to_dict()
    actor = oidc_actor(conn, claims, allow_list(), default_role(), address)
    email = str(claims.get("email") or "")
    if actor is None:
        if st.session_state.get("auth:refused") != email:  # once per session and address, not on every rerun
            st.session_state["auth:refused"] = email
            audit.record(conn, users.Actor(email or signin.ANONYMOUS, users.Role.VIEWER, source="dashboard",
                                           address=address), audit.AuditAction.SIGN_IN_FAILED, email,
                         method="oidc", reason="not on the allow-list")
        if st.session_state.get(_SIGN_IN) is not None:
            _end()
        _mark_signed_in(False)
        st.title("Not allowed")
        st.error(f"{email or 'This account'} is not allowed to use this dashboard. Ask an administrator to add it "
                 "to the allow-list.", icon=":material/block:")
        st.button("Log out", on_click=st.logout, key="auth:logout")
        return False
    current = st.session_state.get(_SIGN_IN)
    if current is None or current.method != "oidc" or current.name != email.lower():
        _start(conn, SignIn("oidc", email.lower()), actor, email=email)
    st.session_state[_ACTOR] = actor
    _signed_in_chrome(actor, "oidc")
    return True


def _form(conn: redis.Redis, address: str, *, token: bool, password: str | None = None) -> bool:
    """The sign-in form: a user name and token (users registered), else the shared password. Throttled: after
    signin.FREE_TRIES wrong tries (from this address or this session) a try waits before it is even checked."""
    _mark_signed_in(False)  # every run that shows the form (after a log-out too) closes the upload gate
    st.title("Sign in")
    if notice := st.session_state.pop(_NOTICE, None):
        st.info(notice)
    with st.form("auth:form"):
        name = st.text_input("User name") if token else ""
        typed = st.text_input("Token" if token else "Password", type="password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if not submitted:
        return False
    subjects = signin.subjects(address, _session_id())
    stranger = users.Actor(signin.ANONYMOUS, users.Role.VIEWER, source="dashboard", address=address)
    wait = signin.wait_left(conn, subjects)
    if wait > 0:
        audit.record(conn, stranger, audit.AuditAction.SIGN_IN_FAILED, name.strip(), reason="throttled")
        st.error(f"Too many wrong tries: wait {wait:.0f} s before the next one is checked.", icon=":material/timer:")
        return False
    if token:
        try:
            user = users.by_token(conn, typed)
            ok = hmac.compare_digest(user.name.encode(), name.strip().encode())
        except UserError:
            user, ok = None, False
    else:
        user, ok = None, hmac.compare_digest(typed.encode(), (password or "").encode())
    if not ok:
        wait = signin.failed(conn, subjects)
        audit.record(conn, stranger, audit.AuditAction.SIGN_IN_FAILED, name.strip(),
                     method="token" if token else "password")
        st.error(("Wrong user name or token." if token else "Wrong password.")
                 + (f" Too many wrong tries: wait {wait:.0f} s before the next one is checked." if wait else ""))
        return False
    signin.succeeded(conn, subjects)
    if user is not None:
        _start(conn, SignIn("token", user.name, user.token_sha256), user.actor("dashboard", address))
    else:
        _start(conn, SignIn("password", users.OPERATOR),
               dataclasses.replace(users.OPERATOR_ACTOR, source="dashboard", address=address))
    st.rerun()
    return True  # not reached
