"""Reading sweeps: `sweep_status` (the record, its trial counts and progress, one row per trial), `list_sweeps`,
`sweep_trials`, Optuna's `importances` and the `optuna_study` itself. Nothing here writes."""
from __future__ import annotations

from typing import Any

import redis

from worker import keys
from worker.defaults import LIST_LIMIT
from worker.errors import NoSuchSweepError
from worker.hashcodec import decode_reply
from worker.record import JobRecord
from worker.states import JobState
from worker.users import OPERATOR
from worker.sweeps.record import ENDED_TRIALS, SweepState, TrialCount, job_states, read_sweep, trial_jobs
from worker.sweeps.study import load_study

GUARANTEED = ("best_trial", "best_value", "best_job", "best_params", "error", "ended_at")
"""Keys `sweep_status` always has (None until they apply)."""


def sweep_trials(conn: redis.Redis, sweep_id: str) -> list[dict[str, Any]]:
    """One row per trial, by number: number, job, state (the job's), value, params, epoch, error."""
    from optuna.trial import TrialState

    rec = read_sweep(conn, sweep_id)
    study = load_study(conn, sweep_id, rec)
    jobs = trial_jobs(conn, sweep_id)
    trials = study.get_trials(deepcopy=False)
    ids = [jobs.get(t.number) for t in trials]
    records = JobRecord.fetch_many(conn, [job_id for job_id in ids if job_id], "epoch", "error")
    out = []
    for t, job_id in zip(trials, ids):
        record = records.get(job_id) if job_id else None
        state = record.get("state") if record else None
        out.append({
            "number": t.number,
            "job": job_id,
            "state": state or (JobState.FAILED.value if t.state == TrialState.FAIL else "asked"),
            "value": t.value if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
            "optuna_state": t.state.name.lower(),
            "params": dict(t.params),
            "epoch": record.epoch if record else 0,
            "intermediate": {int(k): v for k, v in t.intermediate_values.items()},
            "error": record.get("error") if record else None,
        })
    return out


def _count(states: list[str]) -> dict[str, int]:
    counts = {k.value: 0 for k in TrialCount}
    for s in states:
        key = TrialCount.of(s)
        if key is not None:
            counts[key.value] += 1
    return counts


def sweep_status(conn: redis.Redis, sweep_id: str, *, with_trials: bool = True) -> dict[str, Any]:
    """The record plus `counts` (by trial state), `ended` (trials done), `progress` (0-1) and, by default,
    `trials_table` (sweep_trials)."""
    st = read_sweep(conn, sweep_id)
    for key in GUARANTEED:
        st.setdefault(key, None)
    st["owner"] = st.get("owner") or OPERATOR  # sweeps made before users are the operator's
    if with_trials:
        rows = sweep_trials(conn, sweep_id)
        st["trials_table"] = rows
        states = [r["state"] for r in rows]
    else:
        jobs = list(trial_jobs(conn, sweep_id).values())
        states = [s or JobState.FAILED.value for s, _ in job_states(conn, jobs)]
    st["counts"] = _count(states)
    st["ended"] = sum(st["counts"][k] for k in ENDED_TRIALS)
    st["progress"] = min(1.0, st["ended"] / max(1, int(st["trials"] or 1)))
    st["final"] = st["state"] != SweepState.RUNNING.value
    return st


def list_sweeps(conn: redis.Redis, *, limit: int = LIST_LIMIT, owner: str | None = None) -> list[dict[str, Any]]:
    """Sweeps, newest first, with counts and progress (no config, space or trials table); only `owner`'s if given."""
    out = []
    for raw in conn.zrevrange(keys.sweeps_index(), 0, max(0, limit - 1)):
        try:
            st = sweep_status(conn, decode_reply(raw), with_trials=False)
        except NoSuchSweepError:
            continue
        if owner is not None and st["owner"] != owner:
            continue
        for k in ("config", "overrides", "dataset"):
            st.pop(k, None)
        out.append(st)
    return out


def importances(conn: redis.Redis, sweep_id: str) -> dict[str, float]:
    """Optuna's parameter importances (its default evaluator) over the complete trials; {} with fewer than two
    complete trials or when they cannot be computed (e.g. every value equal)."""
    from optuna.importance import get_param_importances
    from optuna.trial import TrialState

    rec = read_sweep(conn, sweep_id)
    study = load_study(conn, sweep_id, rec)
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    try:
        return {k: float(v) for k, v in get_param_importances(study).items()}
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def optuna_study(conn: redis.Redis, sweep_id: str) -> Any:
    """The sweep's Optuna study (for Optuna's own plots and for optuna-dashboard)."""
    return load_study(conn, sweep_id, read_sweep(conn, sweep_id))
