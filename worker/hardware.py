"""What this machine offers a worker: GPUs (index, name, memory), or CPU slots; torch and CUDA versions.

GPU names and memory are read in a short-lived subprocess, so the long-lived worker never creates a CUDA context
(which would hold GPU memory for as long as the worker lives).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from typing import Any

from worker.defaults import MAX_CPU_SLOTS, MAX_GPUS_PER_JOB

_PROBE = (
    "import json, torch\n"
    "out = []\n"
    "for i in range(torch.cuda.device_count()):\n"
    "    p = torch.cuda.get_device_properties(i)\n"
    "    out.append({'index': i, 'name': p.name, 'memory_mb': int(p.total_memory // 2**20)})\n"
    "print(json.dumps(out))\n"
)


def _gpu_details() -> list[dict[str, Any]]:
    try:
        res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError, OSError):
        return []


def parse_gpus(spec: str) -> list[int]:
    """`0,1` → [0, 1]; ValueError naming the bad part."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"--gpus: expected comma-separated GPU indices like 0,1, got {spec!r}")
        out.append(int(part))
    if len(set(out)) != len(out):
        raise ValueError(f"--gpus: an index is listed twice in {spec!r}")
    return out


def detect(gpus: str | None = None, *, cpu: bool = False, slots: int | None = None) -> dict[str, Any]:
    """The worker's resources. `gpus`: indices to use (default: every visible GPU); `cpu`: ignore GPUs;
    `slots`: CPU ranks a CPU-only worker accepts (default min(CPU count, 8)). A CPU-only worker (`cpu`) does not
    import torch at all, so it starts in a second."""
    info: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count() or 1}
    if cpu:
        try:
            info.update(torch=importlib.metadata.version("torch"), cuda="")
        except importlib.metadata.PackageNotFoundError:
            info.update(torch="", cuda="")
        count = 0
    else:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda or "")
        count = torch.cuda.device_count()
    if gpus is not None and not cpu:
        wanted = parse_gpus(gpus)
        missing = [i for i in wanted if i >= count]
        if missing:
            raise ValueError(f"--gpus {gpus}: this machine has {count} GPU(s); no GPU {missing[0]}")
        devices = wanted
    else:
        devices = list(range(count))
    if devices:
        details = {d["index"]: d for d in _gpu_details()}
        info.update(kind="gpu", devices=devices, slots=min(len(devices), MAX_GPUS_PER_JOB),
                    gpus=[details.get(i, {"index": i, "name": "GPU", "memory_mb": None}) for i in devices])
    else:
        n = slots or min(info["cpu_count"], MAX_CPU_SLOTS)
        if not 1 <= n <= MAX_GPUS_PER_JOB:
            raise ValueError(f"--slots: must be from 1 to {MAX_GPUS_PER_JOB}, got {n}")
        info.update(kind="cpu", devices=None, slots=n, gpus=[])
    return info
