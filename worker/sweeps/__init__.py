"""Sweeps: hyper-parameter search where every trial is an ordinary job, driven by no process of its own.

    create_sweep(config, space, connection=..., trials=, parallel=, metric=, direction=, sampler=, pruner=) -> id
    advance(conn, sweep_id)         tell Optuna every trial whose job ended, ask for and enqueue the next ones
    cancel_sweep(conn, sweep_id)    sweep_status(conn, sweep_id)    list_sweeps(conn)    sweep_trials(conn, id)
    TrialMonitor                    reports a running trial's epoch metric to Optuna; says when to prune it

Who drives a sweep: whoever notices a change. `create_sweep` enqueues the first `parallel` trials; the worker that
ends a trial calls `advance`, which (under the sweep's Redis lock) tells Optuna the result and asks for and enqueues
the next trial; every worker also advances the sweeps in `trainer:sweeps:active` every SWEEP_SCAN_INTERVAL seconds
(from its heartbeat, in a thread of its own), which heals whatever a dead process left half done (a trial asked but
never enqueued is enqueued; a trial whose job ended but was never told is told). A trial whose worker dies is an ordinary job: it
is recovered and resumes; Optuna hears of it once, when its job reaches a final state. Design: docs/sweeps.md.
"""
from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import redis

from worker import keys
from worker.artifacts import ArtifactStore
from worker.connection import check
from worker.defaults import LIST_LIMIT, PRIORITIES, SWEEP_LOCK_TTL, SWEEP_LOCK_WAIT
from worker.errors import NoSuchSweepError, SubmissionError
from worker.hashcodec import HashCodec, text
from worker.record import JobRecord
from worker.sweeps.space import (
    Param,
    apply_params,
    grid_size,
    load_space,
    parse_space,
    space_to_dict,
    validate_space,
)
from worker.states import FINAL_STATES, JobState, TextEnum
from worker.sweeps.study import (
    PRUNERS,
    SAMPLERS,
    create_study,
    load_study,
    sampler_for,
    storage_for,
    trial_id,
)

log = logging.getLogger("worker.sweeps")


class SweepState(TextEnum):
    """A sweep's state: spelled as the job states of the same name, so pages badge both alike."""

    RUNNING = JobState.RUNNING.value
    FINISHED = JobState.FINISHED.value
    FAILED = JobState.FAILED.value
    CANCELLED = JobState.CANCELLED.value

    @property
    def is_final(self) -> bool:
        return self is not SweepState.RUNNING


DIRECTIONS = ("maximize", "minimize")


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


GUARANTEED = ("best_trial", "best_value", "best_job", "best_params", "error", "ended_at")
"""Keys `sweep_status` always has (None until they apply)."""

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


def default_direction(metric: str) -> str:
    """Losses and seconds are minimised, everything else (accuracies, F1, images/s) maximised."""
    return "minimize" if metric.endswith("loss") or metric == "seconds" else "maximize"


# ------------------------------------------------------------------------------------------------------- creation
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SubmissionError(f"{name}: must be a whole number of at least 1, got {value!r}")
    return value


def check_settings(*, trials: Any, parallel: Any, metric: str, direction: str | None, sampler: str,
                   pruner: str) -> str:
    """The sweep's own settings; returns the direction (the metric's default when None)."""
    from core.events import EPOCH_METRICS

    _positive_int("trials", trials)
    _positive_int("parallel", parallel)
    if metric not in EPOCH_METRICS:
        raise SubmissionError(f"metric: no epoch event carries {metric!r}; choose from {', '.join(EPOCH_METRICS)}")
    direction = direction or default_direction(metric)
    if direction not in DIRECTIONS:
        raise SubmissionError(f"direction: unknown {direction!r}; choose from {', '.join(DIRECTIONS)}")
    if sampler not in SAMPLERS:
        raise SubmissionError(f"sampler: unknown {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise SubmissionError(f"pruner: unknown {pruner!r}; choose from {', '.join(PRUNERS)}")
    return direction


def create_sweep(
    config: dict[str, Any] | str | Path,
    space: dict[str, Any] | str | Path | list[Param],
    *,
    connection: redis.Redis,
    trials: int,
    parallel: int,
    metric: str = "val_acc",
    direction: str | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    name: str | None = None,
    overrides: list[str] | None = None,
    gpus: int = 1,
    priority: str = "default",
    dataset_path: str | Path | None = None,
    allow_local_paths: bool = False,
    seed: int | None = None,
    store: ArtifactStore | None = None,
) -> str:
    """Validate everything, create the study, enqueue the first trials; returns the sweep id.

    SubmissionError (CLI exit 2) when anything is wrong, and then nothing was written or enqueued: unknown keys, a
    range or choice the config schema refuses (both ends of every range and every choice are validated as a job
    would be), empty choices, low > high, trials or parallel < 1, a metric no epoch event carries.
    """
    from worker.submit import (
        check_batch_size,
        check_gpus,
        resolve_dataset,
        train_images,
        validate_config,
    )

    direction = check_settings(trials=trials, parallel=parallel, metric=metric, direction=direction,
                               sampler=sampler, pruner=pruner)
    if priority not in PRIORITIES:
        raise SubmissionError(f"priority: unknown {priority!r}; choose from {', '.join(PRIORITIES)}")
    if isinstance(space, list):
        params = space
    elif isinstance(space, dict):
        params = parse_space(space)
    else:
        params = load_space(space)
    overrides = list(overrides or [])
    if dataset_path is not None:
        overrides += ["data.name=imagefolder", f"data.path={Path(dataset_path)}"]
    base = validate_config(config, overrides)
    if sampler == "grid":
        size = grid_size(params)
        if size is None:
            continuous = [p.key for p in params if p.grid() is None]
            raise SubmissionError(f"sampler grid: {', '.join(continuous)} is a continuous range; give it a step "
                                  "or use choice")
        if trials > size:
            raise SubmissionError(f"trials: the grid has {size} point(s); ask for at most {size} trials")
    check(connection)
    check_gpus(connection, gpus)
    store = store or ArtifactStore()

    def check_one(cfg: dict[str, Any]) -> None:  # the submission's own checks, for one set of values
        resolved = validate_config(cfg)
        if resolved["data"]["name"] != "imagefolder":
            check_batch_size(resolved, train_images(resolved), gpus)
        elif report is not None:
            check_batch_size(resolved, train_images(resolved, report), gpus)

    report = None
    validate_space(params, base, check_one)  # before any upload: a refusal writes nothing
    dataset, report = resolve_dataset(base, dataset_path=dataset_path, store=store,
                                      allow_local_paths=allow_local_paths, gpus=gpus)
    if report is not None:
        validate_space(params, base, check_one)  # now with the dataset's size (batch sizes vs its train split)

    epochs = [base["train"]["epochs"]] + [v for p in params if p.key == "train.epochs" for v in p.values_to_check()]
    sweep_id = keys.new_job_id()
    now = time.time()
    record = {
        "id": sweep_id,
        "name": name or f"{base['model']['name']} on {base['data']['name']}",
        "state": SweepState.RUNNING,
        "trials": trials,
        "parallel": parallel,
        "metric": metric,
        "direction": direction,
        "sampler": sampler,
        "pruner": pruner,
        "seed": secrets.randbelow(2**31) if seed is None else int(seed),
        "max_epochs": max(int(e) for e in epochs),
        "gpus": gpus,
        "priority": priority,
        "allow_local_paths": bool(allow_local_paths),
        "config": base,
        "overrides": overrides,
        "space": space_to_dict(params),
        "dataset": dataset,
        "created_at": now,
        "updated_at": now,
    }
    create_study(connection, sweep_id, direction)
    with connection.pipeline() as pipe:
        pipe.hset(keys.sweep(sweep_id), mapping=SWEEP_CODEC.encode(record))
        pipe.zadd(keys.sweeps_index(), {sweep_id: now})
        pipe.sadd(keys.active_sweeps(), sweep_id)
        pipe.execute()
    advance(connection, sweep_id, store=store)
    return sweep_id


# ------------------------------------------------------------------------------------------------------- the lock
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def _acquire(conn: redis.Redis, sweep_id: str, wait: float) -> str | None:
    token = secrets.token_hex(8)
    deadline = time.monotonic() + wait
    while True:
        if conn.set(keys.sweep_lock(sweep_id), token, nx=True, px=int(SWEEP_LOCK_TTL * 1000)):
            return token
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _release(conn: redis.Redis, sweep_id: str, token: str) -> None:
    conn.eval(_RELEASE, 1, keys.sweep_lock(sweep_id), token)


def _still_held(conn: redis.Redis, sweep_id: str, token: str) -> bool:
    """Renew the lock for another SWEEP_LOCK_TTL; False when it expired and may be someone else's now (a holder
    stalled for longer than the TTL must not ask Optuna for more trials)."""
    return bool(conn.eval(_EXTEND, 1, keys.sweep_lock(sweep_id), token, int(SWEEP_LOCK_TTL * 1000)))


# -------------------------------------------------------------------------------------------------- the sweep loop
def objective(conn: redis.Redis, job_id: str, metric: str, direction: str) -> float | None:
    """The trial's value: the best `metric` over its epoch events (max or min by direction), None when none has it."""
    from worker.chartstream import epoch_events

    values = [float(e[metric]) for e in epoch_events(conn, job_id)
              if isinstance(e.get(metric), (int, float)) and math.isfinite(e[metric])]
    if not values:
        return None
    return max(values) if direction == "maximize" else min(values)


def _job_states(conn: redis.Redis, job_ids: list[str]) -> list[tuple[str | None, str | None]]:
    """(state, error) of each job; (None, None) for a job that was deleted."""
    records = JobRecord.fetch_many(conn, job_ids, "error")
    return [(r.get("state"), r.get("error")) if r else (None, None) for r in map(records.get, job_ids)]


def _submit_trial(conn: redis.Redis, rec: dict[str, Any], number: int, values: dict[str, Any],
                  store: ArtifactStore | None) -> str:
    from worker.submit import submit_job

    return submit_job(apply_params(rec["config"], values), connection=conn, gpus=int(rec["gpus"] or 1),
                      priority=rec["priority"] or "default", store=store,
                      allow_local_paths=bool(rec.get("allow_local_paths")),
                      name=f"{rec['name']} #{number}",
                      extra={"sweep": rec["id"], "trial": number, "params": values}).job_id


def advance(conn: redis.Redis, sweep_id: str, *, wait: float = SWEEP_LOCK_WAIT,
            store: ArtifactStore | None = None) -> bool:
    """Bring the sweep up to date (see the module docstring). False when another process held the lock for `wait`
    seconds (it is doing the same work; the heartbeat scan comes back)."""
    token = _acquire(conn, sweep_id, wait)
    if token is None:
        return False
    try:
        _advance(conn, sweep_id, store, token)
    finally:
        _release(conn, sweep_id, token)
    return True


def _advance(conn: redis.Redis, sweep_id: str, store: ArtifactStore | None, token: str) -> None:
    from optuna.trial import TrialState

    try:
        rec = read_sweep(conn, sweep_id)
    except NoSuchSweepError:
        conn.srem(keys.active_sweeps(), sweep_id)
        return
    params = parse_space(rec["space"])
    study = load_study(conn, sweep_id, rec, params)
    jobs = {int(text(k)): text(v) for k, v in conn.hgetall(keys.sweep_trials(sweep_id)).items()}
    running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    live = rec["state"] == SweepState.RUNNING.value
    first_error = rec.get("first_error")
    mapped = [t for t in running if t.number in jobs]
    for t, (state, error) in zip(mapped, _job_states(conn, [jobs[t.number] for t in mapped])):
        if state is not None and state not in FINAL_STATES:
            continue  # queued, running, recovering: not ended yet (None: its job was deleted)
        job_id = jobs[t.number]
        if state == JobState.FINISHED:
            value = objective(conn, job_id, rec["metric"], rec["direction"])
            if value is not None:
                study.tell(t.number, value, skip_if_finished=True)
                continue
            error = f"no epoch event of job {job_id} carried {rec['metric']}"
        if state == JobState.PRUNED:
            study.tell(t.number, state=TrialState.PRUNED, skip_if_finished=True)
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        if state != JobState.CANCELLED and not first_error:
            first_error = f"trial {t.number} (job {job_id}): {error or state or 'its job was deleted'}"
    for t in running:
        if t.number in jobs:
            continue
        if not live:  # asked, never enqueued, and the sweep is over: it never ran
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            continue
        try:  # asked by a process that died before it enqueued the job: enqueue it now
            jobs[t.number] = _enqueue(conn, rec, t.number, dict(t.params), store)
        except SubmissionError as err:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            first_error = first_error or f"trial {t.number}: {err}"

    all_trials = study.get_trials(deepcopy=False)
    active = sum(1 for t in all_trials if t.state == TrialState.RUNNING)
    distributions = {p.key: p.distribution() for p in params}
    while live and active < int(rec["parallel"]) and len(all_trials) < int(rec["trials"]):
        if not _still_held(conn, sweep_id, token):
            log.warning("sweep %s: lost its lock while advancing; the next scan goes on", sweep_id)
            return
        study.sampler = sampler_for(rec, params, len(all_trials))
        trial = study.ask(distributions)
        try:
            _enqueue(conn, rec, trial.number, dict(trial.params), store)
            active += 1
        except SubmissionError as err:
            study.tell(trial.number, state=TrialState.FAIL)
            first_error = first_error or f"trial {trial.number}: {err}"
        all_trials = study.get_trials(deepcopy=False)

    fields: dict[str, Any] = {"updated_at": time.time(), "first_error": first_error}
    done = [t for t in all_trials if t.state.is_finished()]
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    if complete:
        best = max(complete, key=lambda t: t.value if rec["direction"] == "maximize" else -t.value)
        fields.update(best_trial=best.number, best_value=best.value, best_job=jobs.get(best.number),
                      best_params=dict(best.params))
    if active == 0 and (not live or len(done) >= int(rec["trials"])):
        if live:
            every_failed = all(t.state == TrialState.FAIL for t in done)
            fields["state"] = SweepState.FAILED if every_failed else SweepState.FINISHED
            fields["error"] = (first_error or "every trial was cancelled") if every_failed else None
            fields["ended_at"] = time.time()
        conn.srem(keys.active_sweeps(), sweep_id)
    conn.hset(keys.sweep(sweep_id), mapping=SWEEP_CODEC.encode(fields))


def _enqueue(conn: redis.Redis, rec: dict[str, Any], number: int, values: dict[str, Any],
             store: ArtifactStore | None) -> str:
    job_id = _submit_trial(conn, rec, number, values, store)
    if conn.hsetnx(keys.sweep_trials(rec["id"]), str(number), job_id):
        return job_id
    # another process enqueued this trial meanwhile (ours stalled past the lock's TTL): one job per trial
    from worker.api import cancel_job

    cancel_job(conn, job_id)
    return text(conn.hget(keys.sweep_trials(rec["id"]), str(number)))


def trial_ended(conn: redis.Redis, sweep_id: str, *, wait: float = SWEEP_LOCK_WAIT) -> None:
    """A trial's job reached a final state (called by the worker that ended it): advance the sweep. Never raises:
    the heartbeat scan retries whatever this could not do."""
    try:
        advance(conn, sweep_id, wait=wait)
    except Exception as err:  # noqa: BLE001 - a job's own outcome must not depend on its sweep
        log.warning("sweep %s: could not advance after a trial ended: %s", sweep_id, err)


def heal_sweeps(conn: redis.Redis) -> None:
    """Advance every active sweep whose lock is free (the workers' periodic scan)."""
    try:
        active = conn.smembers(keys.active_sweeps())
    except redis.exceptions.RedisError:
        return  # Redis away: the next scan tries again
    for raw in active:
        try:
            advance(conn, text(raw), wait=0)
        except Exception as err:  # noqa: BLE001 - one broken sweep must not stop the scan
            log.warning("sweep %s: scan could not advance it: %s", text(raw), err)


# ---------------------------------------------------------------------------------------------------- cancel, read
def cancel_sweep(conn: redis.Redis, sweep_id: str) -> str:
    """Cancel the sweep and every queued and running trial; returns the sweep's state afterwards."""
    from worker.api import cancel_job

    token = _acquire(conn, sweep_id, SWEEP_LOCK_WAIT)
    try:
        rec = read_sweep(conn, sweep_id)
        if rec["state"] != SweepState.RUNNING.value:
            return rec["state"]
        now = time.time()
        conn.hset(keys.sweep(sweep_id), mapping=SWEEP_CODEC.encode({"state": SweepState.CANCELLED, "ended_at": now,
                                                          "updated_at": now, "error": "cancelled by request"}))
    finally:
        if token is not None:
            _release(conn, sweep_id, token)
    jobs = [text(v) for v in conn.hvals(keys.sweep_trials(sweep_id))]
    for job_id, (state, _) in zip(jobs, _job_states(conn, jobs)):
        if state is not None and state not in FINAL_STATES:
            cancel_job(conn, job_id)
    advance(conn, sweep_id)  # tells Optuna about the trials that were only queued
    return SweepState.CANCELLED.value


def sweep_trials(conn: redis.Redis, sweep_id: str) -> list[dict[str, Any]]:
    """One row per trial, by number: number, job, state (the job's), value, params, epoch, error."""
    from optuna.trial import TrialState

    rec = read_sweep(conn, sweep_id)
    study = load_study(conn, sweep_id, rec)
    jobs = {int(text(k)): text(v) for k, v in conn.hgetall(keys.sweep_trials(sweep_id)).items()}
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
    if with_trials:
        rows = sweep_trials(conn, sweep_id)
        st["trials_table"] = rows
        states = [r["state"] for r in rows]
    else:
        jobs = [text(v) for v in conn.hvals(keys.sweep_trials(sweep_id))]
        states = [s or JobState.FAILED.value for s, _ in _job_states(conn, jobs)]
    st["counts"] = _count(states)
    st["ended"] = sum(st["counts"][k] for k in ENDED_TRIALS)
    st["progress"] = min(1.0, st["ended"] / max(1, int(st["trials"] or 1)))
    st["final"] = st["state"] != SweepState.RUNNING.value
    return st


def list_sweeps(conn: redis.Redis, *, limit: int = LIST_LIMIT) -> list[dict[str, Any]]:
    """Sweeps, newest first, with counts and progress (no config, space or trials table)."""
    out = []
    for raw in conn.zrevrange(keys.sweeps_index(), 0, max(0, limit - 1)):
        try:
            st = sweep_status(conn, text(raw), with_trials=False)
        except NoSuchSweepError:
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


# ------------------------------------------------------------------------------------------------------- pruning
class TrialMonitor:
    """Reports a running trial's epoch metric to Optuna as its epoch events arrive and asks the pruner.

    The worker running the trial's job calls `poll()` on every tick of its job loop; a non-empty reply is why the
    trial should stop now (its job then ends `pruned`). Any error here is logged and the trial runs on: pruning is
    an optimisation, never a reason for a job to fail.
    """

    def __init__(self, conn: redis.Redis, sweep_id: str, number: int, job_id: str):
        self.conn = conn
        self.sweep_id = sweep_id
        self.number = number
        self.job_id = job_id
        self.last_id = "0"
        self.trial: Any = None
        self.trial_id = -1
        self.metric = ""
        self.pruner = ""
        self.broken = False
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Import Optuna, replay the sweep's journal and import what submitting the next trial validates with (the
        config schema's model list: torch, which a CPU worker has not imported) in the background while the trial
        starts: the worker's first trial would otherwise pay for all three (seconds) between its end and the next
        trial's enqueue."""
        def load() -> None:
            try:
                self._trial()
                from core.models import list_models

                list_models()
            except Exception as err:  # noqa: BLE001 - poll() tries again and reports
                log.debug("sweep %s: preparing trial %d: %s", self.sweep_id, self.number, err)

        threading.Thread(target=load, name=f"sweep-{self.sweep_id}-prepare", daemon=True).start()

    def _trial(self) -> Any:
        with self._lock:
            return self._load_trial()

    def _load_trial(self) -> Any:
        if self.trial is None:
            import optuna

            rec = read_sweep(self.conn, self.sweep_id)
            self.metric, self.pruner = rec["metric"], rec["pruner"]
            study = load_study(self.conn, self.sweep_id, rec)
            self.trial_id = trial_id(self.conn, self.sweep_id, self.number)
            self.trial = optuna.Trial(study, self.trial_id)
        return self.trial

    def poll(self) -> str | None:
        if self.broken:
            return None
        from worker.streaming import events_since

        try:
            events = events_since(self.conn, self.job_id, self.last_id, count=1000)
            if not events:
                return None
            self.last_id = events[-1]["id"]
            epochs = [e["data"] for e in events if e["type"] == "epoch"]
            if not epochs:
                return None
            trial = self._trial()
            reported = storage_for(self.conn, self.sweep_id).get_trial(self.trial_id).intermediate_values
            for data in epochs:
                value, step = data.get(self.metric), int(data.get("epoch") or 0)
                if step in reported or not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                trial.report(float(value), step)
                last = step >= int(data.get("epochs") or 0)  # stopping at the last epoch would save nothing
                if not last and self.pruner != "none" and trial.should_prune():
                    return f"pruned by the sweep's {self.pruner} pruner at epoch {step} ({self.metric} {value:.4g})"
        except redis.exceptions.RedisError:
            return None  # Redis away for a moment: the next tick reads the same events again
        except Exception as err:  # noqa: BLE001 - see the class docstring
            log.warning("sweep %s trial %d: pruning disabled for this attempt: %s", self.sweep_id, self.number, err)
            self.broken = True
        return None
