"""Who holds a worker's GPUs: its training job, and the deployment replicas it hosts (worker/deploy_host.py).

Two threads of the worker take GPUs: the one running jobs and the deployment thread. Both go through one
`DeviceLedger`, under its lock, so a GPU is never given to both. The job takes the first free devices, replicas the
last free ones, so each mostly finds what the other leaves. A worker listens only to the queues of jobs that fit the
GPUs its replicas leave (`spare_for_training`), and a job that a replica beat to its GPUs between the dequeue and the
start goes back to the front of its queue (worker/worker.py `execute_job`).
"""
from __future__ import annotations

import threading
from collections.abc import Hashable

TRAINING = "training"
"""The holder name of the worker's running job."""


class DeviceLedger:
    def __init__(self, devices: list[int] | None) -> None:
        self.devices = list(devices or [])
        """The worker's GPU indices (empty on a CPU worker: nothing to hold)."""
        self._held: dict[Hashable, list[int]] = {}
        self._lock = threading.Lock()

    def take(self, holder: Hashable, count: int) -> list[int] | None:
        """`count` free GPUs for `holder` (replacing what it held), the first ones for TRAINING and the last ones for a
        replica; None, holding nothing new, when fewer are free (always on a CPU worker); [] for 0."""
        if count <= 0:
            return []
        with self._lock:
            others = {d for h, held in self._held.items() if h != holder for d in held}
            free = [d for d in self.devices if d not in others]
            if len(free) < count:
                return None
            got = free[:count] if holder == TRAINING else free[-count:]
            self._held[holder] = got
            return list(got)

    def give_back(self, holder: Hashable) -> None:
        with self._lock:
            self._held.pop(holder, None)

    def held(self, holder: Hashable) -> list[int]:
        with self._lock:
            return list(self._held.get(holder, []))

    def spare_for_training(self) -> int:
        """GPUs no replica holds: the most a job may take here now."""
        with self._lock:
            return len(set(self.devices) - {d for h, held in self._held.items() if h != TRAINING for d in held})
