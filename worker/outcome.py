"""How an attempt ends: `Outcome` (what stopped it early), `AttemptResult` (the final state and why: the one type an
attempt's steps end with) and `last_words` (why a training command failed, read from its output)."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from worker.states import JobState, TextEnum


class Outcome(TextEnum):
    """Why an attempt ended early: its command was stopped (or, after a failed exit, what its failure really was),
    or the job was not this attempt's to run."""

    CANCEL = "cancel"
    LOST = "lost"
    """The job is no longer this attempt's (recovered elsewhere, re-queued by a multi-node peer, deleted)."""
    SHUTDOWN = "shutdown"
    PRUNE = "prune"
    TIMEOUT = "timeout"
    MEMORY = "memory"
    """Its processes held more than the job's memory bound (worker/memlimit.py)."""
    SKIPPED = "skipped"
    """Not this attempt's to run: cancelled while queued, deleted, already running elsewhere."""


@dataclasses.dataclass(frozen=True)
class AttemptResult:
    """How one attempt ended. RQ stores `as_json()` as the job's result; the worker acts on `state` (a sweep's trial
    that ended tells its sweep; a failure recorded by this attempt fails RQ's job too)."""

    job_id: str
    state: JobState | None
    """The job's state as this attempt left it: the final state it recorded, `recovering` when it gave the job back,
    or, when its write was refused, the state the job was in instead. For a node after the first of a multi-node job,
    that node's own end (node 0 records the job's). None: it left no state (skipped, lost, stopped before its
    command started, or the job was deleted)."""
    why: Outcome | None = None
    """What ended it early; None when its command exited by itself (or a step before it failed)."""
    error: str | None = None
    error_kind: str | None = None
    exit_code: int | None = None
    primary: bool = True
    """False for a node after the first of a multi-node job: its `state` is its own, not the job's."""

    @property
    def failed_job(self) -> bool:
        """The job failed, and this attempt speaks for it (RQ's failed registry then agrees with our status)."""
        return self.primary and self.state is JobState.FAILED

    def as_json(self) -> dict[str, Any]:
        """Plain JSON (RQ's serializer): the state and outcome by value."""
        return {"job_id": self.job_id, "state": self.state.value if self.state else None,
                "why": self.why.value if self.why else None, "error": self.error, "error_kind": self.error_kind,
                "exit_code": self.exit_code, "primary": self.primary}


_OUTPUT_PREFIX = re.compile(r"^(\[node \d+\] )?(\[rank\d+\]: ?)?")
"""What is put in front of a training line: this worker's node tag (multi-node), torchrun's rank tag."""

SUMMARY_TAG = "[torchrun]"
"""What starts python -m worker.torchrun's one-line summary of a failed rank (worker/torchrun.py)."""

_NOT_LAST_WORDS = re.compile(rf"^(\[worker\]|{re.escape(SUMMARY_TAG)}|[EWI]\d{{4}} \d\d:\d\d:\d\d\.\d+ +\d+ )")
"""Lines that never say why training failed: the worker's notes, torchrun's summary and torch's own log lines
(glog layout: `E1207 15:55:25.528000 2547 path.py:1002] failed (exitcode: 2) ...`)."""


def last_words(lines: list[str]) -> str | None:
    """The exception line of the last Python traceback in a training output (`ValueError: ...`), else its last line
    that is not the worker's own note, python -m worker.torchrun's summary or torch's own log line
    (`_NOT_LAST_WORDS`); None when there is none. Only Python's traceback layout is relied on, never the wording of
    core's messages."""
    output = [_OUTPUT_PREFIX.sub("", line).rstrip() for line in lines]
    output = [line for line in output if line.strip() and not _NOT_LAST_WORDS.match(line)]
    starts = [i for i, line in enumerate(output) if line.startswith("Traceback (most recent call last)")]
    if starts:
        for line in output[starts[-1] + 1:]:
            if not line.startswith((" ", "\t")):  # the first unindented line after the frames names the exception
                return line.strip()
    return output[-1].strip() if output else None
