"""What the pages need of people besides sign-in (app/auth.py): the "Mine / Everyone" choice and whether the signed-in
actor may press a button. Buttons an actor may not use are not drawn; the worker checks again when one is pressed
(worker.api refuses with PermissionDeniedError, which the pages show), so hiding is for clarity, not the safeguard.
"""
from __future__ import annotations

import streamlit as st

from app.auth import current_actor, users_exist
from worker.api import users

MINE, EVERYONE = "Mine", "Everyone"


def owner_filter(key: str) -> str | None:
    """The owner a page lists: the "Mine / Everyone" choice, shown only when users are registered ("Mine" first);
    None (everyone's) otherwise."""
    if not users_exist():
        return None
    choice = st.radio("Show", [MINE, EVERYONE], horizontal=True, key=key, label_visibility="collapsed")
    return current_actor().name if choice == MINE else None


def may(action: users.Action, owner: str | None = None) -> bool:
    """Whether the signed-in actor may do `action` (on a thing made by `owner`)."""
    return current_actor().may(action, owner)


def may_submit() -> bool:
    return may(users.Action.SUBMIT)


def may_manage(owner: str | None) -> bool:
    """Cancel, retry, delete, remove, undeploy, move an alias: the owner's or an admin's."""
    return may(users.Action.MANAGE, owner or users.OPERATOR)


def is_admin() -> bool:
    return current_actor().is_admin
