"""A sweep's Optuna study, kept in our Redis: Optuna's `JournalStorage` over its `JournalRedisBackend`, one journal
per sweep under the key prefix `trainer:sweep:<id>:optuna` (keys `...:log_number` and `...:log:<n>`, JSON). The
study is named after the sweep id.

Samplers and pruners are not stored by Optuna; every process that asks, tells or prunes rebuilds them from the
sweep's record with `sampler_for` / `pruner_for`, so any worker can drive the sweep. A sampler is seeded with the
sweep's seed plus the number of trials asked so far: a fresh sampler in another process must not draw the same
"random" values again.

Optuna's journal backend can also store a pickled snapshot every 100 trials; ours never writes or reads one
(nothing pickled crosses Redis), so a process replays the JSON journal (cached per process, read incrementally).
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from typing import Any

import redis

from worker import keys
from worker.connection import connection_url
from worker.sweeps.space import Param

SAMPLERS = ("tpe", "random", "grid")
"""`--sampler` choices."""

PRUNERS = ("median", "hyperband", "none")
"""`--pruner` choices."""

STUDY_CACHE = 16
"""Journal storages a process keeps (one per sweep it touched), newest first; each holds its replayed journal."""


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _journal_backend_class() -> Any:
    from optuna.storages.journal import JournalRedisBackend

    class Journal(JournalRedisBackend):  # type: ignore[misc, valid-type]
        """Optuna's Redis journal backend without its snapshots (a pickle of the replayed state)."""

        def save_snapshot(self, snapshot: bytes) -> None:
            return None

        def load_snapshot(self) -> bytes | None:
            return None

    return Journal


_storages: OrderedDict[tuple[str, str], Any] = OrderedDict()
_storages_lock = threading.Lock()


def storage_for(conn: redis.Redis, sweep_id: str) -> Any:
    """The sweep's `optuna.storages.JournalStorage` (cached per process; it syncs from the journal on every read)."""
    optuna = _optuna()
    url = connection_url(conn)
    cache_key = (url, sweep_id)
    with _storages_lock:
        storage = _storages.get(cache_key)
        if storage is not None:
            _storages.move_to_end(cache_key)
            return storage
    with warnings.catch_warnings():  # "JournalRedisBackend is experimental": we pin Optuna and test it here
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        backend = _journal_backend_class()(url, prefix=keys.sweep_journal(sweep_id))
    storage = optuna.storages.JournalStorage(backend)
    with _storages_lock:
        _storages[cache_key] = storage
        while len(_storages) > STUDY_CACHE:
            _storages.popitem(last=False)
    return storage


def sampler_for(record: dict[str, Any], params: list[Param], n_asked: int) -> Any:
    """The sweep's sampler, seeded for the next ask (see the module docstring)."""
    optuna = _optuna()
    seed = (int(record.get("seed") or 0) + 7919 * n_asked) % 2**32
    name = record.get("sampler") or "tpe"
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid() for p in params}, seed=seed)
    # constant_liar: trials still running count as bad guesses, so parallel asks spread out
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def pruner_for(record: dict[str, Any]) -> Any:
    """median: prune a trial whose best value so far is worse than the median of earlier trials at the same epoch,
    once `min(5, max(2, trials // 4))` trials have completed (Optuna's default is 5: short sweeps prune sooner);
    hyperband: Optuna's HyperbandPruner over epochs 1..max epochs (reduction factor 3); none: never prune."""
    optuna = _optuna()
    name = record.get("pruner") or "median"
    if name == "median":
        startup = min(5, max(2, int(record.get("trials") or 1) // 4))
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, int(record.get("max_epochs") or 1)),
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def create_study(conn: redis.Redis, sweep_id: str, direction: str) -> Any:
    """Create the sweep's (empty) study in its journal."""
    optuna = _optuna()
    return optuna.create_study(storage=storage_for(conn, sweep_id), study_name=sweep_id, direction=direction)


def load_study(conn: redis.Redis, sweep_id: str, record: dict[str, Any], params: list[Param] | None = None,
               n_asked: int = 0) -> Any:
    """The sweep's study with its sampler (seeded for the next ask) and pruner."""
    optuna = _optuna()
    return optuna.load_study(study_name=sweep_id, storage=storage_for(conn, sweep_id),
                             sampler=sampler_for(record, params or [], n_asked), pruner=pruner_for(record))


def trial_id(conn: redis.Redis, sweep_id: str, number: int) -> int:
    """Optuna's storage id of the sweep's trial `number` (what `optuna.Trial` is built from)."""
    storage = storage_for(conn, sweep_id)
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(sweep_id), number)
