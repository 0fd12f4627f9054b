"""Users (admins only): who may use the service and how; add a user (the token is shown once), change a role, issue
a new token, remove a user. Everything goes through worker.api's `accounts` (what `python -m worker user ...` calls):
the same checks (an admin acts; the first user must be an admin; the last admin is kept), every change in the audit
log.
"""
from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st

from app import ui
from app.auth import current_actor, guarded, sign_in_as
from app.connection import require_redis
from app.tables import fmt_time
from worker.api import PermissionDeniedError, UserError, accounts, users

conn = require_redis()
st.title("Users")
actor = current_actor()
try:
    actor.require(users.Action.ADMIN, "manage users")
except PermissionDeniedError as err:
    st.error(str(err), icon=":material/block:")
    st.stop()
ui.show_flash()


def _change(what: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except (UserError, PermissionDeniedError) as err:
        ui.flash(f"{what}: {err}", "error")


@guarded
def add() -> None:
    def run() -> None:
        name = (st.session_state.get("users:add:name") or "").strip()
        role = st.session_state.get("users:add:role") or users.Role.SUBMITTER.value
        email = (st.session_state.get("users:add:email") or "").strip() or None
        first = not users.any_users(conn)
        user, token = accounts.add(conn, name, role, email=email, actor=current_actor())
        st.session_state["users:token"] = (user.name, token)
        ui.flash(f"Added {user.name} ({user.role.value}).")
        if first:  # the rules are on from now: this session goes on as the new admin (and sees the token)
            sign_in_as(conn, user)
            ui.flash(f"Users exist now: this session is signed in as {user.name}; others sign in with a user name "
                     "and token.", "info")
    _change("Not added", run)


@guarded
def change_role(name: str) -> None:
    def run() -> None:
        user = accounts.change_role(conn, name, st.session_state.get(f"users:role:{name}"), actor=current_actor())
        ui.flash(f"{name} is now {user.role.value}.")
    _change("Role not changed", run)


@guarded
def rotate(name: str) -> None:
    def run() -> None:
        st.session_state["users:token"] = (name, accounts.new_token(conn, name, actor=current_actor()))
        ui.flash(f"New token for {name}: the old one no longer works.")
    _change("No new token", run)


@guarded
def remove(name: str) -> None:
    st.session_state.pop("users:confirm", None)

    def run() -> None:
        accounts.remove(conn, name, actor=current_actor())
        ui.flash(f"Removed {name}: their token no longer works; what they made keeps their name.")
    _change("Not removed", run)


@guarded
def ask_remove(name: str) -> None:
    st.session_state["users:confirm"] = name


@guarded
def keep() -> None:
    st.session_state.pop("users:confirm", None)


shown = st.session_state.pop("users:token", None)
if shown:
    st.success(f"Token of **{shown[0]}** (shown once, only its hash is kept; they sign in with their user name and "
               f"it, or `python -m worker login TOKEN`):", icon=":material/key:")
    st.code(shown[1], language=None)

everyone = accounts.listing(conn, actor=actor)
if not everyone:
    st.info("No user is registered: nobody is asked who they are and everyone acts as the admin `operator`. The "
            "first user you add turns the rules on (make it an admin: from then on this dashboard asks for a user "
            "name and token).", icon=":material/group_off:")
else:
    st.dataframe(pd.DataFrame([{
        "user": u.name, "role": u.role.value, "e-mail": u.email or "",
        "max active jobs": u.limits.max_active_jobs, "max GPUs": u.limits.max_gpus,
        "high priority": u.limits.high_priority or u.role is users.Role.ADMIN, "created": fmt_time(u.created_at)}
        for u in everyone]), hide_index=True, key="users:list")

with st.form("users:add", clear_on_submit=True):
    st.markdown("**Add a user**")
    c = st.columns([2, 1, 2])
    c[0].text_input("User name", key="users:add:name", help="letters, digits and _ . @ + - (at most 100)")
    c[1].selectbox("Role", users.ROLES, index=users.ROLES.index(users.Role.SUBMITTER.value), key="users:add:role")
    c[2].text_input("E-mail (optional)", key="users:add:email", help="matches their single sign-on identity")
    st.form_submit_button("Add user", type="primary", on_click=add, icon=":material/person_add:")

for u in everyone:
    with st.container(border=True):
        c = st.columns([2, 2, 1, 1, 1])
        c[0].markdown(f"**{u.name}**" + (f"  \n{u.email}" if u.email else ""))
        c[1].selectbox("Role", users.ROLES, index=users.ROLES.index(u.role.value), key=f"users:role:{u.name}",
                       label_visibility="collapsed")
        c[2].button("Set role", key=f"users:setrole:{u.name}", on_click=change_role, args=(u.name,))
        c[3].button("New token", key=f"users:rotate:{u.name}", on_click=rotate, args=(u.name,),
                    help="issue a new token; the old one stops working at once")
        c[4].button("Remove…", key=f"users:remove:{u.name}", on_click=ask_remove, args=(u.name,))
        if st.session_state.get("users:confirm") == u.name:
            st.warning(f"Remove **{u.name}**? Their token stops working; what they made keeps their name as its "
                       "owner.", icon=":material/person_remove:")
            b = st.columns([1, 1, 6])
            b[0].button("Yes, remove", type="primary", key=f"users:remove:yes:{u.name}", on_click=remove,
                        args=(u.name,))
            b[1].button("Keep", key=f"users:remove:no:{u.name}", on_click=keep)
st.caption("Per-user limits (active jobs, GPUs, priority high): `python -m worker user limits NAME ...`.")
