"""Managing people as an actor: the user changes of worker/users.py, each checked (`audit.authorize`) and logged
(`audit.record`). The CLI's `user ...` commands and the dashboard's admin page both call these; worker/users.py keeps
the model itself (roles, tokens, the records) and checks nothing, so its functions are for these and for tests.

Rules (README "Users and roles"):
- Only admins add, change and remove users, and read the user list and the audit log.
- Bootstrap: while no user exists every actor is the admin `operator`, so the first `user add` is allowed, and it
  must make an admin (otherwise nobody could ever add the next one).
- Anyone may rotate their own token; an admin anyone's.
"""
from __future__ import annotations

import redis

from worker import audit, users
from worker.audit import AuditAction
from worker.errors import UserError
from worker.users import Action, Actor, Role, User, UserLimits


def add(conn: redis.Redis, name: str, role: str | Role, *, email: str | None = None,
        limits: UserLimits | None = None, actor: Actor | None = None) -> tuple[User, str]:
    """A new user and their token (shown once)."""
    actor = audit.authorize(conn, actor, Action.ADMIN, "add users")
    new_role = users.parse_role(role)
    if not users.any_users(conn) and new_role is not Role.ADMIN:
        raise UserError(f"the first user must be an admin (--role admin): only an admin can add the next ones; "
                        f"{name} would be a {new_role.value} and nobody could manage users any more")
    user, token = users.add_user(conn, name, new_role, email=email, limits=limits)
    audit.record(conn, actor, AuditAction.USER_ADD, name, role=new_role.value, email=user.email)
    return user, token


def listing(conn: redis.Redis, *, actor: Actor | None = None) -> list[User]:
    """Every user (admins only: the list holds e-mail addresses and limits)."""
    audit.authorize(conn, actor, Action.ADMIN, "list users")
    return users.list_users(conn)


def change_role(conn: redis.Redis, name: str, role: str | Role, *, actor: Actor | None = None) -> User:
    actor = audit.authorize(conn, actor, Action.ADMIN, f"change the role of {name}")
    before = users.get_user(conn, name).role
    user = users.set_role(conn, name, role)
    audit.record(conn, actor, AuditAction.USER_ROLE, name, role=user.role.value, previous=before.value)
    return user


def change_limits(conn: redis.Redis, name: str, limits: UserLimits, *, actor: Actor | None = None) -> User:
    """Replace the user's own limits (a None field: the service default applies)."""
    actor = audit.authorize(conn, actor, Action.ADMIN, f"change the limits of {name}")
    for field, value in (("max-jobs", limits.max_active_jobs), ("max-gpus", limits.max_gpus)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"{field}: a whole number of at least 0, got {value!r}")
    user = users.set_limits(conn, name, limits)
    audit.record(conn, actor, AuditAction.USER_LIMITS, name, max_active_jobs=limits.max_active_jobs,
                 max_gpus=limits.max_gpus, high_priority=limits.high_priority)
    return user


def new_token(conn: redis.Redis, name: str, *, actor: Actor | None = None) -> str:
    """A new token for `name`, the old one revoked at once: the user themself, or an admin for anyone."""
    acting = users.acting(conn, actor)
    if acting.name != name:
        acting = audit.authorize(conn, acting, Action.ADMIN, f"issue a token for {name}")
    token = users.rotate_token(conn, name)
    audit.record(conn, acting, AuditAction.USER_TOKEN, name)
    return token


def remove(conn: redis.Redis, name: str, *, actor: Actor | None = None) -> None:
    """Remove a user: their token stops working; what they made keeps their name as its owner."""
    actor = audit.authorize(conn, actor, Action.ADMIN, f"remove user {name}")
    users.remove_user(conn, name)
    audit.record(conn, actor, AuditAction.USER_REMOVE, name)


def sign_in(conn: redis.Redis, token: str, *, source: str = "cli", address: str | None = None) -> User:
    """The user a token belongs to, logged as a sign-in (a wrong token as a failed one, then UserError)."""
    try:
        user = users.by_token(conn, token)
    except UserError:
        audit.record(conn, Actor("?", Role.VIEWER, source=source, address=address), AuditAction.SIGN_IN_FAILED)
        raise
    audit.record(conn, user.actor(source, address), AuditAction.SIGN_IN, user.name)
    return user
