"""`python -m worker notify add | list | rm | log` (README "Notifications"): the webhooks of worker/notify.py."""
from __future__ import annotations

import argparse
from typing import Any

from worker.cliutil import acting_user, checked_connection, print_json, refusing, timestamp
from worker.notify import HookError

_refusing = refusing(HookError)


def cmd_add(args: argparse.Namespace) -> int:
    from worker.notify import add_hook

    events = [e.strip() for e in args.events.split(",") if e.strip()] if args.events else None
    conn = checked_connection()
    hook = add_hook(conn, args.url, events, args.secret, actor=acting_user(conn))
    print(f"hook {hook.id}: {hook.url} ({', '.join(hook.events)}){' signed' if hook.secret else ''}"
          f"{' (Slack format)' if hook.slack else ''}")
    print(hook.id)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from worker.notify import delivery_log, list_hooks

    conn = checked_connection()
    rows = [{**h.public(), "last": (delivery_log(conn, h.id, 1) or [None])[0]} for h in list_hooks(conn)]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no hooks (python -m worker notify add URL)")
    for r in rows:
        last = r["last"]
        said = "never delivered" if last is None else (
            f"last {'ok' if last['ok'] else 'failed'} {timestamp(last['at'])} ({last['event']})")
        print(f"{r['id']}  {r['url']}  {','.join(r['events'])}{'  signed' if r['signed'] else ''}  {said}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from worker.notify import remove_hook

    conn = checked_connection()
    remove_hook(conn, args.id, actor=acting_user(conn))
    print(f"removed hook {args.id}")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    from worker.notify import delivery_log

    rows = delivery_log(checked_connection(), args.id, args.n)
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        print(f"{timestamp(r['at'])}  {r['event']:<16} {r.get('id') or '':<24} try {r['attempt']}  "
              f"{'ok' if r['ok'] else 'failed'} {r['status'] or ''} {r['error'] or ''}")
    return 0


def add_notify_commands(sub: Any) -> None:
    """`notify add|list|rm|log` under the `python -m worker` subparsers `sub`."""
    from worker.notify import EVENTS

    p = sub.add_parser("notify", help="webhooks: told when jobs end, sweeps finish, models are registered")
    nsub = p.add_subparsers(dest="notify_command", required=True)
    s = nsub.add_parser("add", help="add a webhook (prints its id last)")
    s.add_argument("url")
    s.add_argument("--events", help=f"comma-separated, default all: {','.join(EVENTS)}")
    s.add_argument("--secret", help="sign each body: X-Trainer-Signature: sha256=HMAC-SHA256(secret, body)")
    s.set_defaults(func=_refusing(cmd_add))
    s = nsub.add_parser("list", help="every webhook and its last delivery")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_refusing(cmd_list))
    s = nsub.add_parser("rm", help="remove a webhook")
    s.add_argument("id")
    s.set_defaults(func=_refusing(cmd_rm))
    s = nsub.add_parser("log", help="a webhook's delivery attempts, newest first")
    s.add_argument("id")
    s.add_argument("-n", type=int, default=50)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_refusing(cmd_log))
