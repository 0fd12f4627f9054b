"""`python -m worker login | whoami | user add|list|role|limits|token|rm | audit` (README "Users and roles"): thin
wrappers over worker.accounts, worker.users and worker.audit.

A refusal of the rules (PermissionDeniedError) exits 3, a bad request (UserError: unknown user, role or token) exits
2; both print one line and change nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
import sys
import time
from datetime import datetime
from typing import Any

from worker.cliutil import acting_user, checked_connection, print_json, refusing, timestamp
from worker.errors import UserError

_refusing = refusing(UserError)

_AGO_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])\Z")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """`--since`: an age (`30m`, `12h`, `7d`, `2w`), a date or date-time (`2026-12-01`, `2026-12-01T09:30`, local
    time) or unix seconds; unix seconds back. UserError naming the forms otherwise."""
    text = text.strip()
    ago = _AGO_RE.match(text)
    if ago:
        return (now or time.time()) - float(ago[1]) * _UNIT[ago[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UserError(f"--since: cannot read {text!r}; give an age (30m, 12h, 7d, 2w), a date (2026-12-01), a "
                        "date and time (2026-12-01T09:30) or unix seconds") from None


def _limits_text(limits: Any) -> str:
    jobs = "no limit" if limits.max_active_jobs is None else limits.max_active_jobs
    gpus = "no limit" if limits.max_gpus is None else limits.max_gpus
    return f"jobs {jobs}, GPUs {gpus}, priority high {'yes' if limits.high_priority else 'no'}"


# ----------------------------------------------------------------------------------------------------- commands
def cmd_login(args: argparse.Namespace) -> int:
    from worker import accounts, users

    conn = checked_connection()
    if not users.any_users(conn):
        raise UserError("this service has no users yet: nobody is asked who they are (an admin starts with "
                        "python -m worker user add NAME --role admin)")
    user = accounts.sign_in(conn, args.token, address=socket.gethostname())
    path = users.save_token(args.token)
    print(f"logged in as {user.name} ({user.role.value}); token saved to {path} (mode 0600)")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    from worker import users

    conn = checked_connection()
    actor = acting_user(conn)
    limits = users.effective_limits(actor)
    if args.json:
        print_json({"name": actor.name, "role": actor.role.value, "users": users.any_users(conn),
                    "limits": dataclasses.asdict(limits)})
        return 0
    if not users.any_users(conn):
        print(f"{actor.name} ({actor.role.value}): no users registered, so nobody is asked who they are "
              "(python -m worker user add NAME --role admin turns the rules on)")
        return 0
    how = f"${users.TOKEN_ENV}" if _token_from_env() else str(users.token_file())
    print(f"{actor.name} ({actor.role.value}), token from {how}")
    print(f"limits: {_limits_text(limits)}")
    return 0


def _token_from_env() -> bool:
    from worker.users import TOKEN_ENV

    return bool(os.environ.get(TOKEN_ENV, "").strip())


def cmd_user_add(args: argparse.Namespace) -> int:
    from worker import accounts

    conn = checked_connection()
    user, token = accounts.add(conn, args.name, args.role, email=args.email, actor=acting_user(conn))
    print(f"added {user.name} ({user.role.value}){' <' + user.email + '>' if user.email else ''}")
    print(f"token (shown once; they run: python -m worker login TOKEN): {token}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    from worker import accounts

    conn = checked_connection()
    rows = accounts.listing(conn, actor=acting_user(conn))
    if args.json:
        print_json([u.public() for u in rows])
        return 0
    print(f"{'NAME':<20} {'ROLE':<10} {'CREATED':<19}  {'E-MAIL':<28} LIMITS")
    for u in rows:
        print(f"{u.name:<20} {u.role.value:<10} {timestamp(u.created_at):<19}  {u.email or '-':<28} "
              f"{_limits_text(u.limits)}")
    return 0


def cmd_user_role(args: argparse.Namespace) -> int:
    from worker import accounts

    conn = checked_connection()
    user = accounts.change_role(conn, args.name, args.role, actor=acting_user(conn))
    print(f"{user.name} is now {user.role.value}")
    return 0


_KEEP = object()


def _limit(text: str) -> int | None:
    """`--max-jobs` / `--max-gpus`: a whole number, or `default` (the service's, env USER_MAX_*)."""
    if text.strip().lower() == "default":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of at least 0, or default; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a whole number of at least 0, or default; got {text!r}")
    return value


def cmd_user_limits(args: argparse.Namespace) -> int:
    from worker import accounts, users

    conn = checked_connection()
    actor = acting_user(conn)
    old = users.get_user(conn, args.name).limits
    asked = {"max_active_jobs": args.max_jobs, "max_gpus": args.max_gpus, "high_priority": args.high_priority}
    if all(v is _KEEP for v in asked.values()):  # nothing to change: show them
        print(f"{args.name}: {_limits_text(old)}"
              f" (own; where none: the service default, env USER_MAX_ACTIVE_JOBS / USER_MAX_GPUS)")
        return 0
    new = users.UserLimits(**{k: getattr(old, k) if v is _KEEP else v for k, v in asked.items()})
    user = accounts.change_limits(conn, args.name, new, actor=actor)
    print(f"{user.name}: {_limits_text(user.limits)}")
    return 0


def cmd_user_token(args: argparse.Namespace) -> int:
    from worker import accounts, users

    conn = checked_connection()
    actor = acting_user(conn)
    token = accounts.new_token(conn, args.name, actor=actor)
    if actor.name == args.name and not _token_from_env():  # my own: keep this CLI working
        print(f"new token for {args.name} (the old one no longer works); saved to {users.save_token(token)}: {token}")
    else:
        print(f"new token for {args.name} (the old one no longer works; shown once): {token}")
    return 0


def cmd_user_rm(args: argparse.Namespace) -> int:
    from worker import accounts

    conn = checked_connection()
    accounts.remove(conn, args.name, actor=acting_user(conn))
    print(f"removed user {args.name} (what they made keeps their name as its owner)")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from worker import audit, users

    conn = checked_connection()
    audit.authorize(conn, acting_user(conn), users.Action.ADMIN, "read the audit log")
    since = parse_when(args.since) if args.since else None
    if args.json:  # JSON lines: what an admin exports (python -m worker audit --json > audit.jsonl)
        audit.export_jsonl(conn, sys.stdout, since=since, actor=args.user, limit=args.limit)
        return 0
    for e in audit.entries(conn, since=since, actor=args.user, limit=args.limit):
        where = f"{e.source}{'@' + e.address if e.address else ''}"
        detail = " ".join(f"{k}={v}" for k, v in e.detail.items() if v not in (None, "", [], {}))
        print(f"{timestamp(e.ts)}  {e.actor:<16} {e.role:<9} {e.action:<24} {e.target:<24} {where:<20} {detail}")
    return 0


def add_user_commands(sub: Any) -> None:
    """`login`, `whoami`, `user add|list|role|limits|token|rm` and `audit` under the `python -m worker` subparsers."""
    from worker.users import ROLES

    s = sub.add_parser("login", help="check a token against the service and save it for this CLI (mode 0600)")
    s.add_argument("token")
    s.set_defaults(func=_refusing(cmd_login))
    s = sub.add_parser("whoami", help="who this CLI acts as, with the role and limits")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_refusing(cmd_whoami))

    p = sub.add_parser("user", help="people: add, list, role, limits, token, rm (admins; the first user while none "
                                    "exists)")
    usub = p.add_subparsers(dest="user_command", required=True)
    s = usub.add_parser("add", help="add a user and print their token once (the first user must be an admin)")
    s.add_argument("name")
    s.add_argument("--role", required=True, choices=ROLES)
    s.add_argument("--email", default=None, help="their e-mail address (how single sign-on finds them)")
    s.set_defaults(func=_refusing(cmd_user_add))
    s = usub.add_parser("list", help="every user with role, e-mail and limits")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_refusing(cmd_user_list))
    s = usub.add_parser("role", help="change a user's role")
    s.add_argument("name")
    s.add_argument("role", choices=ROLES)
    s.set_defaults(func=_refusing(cmd_user_role))
    s = usub.add_parser("limits", help="show or change a user's limits (checked at submission)")
    s.add_argument("name")
    s.add_argument("--max-jobs", type=_limit, default=_KEEP, metavar="N|default",
                   help="jobs queued or running at once (default: env USER_MAX_ACTIVE_JOBS)")
    s.add_argument("--max-gpus", type=_limit, default=_KEEP, metavar="G|default",
                   help="GPUs of their queued and running jobs together (default: env USER_MAX_GPUS)")
    s.add_argument("--high-priority", action=argparse.BooleanOptionalAction, default=_KEEP,
                   help="may submit with priority high")
    s.set_defaults(func=_refusing(cmd_user_limits))
    s = usub.add_parser("token", help="issue a new token (the old one stops working): your own, or anyone's (admins)")
    s.add_argument("name")
    s.set_defaults(func=_refusing(cmd_user_token))
    s = usub.add_parser("rm", help="remove a user (what they made keeps their name)")
    s.add_argument("name")
    s.set_defaults(func=_refusing(cmd_user_rm))

    s = sub.add_parser("audit", help="the audit log, oldest first (admins); --json: JSON lines, for export")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.add_argument("--since", default=None, metavar="WHEN", help="30m, 12h, 7d, 2w, 2026-12-01[T09:30] or unix seconds")
    s.add_argument("--user", default=None, metavar="NAME", help="only this user's entries")
    s.add_argument("--limit", type=int, default=None, metavar="N", help="only the newest N entries")
    s.set_defaults(func=_refusing(cmd_audit))
