"""The sweep's driver: `advance` brings a sweep up to date under the sweep's Redis lock (tell Optuna every trial whose
job ended, enqueue a trial asked but never enqueued, ask for and enqueue the next ones, end the sweep when every trial
has); `trial_ended` (the worker that ended a trial, the door's cancel), `heal_sweeps` (every worker's scan) and
`cancel_sweep` call it. Who calls it when: worker/sweeps/__init__.py and docs/sweeps.md.
"""
from __future__ import annotations

import logging
import math
import secrets
import time
from typing import Any

import redis

from worker import audit, keys, notify, users
from worker.artifacts import ArtifactStore
from worker.defaults import SWEEP_LOCK_TTL, SWEEP_LOCK_WAIT
from worker.errors import NoSuchSweepError, SubmissionError
from worker.hashcodec import decode_reply
from worker.jobs import cancel_job
from worker.states import FINAL_STATES, JobState
from worker.sweeps.record import SWEEP_CODEC, SweepState, job_states, read_sweep, trial_jobs
from worker.sweeps.space import apply_params, parse_space
from worker.sweeps.study import load_study, sampler_for

log = logging.getLogger("worker.sweeps")

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


def _submit_trial(conn: redis.Redis, rec: dict[str, Any], number: int, values: dict[str, Any],
                  store: ArtifactStore | None) -> str:
    from worker.submit import submit_job

    return submit_job(apply_params(rec["config"], values), connection=conn, gpus=int(rec["gpus"] or 1),
                      priority=rec["priority"] or "default", store=store,
                      allow_local_paths=bool(rec.get("allow_local_paths")),
                      name=f"{rec['name']} #{number}", actor=users.on_behalf_of(rec.get("owner")),
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
    jobs = trial_jobs(conn, sweep_id)
    running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    live = rec["state"] == SweepState.RUNNING.value
    first_error = rec.get("first_error")
    mapped = [t for t in running if t.number in jobs]
    for t, (state, error) in zip(mapped, job_states(conn, [jobs[t.number] for t in mapped])):
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
    if fields.get("state"):
        notify.emit(conn, "sweep.finished", {"id": sweep_id, "name": rec.get("name"), "state": fields["state"],
                                             "error": fields.get("error"), "best_value": fields.get("best_value"),
                                             "best_job": fields.get("best_job"),
                                             "url": notify.dashboard_link("sweeps", sweep=sweep_id)})


def _enqueue(conn: redis.Redis, rec: dict[str, Any], number: int, values: dict[str, Any],
             store: ArtifactStore | None) -> str:
    job_id = _submit_trial(conn, rec, number, values, store)
    if conn.hsetnx(keys.sweep_trials(rec["id"]), str(number), job_id):
        return job_id
    # another process enqueued this trial meanwhile (ours stalled past the lock's TTL): one job per trial (this one
    # was never recorded as the trial's, so the sweep has nothing to hear of its cancel)
    cancel_job(conn, job_id)
    return decode_reply(conn.hget(keys.sweep_trials(rec["id"]), str(number)))


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
            advance(conn, decode_reply(raw), wait=0)
        except Exception as err:  # noqa: BLE001 - one broken sweep must not stop the scan
            log.warning("sweep %s: scan could not advance it: %s", decode_reply(raw), err)


# ----------------------------------------------------------------------------------------------------------- cancel
def cancel_sweep(conn: redis.Redis, sweep_id: str, *, actor: users.Actor | None = None) -> str:
    """Cancel the sweep and every queued and running trial; returns the sweep's state afterwards. `actor`: the
    sweep's owner or an admin (PermissionDeniedError otherwise, nothing changed)."""
    owner = read_sweep(conn, sweep_id).get("owner") or users.OPERATOR
    actor = audit.authorize(conn, actor, users.Action.MANAGE, f"cancel sweep {sweep_id}", owner=owner)
    token = _acquire(conn, sweep_id, SWEEP_LOCK_WAIT)
    try:
        rec = read_sweep(conn, sweep_id)
        if rec["state"] != SweepState.RUNNING.value:
            return rec["state"]
        now = time.time()
        conn.hset(keys.sweep(sweep_id), mapping=SWEEP_CODEC.encode({"state": SweepState.CANCELLED, "ended_at": now,
                                                                    "updated_at": now,
                                                                    "error": "cancelled by request"}))
    finally:
        if token is not None:
            _release(conn, sweep_id, token)
    jobs = list(trial_jobs(conn, sweep_id).values())
    for job_id, (state, _) in zip(jobs, job_states(conn, jobs)):
        if state is not None and state not in FINAL_STATES:
            cancel_job(conn, job_id)
    advance(conn, sweep_id)  # tells Optuna about the trials that were only queued (no worker ends those)
    audit.record(conn, actor, audit.AuditAction.SWEEP_CANCEL, sweep_id, owner=owner)
    return SweepState.CANCELLED.value
