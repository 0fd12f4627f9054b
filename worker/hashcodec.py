"""Redis hashes hold strings only: one codec turns typed fields into hash strings and back. The job status hash
(worker/record.py) and the worker advertisement (worker/presence.py) each declare their field types with it.
"""
from __future__ import annotations

import dataclasses
import json
from enum import Enum
from typing import Any


def decode_reply(value: bytes | str) -> str:
    """A Redis reply (bytes: our clients are in bytes mode, as RQ expects) as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class HashCodec:
    """Field types of one kind of hash; any field not named is text. Empty strings decode to None."""

    ints: frozenset[str] = frozenset()
    floats: frozenset[str] = frozenset()
    jsons: frozenset[str] = frozenset()

    def decode_value(self, key: str, raw: bytes | str) -> Any:
        val = decode_reply(raw)
        if val == "":
            return None
        if key in self.ints:
            try:
                return int(float(val))
            except ValueError:
                return None
        if key in self.floats:
            try:
                return float(val)
            except ValueError:
                return None
        if key in self.jsons:
            try:
                return json.loads(val)
            except json.JSONDecodeError:
                return val
        return val

    def decode(self, raw: dict[bytes | str, bytes | str]) -> dict[str, Any]:
        """HGETALL reply → typed values."""
        return {decode_reply(k): self.decode_value(decode_reply(k), v) for k, v in raw.items()}

    @staticmethod
    def encode(fields: dict[str, Any]) -> dict[str, str]:
        """Typed values → hash strings (dicts/lists as JSON, None as empty, booleans as 1/0, enums by value)."""
        out = {}
        for k, v in fields.items():
            if v is None:
                out[k] = ""
            elif isinstance(v, bool):
                out[k] = "1" if v else "0"
            elif isinstance(v, Enum):
                out[k] = str(v.value)
            elif isinstance(v, (dict, list, tuple)):
                out[k] = json.dumps(v)
            else:
                out[k] = str(v)
        return out
