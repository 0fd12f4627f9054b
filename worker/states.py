"""Job states: the one place they are spelled. Worker, CLI and dashboard compare against these, never raw strings.

    queued ──start──▶ running ──▶ finished | failed | cancelled | pruned (a sweep's trial)
      │                 │  ▲
      │            worker died / shut down
      │                 ▼  │ start
      └──cancel──▶ cancelled   recovering ──cancel──▶ cancelled

The transitions themselves are Lua scripts in worker/record.py. A state is a `str`, so `"running" == JobState.RUNNING`
and `"running" in ACTIVE_STATES` hold; `str()` and f-strings give the value (what Redis stores).
"""
from __future__ import annotations

from enum import Enum


class TextEnum(str, Enum):
    """A `str` Enum whose `str()` and f-strings give the value (what Redis stores and users read)."""

    def __str__(self) -> str:
        return self.value


class JobState(TextEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RECOVERING = "recovering"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PRUNED = "pruned"
    """A sweep's trial that its pruner stopped early (distinct from cancelled and failed)."""

    @property
    def is_final(self) -> bool:
        """Finished, failed or cancelled: nothing changes it any more."""
        return self in FINAL_STATES

    @property
    def is_active(self) -> bool:
        """Queued, running or recovering: it still changes (pages showing it keep refreshing)."""
        return self in ACTIVE_STATES

    @classmethod
    def parse(cls, value: str | bytes | None) -> JobState | None:
        """The state a hash field holds (text or bytes), or None when empty or unknown (a deleted job)."""
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        try:
            return cls(value)
        except ValueError:
            return None


FINAL_STATES = frozenset({JobState.FINISHED, JobState.FAILED, JobState.CANCELLED, JobState.PRUNED})
"""States a job never leaves."""

ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.RECOVERING})
"""States that still change: every state that is not final."""

WAITING_STATES = frozenset({JobState.QUEUED, JobState.RECOVERING})
"""States in which a job waits for a worker (a multi-node job: for its gang)."""

