"""core/runtime.py's process set-up: a training process reuses the memory of its freed big tensors (no page fault per
page each step), and leaves the allocator alone where the environment already chose."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, resource, sys
import torch
if sys.argv[1] == "train":
    from core.config import load_config
    from core.train import train
    train(load_config("configs/digits.yaml", ["train.epochs=1", "export.enabled=false", "track.tensorboard=false"]),
          sys.argv[2])
elif sys.argv[1] == "call":
    from core.runtime import keep_freed_memory
    print(json.dumps({"set": keep_freed_memory()}))

def faults_of_a_big_step():
    x = torch.ones(64, 3, 224, 224)  # one 224 px batch as floats: 38.5 MB, over glibc's 32 MB mmap ceiling
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.ones(64, 3, 224, 224)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(json.dumps({"faults": min(faults_of_a_big_step() for _ in range(3))}))
"""

PAGES = 64 * 3 * 224 * 224 * 4 // 4096
"""4 KB pages of the probe's tensor: what a step pays in page faults when its memory is fresh."""


def _probe(mode: str, tmp_path: Path, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            result.update(json.loads(line))
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_training_process_reuses_freed_big_tensors_without_page_faults(tmp_path: Path) -> None:
    plain = _probe("none", tmp_path)
    assert plain["faults"] > PAGES // 2, plain  # the default: a fresh mapping, a fault per page, every step
    trained = _probe("train", tmp_path)  # after core.train's train(): the process keeps what it freed
    assert trained["faults"] < PAGES // 20, trained


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_an_allocator_chosen_by_the_environment_is_left_alone(tmp_path: Path) -> None:
    chosen = _probe("call", tmp_path, MALLOC_MMAP_THRESHOLD_="33554432")
    assert chosen["set"] is False and chosen["faults"] > PAGES // 2, chosen
    tunables = _probe("call", tmp_path, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=33554432")
    assert tunables["set"] is False and tunables["faults"] > PAGES // 2, tunables
