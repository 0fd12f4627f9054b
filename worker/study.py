"""The sweep's Optuna study moved to `worker/sweeps/study.py`. This name stays while the CLI's `sweep-dashboard`
(worker/__main__.py) imports `storage_for` from here; import from `worker.sweeps` in new code."""
from __future__ import annotations

from worker.sweeps.study import storage_for

__all__ = ["storage_for"]
