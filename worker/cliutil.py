"""Small helpers the `python -m worker` subcommand modules share: a checked connection, byte counts, JSON output."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any


def checked_connection() -> Any:
    """A Redis client that answered PING (RedisUnavailableError with the reason otherwise)."""
    from worker.connection import check, connect

    return check(connect())


def human_bytes(n: float) -> str:
    """1234567 → '1.2 MB' (decimal units, as `du -h --si`)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def timestamp(t: float | None) -> str:
    return datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def refusing(*errors: type[Exception]) -> Callable[[Callable[[argparse.Namespace], int]],
                                                  Callable[[argparse.Namespace], int]]:
    """Wrap a subcommand so that one of `errors` (a refusal: nothing was changed) is one line on stderr and exit 2."""
    def wrap(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            try:
                return int(func(args) or 0)
            except errors as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        return run
    return wrap


def acting_user(conn: Any) -> Any:
    """Who a changing command acts as (worker.users.cli_actor: the token's user; the operator while no user exists)."""
    from worker.users import cli_actor

    return cli_actor(conn)


def owner_filter(args: argparse.Namespace, conn: Any) -> str | None:
    """A listing's `owner` argument: with `--mine`, the CLI user's name; else None (everyone's)."""
    return acting_user(conn).name if getattr(args, "mine", False) else None


def add_mine(parser: argparse.ArgumentParser) -> None:
    """The `--mine` flag of a listing command."""
    parser.add_argument("--mine", action="store_true", help="only what I made (the user of TRAINER_TOKEN or login)")
