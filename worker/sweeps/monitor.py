"""The pruning monitor the worker's job loop runs beside a sweep's trial: `TrialMonitor` reports the trial's epoch
metric to Optuna as its epoch events arrive and says when the sweep's pruner would stop it."""
from __future__ import annotations

import logging
import math
import threading
from typing import Any

import redis

from worker.sweeps.record import read_sweep
from worker.sweeps.study import load_study, storage_for, trial_id

log = logging.getLogger("worker.sweeps")

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
