"""People: named users with a role, a token and limits, and the `Actor` every change is made by (README "Users and
roles").

- Roles, weakest first: viewer (sees everything), submitter (submits jobs and sweeps, registers datasets and models,
  deploys; cancels, retries, deletes and removes what they made), admin (everything: other people's things, users,
  workers, settings, priority `high`).
- A user is found by their token (the CLI: `TRAINER_TOKEN` or the file `python -m worker login` writes; the dashboard's
  sign-in form) or, behind single sign-on, by e-mail. Only the token's SHA-256 is kept in Redis; the token itself is
  printed once when the user is made or the token rotated.
- No user registered: nobody is asked who they are, and every actor is the admin `operator` (the setup of one person
  on one machine, and what every earlier version did). The first `python -m worker user add` turns the rules on.
- Trust: whoever holds the Redis credentials can change these keys directly, as they can everything else in Redis.
  Roles bound what people do through the dashboard (which holds the Redis credentials on their behalf) and keep honest
  CLI users to their own things; hand Redis credentials only to operators.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import redis

from worker import keys
from worker.defaults import USER_MAX_ACTIVE_JOBS_ENV, USER_MAX_GPUS_ENV
from worker.errors import PermissionDeniedError, UserError
from worker.hashcodec import decode_reply


class Role(str, enum.Enum):
    """What a user may do; each role may do everything the ones before it may."""

    VIEWER = "viewer"
    SUBMITTER = "submitter"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)


ROLES = tuple(r.value for r in Role)
"""The role names, weakest first (what `--role` accepts)."""


class Action(str, enum.Enum):
    """The kinds of thing an actor does; `Actor.may` says which role each needs."""

    VIEW = "view"
    """See jobs, sweeps, datasets, models, deployments, workers."""
    SUBMIT = "submit"
    """Make something the actor then owns: submit a job or sweep, register a dataset or model version, deploy."""
    MANAGE = "manage"
    """Change or remove a thing: cancel, retry, delete, remove, undeploy, move an alias. A submitter: own things only."""
    ADMIN = "admin"
    """Users, workers, settings (webhooks, retention), priority `high`."""


_LEAST_ROLE = {Action.VIEW: Role.VIEWER, Action.SUBMIT: Role.SUBMITTER, Action.MANAGE: Role.SUBMITTER,
               Action.ADMIN: Role.ADMIN}

OPERATOR = "operator"
"""The actor's name while no user is registered (an admin), and the owner shown for things made before users."""

SYSTEM = "system"
"""The actor's name for what the product does by itself (a sweep's driver submitting trials acts for the sweep's
owner instead; retention, recovery)."""

USER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}\Z")

TOKEN_ENV = "TRAINER_TOKEN"
"""Environment variable: the CLI's token (it wins over the token file)."""

TOKEN_FILE_ENV = "TRAINER_TOKEN_FILE"
"""Environment variable: where `python -m worker login` keeps the token (default TOKEN_FILE)."""

TOKEN_FILE = Path.home() / ".config" / "trainer" / "token"
"""Default token file (mode 0600)."""

TOKEN_BYTES = 24
"""Random bytes in a token (32 URL-safe characters)."""


@dataclasses.dataclass(frozen=True)
class UserLimits:
    """Per-user limits, checked at submission. None: no limit."""

    max_active_jobs: int | None = None
    """Jobs queued or running at once."""
    max_gpus: int | None = None
    """GPUs of the user's queued and running jobs together."""
    high_priority: bool = False
    """May submit with priority `high` (admins always may)."""


@dataclasses.dataclass(frozen=True)
class Actor:
    """Who does something, as the rules see it: a name, a role, where the request came from."""

    name: str
    role: Role
    source: str = "cli"
    """`cli`, `dashboard` or `system`."""
    address: str | None = None
    """The client's address where known (the dashboard's browser), for the audit log."""
    limits: UserLimits = UserLimits()

    def may(self, action: Action, owner: str | None = None) -> bool:
        """Whether this actor may do `action` (on a thing made by `owner`, for MANAGE)."""
        if self.role is Role.ADMIN:
            return True
        if self.role.rank < _LEAST_ROLE[action].rank:
            return False
        return not (action is Action.MANAGE and owner is not None and owner != self.name)

    def require(self, action: Action, what: str, owner: str | None = None) -> None:
        """PermissionDeniedError naming the user, the role and what would allow `what` (e.g. "cancel job X")."""
        if self.may(action, owner):
            return
        if self.role.rank >= _LEAST_ROLE[action].rank:  # a submitter acting on someone else's thing
            raise PermissionDeniedError(f"{self.name} ({self.role.value}) may not {what}: it belongs to {owner}; "
                                        "only its owner or an admin may")
        need = _LEAST_ROLE[action].value
        raise PermissionDeniedError(f"{self.name} ({self.role.value}) may not {what}: that needs the {need} role "
                                    f"(an admin gives it: python -m worker user role {self.name} {need})")

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def is_system(self) -> bool:
        """The product acting by itself or on a user's behalf (`on_behalf_of`): what it does was allowed when the user
        asked for it, so it is neither limited nor logged again."""
        return self.source == SYSTEM_SOURCE


SYSTEM_SOURCE = "system"
OPERATOR_ACTOR = Actor(OPERATOR, Role.ADMIN, source="cli")
SYSTEM_ACTOR = Actor(SYSTEM, Role.ADMIN, source=SYSTEM_SOURCE)


def on_behalf_of(owner: str | None) -> Actor:
    """The actor a sweep's driver submits trials as: the sweep's owner (the operator for sweeps made before users),
    with a submitter's power only, not limited per trial (the sweep's `parallel` was checked against the owner's limits
    when it was made) and not logged per trial (the sweep's creation is)."""
    return Actor(owner or OPERATOR, Role.SUBMITTER, source=SYSTEM_SOURCE)


def _env_limit(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise UserError(f"{name} must be a whole number of at least 0 (or unset: no limit), got {raw!r}")
    return value


def effective_limits(actor: Actor) -> UserLimits:
    """The limits submission applies to `actor`: none for an admin (an admin could lift their own anyway); for anyone
    else each limit of their own, or where they have none the service's default (env USER_MAX_ACTIVE_JOBS,
    USER_MAX_GPUS; unset: no limit)."""
    if actor.is_admin:
        return UserLimits(high_priority=True)
    own = actor.limits
    return UserLimits(
        max_active_jobs=(own.max_active_jobs if own.max_active_jobs is not None
                         else _env_limit(USER_MAX_ACTIVE_JOBS_ENV)),
        max_gpus=own.max_gpus if own.max_gpus is not None else _env_limit(USER_MAX_GPUS_ENV),
        high_priority=own.high_priority)


@dataclasses.dataclass(frozen=True)
class User:
    """A registered person (keys.users(): JSON of this, the token only as its hash)."""

    name: str
    role: Role
    email: str | None = None
    limits: UserLimits = UserLimits()
    created_at: float = 0.0
    token_sha256: str = ""

    def actor(self, source: str = "cli", address: str | None = None) -> Actor:
        return Actor(self.name, self.role, source=source, address=address, limits=self.limits)

    def public(self) -> dict[str, Any]:
        """What `user list --json` prints: everything but the token's hash."""
        out = dataclasses.asdict(self)
        out.pop("token_sha256")
        out["role"] = self.role.value
        return out

    def _json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "role": self.role.value})

    @classmethod
    def _parse(cls, raw: str | bytes) -> User:
        data = json.loads(raw)
        return cls(name=data["name"], role=Role(data["role"]), email=data.get("email"),
                   limits=UserLimits(**data.get("limits") or {}), created_at=float(data.get("created_at") or 0.0),
                   token_sha256=data.get("token_sha256", ""))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_user_name(name: str) -> str:
    if not isinstance(name, str) or not USER_NAME_RE.match(name) or name in (OPERATOR, SYSTEM):
        raise UserError(f"invalid user name {name!r}: letters, digits and _ . @ + - (at most 100), not "
                        f"{OPERATOR!r} or {SYSTEM!r}")
    return name


def parse_role(role: str | Role) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise UserError(f"unknown role {role!r}: one of {', '.join(ROLES)}") from None


def any_users(conn: redis.Redis) -> bool:
    """Whether the rules are on (at least one user registered)."""
    return bool(conn.hlen(keys.users()))


def list_users(conn: redis.Redis) -> list[User]:
    return sorted((User._parse(raw) for raw in conn.hgetall(keys.users()).values()), key=lambda u: u.name)


def get_user(conn: redis.Redis, name: str) -> User:
    raw = conn.hget(keys.users(), name)
    if raw is None:
        names = ", ".join(u.name for u in list_users(conn)) or "none"
        raise UserError(f"no user {name!r} (users: {names})")
    return User._parse(raw)


def by_email(conn: redis.Redis, email: str) -> User | None:
    """The user with this e-mail address (case-insensitive), if any."""
    email = email.strip().lower()
    return next((u for u in list_users(conn) if u.email and u.email.lower() == email), None)


def by_token(conn: redis.Redis, token: str) -> User:
    """The user a token belongs to; UserError for an unknown (or revoked) one."""
    raw = conn.hget(keys.user_tokens(), _digest(token.strip()))
    if raw is None:
        raise UserError("unknown token: it was never issued, or it was rotated or its user removed "
                        "(an admin issues a new one: python -m worker user token NAME)")
    user = get_user(conn, decode_reply(raw))
    if not hmac.compare_digest(user.token_sha256, _digest(token.strip())):
        raise UserError("unknown token: it was rotated (an admin issues a new one: python -m worker user token NAME)")
    return user


def _save(conn: redis.Redis, user: User, old_digest: str | None = None) -> None:
    pipe = conn.pipeline(transaction=True)
    pipe.hset(keys.users(), user.name, user._json())
    if old_digest and old_digest != user.token_sha256:
        pipe.hdel(keys.user_tokens(), old_digest)
    if user.token_sha256:
        pipe.hset(keys.user_tokens(), user.token_sha256, user.name)
    pipe.execute()


def add_user(conn: redis.Redis, name: str, role: str | Role, *, email: str | None = None,
             limits: UserLimits | None = None) -> tuple[User, str]:
    """A new user and their token (shown once: only its hash is kept). UserError if the name is taken."""
    check_user_name(name)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    user = User(name=name, role=parse_role(role), email=(email or "").strip() or None, limits=limits or UserLimits(),
                created_at=time.time(), token_sha256=_digest(token))
    if not conn.hsetnx(keys.users(), name, user._json()):
        raise UserError(f"user {name!r} exists (change it with `user role`, `user limits` or `user token`)")
    conn.hset(keys.user_tokens(), user.token_sha256, name)
    return user, token


def _admins_left_without(conn: redis.Redis, name: str) -> int:
    return sum(1 for u in list_users(conn) if u.role is Role.ADMIN and u.name != name)


def set_role(conn: redis.Redis, name: str, role: str | Role) -> User:
    user = get_user(conn, name)
    new = parse_role(role)
    if user.role is Role.ADMIN and new is not Role.ADMIN and not _admins_left_without(conn, name):
        raise UserError(f"{name} is the last admin: make another admin first")
    user = dataclasses.replace(user, role=new)
    _save(conn, user)
    return user


def set_limits(conn: redis.Redis, name: str, limits: UserLimits) -> User:
    user = dataclasses.replace(get_user(conn, name), limits=limits)
    _save(conn, user)
    return user


def rotate_token(conn: redis.Redis, name: str) -> str:
    """A new token for `name` (the old one stops working at once); shown once."""
    user = get_user(conn, name)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    _save(conn, dataclasses.replace(user, token_sha256=_digest(token)), old_digest=user.token_sha256)
    return token


def remove_user(conn: redis.Redis, name: str) -> None:
    """Remove a user (their token stops working; what they made keeps their name as its owner)."""
    user = get_user(conn, name)
    if user.role is Role.ADMIN and not _admins_left_without(conn, name) and len(list_users(conn)) > 1:
        raise UserError(f"{name} is the last admin: make another admin first")
    pipe = conn.pipeline(transaction=True)
    pipe.hdel(keys.users(), name)
    if user.token_sha256:
        pipe.hdel(keys.user_tokens(), user.token_sha256)
    pipe.execute()


def token_file() -> Path:
    return Path(os.environ.get(TOKEN_FILE_ENV, "").strip() or TOKEN_FILE)


def save_token(token: str) -> Path:
    """Write the CLI's token file (mode 0600, its folder 0700); the path written."""
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token.strip() + "\n")
    return path


def cli_token() -> str | None:
    """The CLI's token: TRAINER_TOKEN, else the token file, else None."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    try:
        return token_file().read_text().strip() or None
    except OSError:
        return None


def cli_actor(conn: redis.Redis) -> Actor:
    """Who the CLI acts as: the token's user; with no user registered, the admin `operator` (a token left over from
    another service is then ignored: nobody is asked). PermissionDeniedError when users exist and no token is set,
    UserError for an unknown token. The audit log's `address` of a CLI actor is this machine's host name."""
    if not any_users(conn):
        return OPERATOR_ACTOR
    token = cli_token()
    if token:
        return by_token(conn, token).actor("cli", address=socket.gethostname())
    raise PermissionDeniedError(f"this service has users: say who you are with {TOKEN_ENV}=... or "
                                "`python -m worker login TOKEN` (an admin makes a user: python -m worker user add NAME "
                                "--role submitter)")


def acting(conn: redis.Redis, actor: Actor | None) -> Actor:
    """The actor a change is made by: `actor` itself, or with none given the admin `operator` while no user exists.
    With users and no actor, PermissionDeniedError: a caller that forgot to say who acts never gets admin power."""
    if actor is not None:
        return actor
    if not any_users(conn):
        return OPERATOR_ACTOR
    raise PermissionDeniedError("this service has users: the request must say who makes it (no acting user given)")
