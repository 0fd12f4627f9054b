"""A sweep's record (the hash `trainer:sweep:<id>`, its field types in `SWEEP_CODEC`), its state, and the counts its
trials are shown by (`TrialCount`: a trial counted by its job's state). The table of trial numbers to job ids
(`trainer:sweep:<id>:trials`) is read here too, for the driver and the queries alike."""
from __future__ import annotations

from typing import Any

import redis

from worker import keys
from worker.errors import NoSuchSweepError
from worker.hashcodec import HashCodec, decode_reply
from worker.record import JobRecord
from worker.states import JobState, TextEnum


class SweepState(TextEnum):
    """A sweep's state: spelled as the job states of the same name, so pages badge both alike."""

    RUNNING = JobState.RUNNING.value
    FINISHED = JobState.FINISHED.value
    FAILED = JobState.FAILED.value
    CANCELLED = JobState.CANCELLED.value

    @property
    def is_final(self) -> bool:
        return self is not SweepState.RUNNING


class TrialCount(TextEnum):
    """The keys of `sweep_status`'s `counts`: a trial counted by its job's state. A finished job is a `complete`
    trial (Optuna's word) and a recovering one counts as running; the other keys are the job states themselves."""

    COMPLETE = "complete"
    PRUNED = JobState.PRUNED.value
    FAILED = JobState.FAILED.value
    CANCELLED = JobState.CANCELLED.value
    RUNNING = JobState.RUNNING.value
    QUEUED = JobState.QUEUED.value

    @classmethod
    def of(cls, state: str | None) -> TrialCount | None:
        """The count a trial whose job is in `state` falls under; None while it has no job state (asked)."""
        if state == JobState.FINISHED:
            return cls.COMPLETE
        if state == JobState.RECOVERING:
            return cls.RUNNING
        try:
            return cls(state)
        except ValueError:
            return None


ENDED_TRIALS = frozenset({TrialCount.COMPLETE, TrialCount.PRUNED, TrialCount.FAILED, TrialCount.CANCELLED})
"""The counts of trials that ended (`sweep_status`'s `ended` sums them)."""

SHOWN_TRIAL_COUNTS = (TrialCount.COMPLETE, TrialCount.PRUNED, TrialCount.FAILED, TrialCount.RUNNING,
                      TrialCount.QUEUED)
"""The counts tables show, in order: cancelled trials are shown among the failed (`shown_counts`)."""


def shown_counts(counts: dict[str, int]) -> dict[TrialCount, int]:
    """`counts` as the dashboard and the CLI show them: SHOWN_TRIAL_COUNTS, cancelled trials added to the failed."""
    return {k: counts.get(k, 0) + (counts.get(TrialCount.CANCELLED, 0) if k is TrialCount.FAILED else 0)
            for k in SHOWN_TRIAL_COUNTS}


SWEEP_CODEC = HashCodec(
    ints=frozenset({"trials", "parallel", "seed", "max_epochs", "gpus", "best_trial"}),
    floats=frozenset({"created_at", "updated_at", "ended_at", "best_value"}),
    jsons=frozenset({"config", "overrides", "space", "dataset", "best_params", "allow_local_paths"}),
)
"""Field types of a sweep's hash `trainer:sweep:<id>`; every other field is text."""


def read_sweep(conn: redis.Redis, sweep_id: str) -> dict[str, Any]:
    """The sweep's record, typed (NoSuchSweepError when unknown)."""
    raw = conn.hgetall(keys.sweep(sweep_id))
    if not raw:
        raise NoSuchSweepError(f"no such sweep {sweep_id!r}")
    return SWEEP_CODEC.decode(raw)


def trial_jobs(conn: redis.Redis, sweep_id: str) -> dict[int, str]:
    """Trial number → the id of its job, for every trial that has one."""
    return {int(decode_reply(k)): decode_reply(v) for k, v in conn.hgetall(keys.sweep_trials(sweep_id)).items()}


def job_states(conn: redis.Redis, job_ids: list[str]) -> list[tuple[str | None, str | None]]:
    """(state, error) of each job; (None, None) for a job that was deleted."""
    records = JobRecord.fetch_many(conn, job_ids, "error")
    return [(r.get("state"), r.get("error")) if r else (None, None) for r in map(records.get, job_ids)]
