"""Small helpers the `python -m worker` subcommand modules share: a checked connection, byte counts, JSON output."""
from __future__ import annotations

import json
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
