"""Sweeps: hyper-parameter search where every trial is an ordinary job, driven by no process of its own.

    create_sweep(config, space, connection=..., trials=, parallel=, metric=, direction=, sampler=, pruner=) -> id
    advance(conn, sweep_id)         tell Optuna every trial whose job ended, ask for and enqueue the next ones
    cancel_sweep(conn, sweep_id)    sweep_status(conn, sweep_id)    list_sweeps(conn)    sweep_trials(conn, id)
    TrialMonitor                    reports a running trial's epoch metric to Optuna; says when to prune it

Who drives a sweep: whoever notices a change. `create_sweep` enqueues the first `parallel` trials; the worker that
ends a trial calls `advance`, which (under the sweep's Redis lock) tells Optuna the result and asks for and enqueues
the next trial; every worker also advances the sweeps in `trainer:sweeps:active` every SWEEP_SCAN_INTERVAL seconds
(from its heartbeat, in a thread of its own), which heals whatever a dead process left half done (a trial asked but
never enqueued is enqueued; a trial whose job ended but was never told is told). A trial whose worker dies is an
ordinary job: it is recovered and resumes; Optuna hears of it once, when its job reaches a final state.

One idea per module: `record` (the sweep's hash, its state and trial counts), `create` (checks and creation),
`driver` (the lock, `advance`, cancel), `queries` (status, list, importances), `monitor` (pruning), `space` (the
space file), `study` (the Optuna study in Redis). They import one another directly, never this package, and none
imports the door (worker/api.py). Design: docs/sweeps.md.
"""
from __future__ import annotations

from worker.sweeps.create import DIRECTIONS, SweepSettings, check_settings, create_sweep, default_direction
from worker.sweeps.driver import advance, cancel_sweep, heal_sweeps, objective, trial_ended
from worker.sweeps.monitor import TrialMonitor
from worker.sweeps.queries import importances, list_sweeps, optuna_study, sweep_status, sweep_trials
from worker.sweeps.record import (
    ENDED_TRIALS,
    SHOWN_TRIAL_COUNTS,
    SWEEP_CODEC,
    SweepState,
    TrialCount,
    read_sweep,
    shown_counts,
)
from worker.sweeps.study import PRUNERS, SAMPLERS, storage_for

__all__ = [
    "DIRECTIONS", "ENDED_TRIALS", "PRUNERS", "SAMPLERS", "SHOWN_TRIAL_COUNTS", "SWEEP_CODEC", "SweepSettings",
    "SweepState", "TrialCount", "TrialMonitor", "advance", "cancel_sweep", "check_settings", "create_sweep",
    "default_direction", "heal_sweeps", "importances", "list_sweeps", "objective", "optuna_study", "read_sweep",
    "shown_counts", "storage_for", "sweep_status", "sweep_trials", "trial_ended",
]
