"""`python -m worker.warmstart`: a one-rank training process started before its job (launcher.WarmTrainer).

It imports torch, core (models, data, training, evaluation) and the event sink (what every run imports, nothing
more), runs one tiny convolution forward and backward (the first one pays for kernel set-up), prints READY_LINE,
and then blocks on one JSON line on stdin: `{"argv": [core.train arguments], "env": {variables to set}}`. It then
runs exactly what `python -m core.train ARGV` would, with the same exit code. End of stdin before a job (the worker let it go) exits 0. Its process name
(`ps -o comm`) is IDLE_NAME until it gets its job, BUSY_NAME after.

The worker starts it under `worker.guard` with the environment a one-rank job of that worker gets (devices, thread
counts, the Redis sink): those are read at import time, so a job whose environment differs is started cold.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

READY_LINE = "[warm] ready"
IDLE_NAME, BUSY_NAME = "warm-trainer", "core.train"
"""Process names (`ps -o comm`): an idle warm process, and one running a job (like a cold `python -m core.train`)."""


def preload() -> None:
    import torch

    import core.data.build  # torchvision (and, through it, torch._dynamo): ~2 s of imports on its own
    import core.models
    import core.train  # noqa: F401 - training, evaluation, events

    spec = os.environ.get("CORE_EVENT_SINK", "").strip()
    if spec:
        importlib.import_module(spec.partition(":")[0])
    # Only what every run imports anyway: a module few runs need (sklearn for digits, ONNX for the export) would add
    # its import to every job's CPU time, which under a full queue costs throughput (a 200-job load run with them
    # preloaded: 14.6 jobs/min, against 19.3 starting cold).
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    torch.nn.functional.cross_entropy(conv(x).mean((2, 3)), torch.tensor([0, 1])).backward()


def main() -> int:
    from worker.procutil import set_process_name

    set_process_name(IDLE_NAME)
    preload()
    print(READY_LINE, flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    spec = json.loads(line)
    set_process_name(BUSY_NAME)
    os.environ.update({str(k): str(v) for k, v in (spec.get("env") or {}).items()})
    argv = [str(a) for a in spec["argv"]]
    sys.argv = ["core.train", *argv]
    from core.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
