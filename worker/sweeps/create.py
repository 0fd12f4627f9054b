"""Creating a sweep: its own settings checked (`check_settings`), the request checked by submission's own checks
(`worker.submit.check_request`: priority, the dataset path, Redis, the GPUs), every value the sampler may pick put
through a job's validation (worker/sweeps/space.py), the dataset uploaded once, the record and the study written,
the first trials enqueued (`advance`). A refusal writes nothing."""
from __future__ import annotations

import dataclasses
import secrets
import time
from pathlib import Path
from typing import Any

import redis

from worker import audit, keys, users
from worker.artifacts import ArtifactStore
from worker.defaults import MAX_SWEEP_PARALLEL, MAX_SWEEP_TRIALS
from worker.errors import SubmissionError
from worker.sweeps.driver import advance
from worker.sweeps.record import SWEEP_CODEC, SweepState
from worker.sweeps.space import Param, grid_size, load_space, parse_space, space_to_dict, validate_space
from worker.sweeps.study import PRUNERS, SAMPLERS, create_study

DIRECTIONS = ("maximize", "minimize")


def default_direction(metric: str) -> str:
    """Losses and seconds are minimised, everything else (accuracies, F1, images/s) maximised."""
    return "minimize" if metric.endswith("loss") or metric == "seconds" else "maximize"


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """How a sweep searches, checked (`check_settings`); the record stores each field under its name."""

    trials: int
    parallel: int
    metric: str
    direction: str
    """`maximize` or `minimize`: the metric's default (`default_direction`) unless asked for."""
    sampler: str
    pruner: str


def _count(name: str, value: Any, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise SubmissionError(f"{name}: must be a whole number of at least 1 and at most {most}, got {value!r}")
    return value


def check_settings(*, trials: Any, parallel: Any, metric: str, direction: str | None, sampler: str,
                   pruner: str) -> SweepSettings:
    """The sweep's own settings (SubmissionError naming the first bad one)."""
    from core.events import EPOCH_METRICS

    _count("trials", trials, MAX_SWEEP_TRIALS)
    _count("parallel", parallel, MAX_SWEEP_PARALLEL)
    if metric not in EPOCH_METRICS:
        raise SubmissionError(f"metric: no epoch event carries {metric!r}; choose from {', '.join(EPOCH_METRICS)}")
    direction = direction or default_direction(metric)
    if direction not in DIRECTIONS:
        raise SubmissionError(f"direction: unknown {direction!r}; choose from {', '.join(DIRECTIONS)}")
    if sampler not in SAMPLERS:
        raise SubmissionError(f"sampler: unknown {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise SubmissionError(f"pruner: unknown {pruner!r}; choose from {', '.join(PRUNERS)}")
    return SweepSettings(trials, parallel, metric, direction, sampler, pruner)


def _params(space: dict[str, Any] | str | Path | list[Param]) -> list[Param]:
    """The space as parameters: a list of them, the space file's form (the dashboard) or the file itself (the CLI)."""
    if isinstance(space, list):
        return space
    return parse_space(space) if isinstance(space, dict) else load_space(space)


def _check_grid(params: list[Param], settings: SweepSettings) -> None:
    """The grid sampler needs every parameter discrete and no more trials than grid points."""
    if settings.sampler != "grid":
        return
    size = grid_size(params)
    if size is None:
        continuous = [p.key for p in params if p.grid() is None]
        raise SubmissionError(f"sampler grid: {', '.join(continuous)} is a continuous range; give it a step "
                              "or use choice")
    if settings.trials > size:
        raise SubmissionError(f"trials: the grid has {size} point(s); ask for at most {size} trials")


def _check_values(params: list[Param], base: dict[str, Any], gpus: int, report: dict[str, Any] | None) -> None:
    """Every value the sampler may pick through a job's own checks (the config schema, the batch-size rule: against
    the dataset's train split when its health `report` is known, the built-in dataset's size otherwise)."""
    from worker.submit import check_batch_size, train_images, validate_config

    def check_one(cfg: dict[str, Any]) -> None:  # the submission's own checks, for one set of values
        resolved = validate_config(cfg)
        if resolved["data"]["name"] != "imagefolder":
            check_batch_size(resolved, train_images(resolved), gpus)
        elif report is not None:
            check_batch_size(resolved, train_images(resolved, report), gpus)

    validate_space(params, base, check_one)


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
    actor: users.Actor | None = None,
) -> str:
    """Validate everything, create the study, enqueue the first trials; returns the sweep id.

    SubmissionError (CLI exit 2) when anything is wrong, and then nothing was written or enqueued: unknown keys, a
    range or choice the config schema refuses (both ends of every range and every choice are validated as a job
    would be), empty choices, low > high, trials or parallel < 1, a metric no epoch event carries; and whatever
    submission refuses (`check_request`: the priority, the base config, the GPUs; the dataset). The arguments
    mean what submit_job's do; a trial's job gets the sweep's gpus, priority and allow_local_paths.
    actor: who makes it, the sweep's `owner` and its trials' (PermissionDeniedError for a viewer, or when `parallel`
    trials of `gpus` each would pass the actor's per-user limits, or priority high is not theirs).
    """
    from worker.submit import check_limits, check_request, limits_held, resolve_dataset

    actor = audit.authorize(connection, actor, users.Action.SUBMIT, "create sweeps")
    settings = check_settings(trials=trials, parallel=parallel, metric=metric, direction=direction,
                              sampler=sampler, pruner=pruner)
    params = _params(space)
    _check_grid(params, settings)
    checked = check_request(config, overrides, connection=connection, gpus=gpus, priority=priority,
                            dataset_path=dataset_path, name=name)
    base = checked.config
    check_limits(connection, actor, jobs=settings.parallel, gpus=settings.parallel * gpus, priority=priority)
    store = store or ArtifactStore()
    _check_values(params, base, gpus, None)  # before any upload: a refusal writes nothing
    dataset, report = resolve_dataset(base, dataset_path=dataset_path, store=store,
                                      allow_local_paths=allow_local_paths, gpus=gpus)
    if report is not None:
        _check_values(params, base, gpus, report)  # now with the dataset's size (batch sizes vs its train split)

    epochs = [base["train"]["epochs"]] + [v for p in params if p.key == "train.epochs" for v in p.values_to_check()]
    sweep_id = keys.new_job_id()
    now = time.time()
    record = {
        "id": sweep_id,
        "name": checked.name,
        "state": SweepState.RUNNING,
        "trials": settings.trials,
        "parallel": settings.parallel,
        "metric": settings.metric,
        "direction": settings.direction,
        "sampler": settings.sampler,
        "pruner": settings.pruner,
        "seed": secrets.randbelow(2**31) if seed is None else int(seed),
        "max_epochs": max(int(e) for e in epochs),
        "gpus": gpus,
        "priority": priority,
        "allow_local_paths": bool(allow_local_paths),
        "config": base,
        "overrides": checked.overrides,
        "space": space_to_dict(params),
        "dataset": dataset,
        "created_at": now,
        "updated_at": now,
        "owner": actor.name,
    }
    # counted again under the owner's submission lock until the first trials are enqueued, so that sweeps and jobs
    # created at once cannot all pass one count (the check above refused early, before any upload)
    with limits_held(connection, actor, jobs=settings.parallel, gpus=settings.parallel * gpus, priority=priority):
        create_study(connection, sweep_id, settings.direction)
        with connection.pipeline() as pipe:
            pipe.hset(keys.sweep(sweep_id), mapping=SWEEP_CODEC.encode(record))
            pipe.zadd(keys.sweeps_index(), {sweep_id: now})
            pipe.sadd(keys.active_sweeps(), sweep_id)
            pipe.execute()
        audit.record(connection, actor, audit.AuditAction.SWEEP_CREATE, sweep_id, name=checked.name,
                     trials=settings.trials, parallel=settings.parallel, gpus=gpus, priority=priority)
        advance(connection, sweep_id, store=store)
    return sweep_id
