"""Helpers shared by the worker tests: small generated datasets, polling with a useful failure message, the CLI."""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs/digits.yaml"


def make_imagefolder(root: Path, classes: tuple[str, ...] = ("circle", "square", "tri"), per_class: int = 12,
                     size: int = 16) -> Path:
    """Class folders of small PNGs, one flat colour per class plus noise (learnable in an epoch)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), np.uint8)
            base[..., c % 3] = 200
            img = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m ARGS` in the repo root, output captured (exit codes are asserted by the caller)."""
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2,
             explain: Callable[[], str] | None = None) -> Any:
    """Poll until `predicate()` is truthy; AssertionError naming `what` (and `explain()`) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}" + (f"\n{explain()}" if explain else ""))


def explain_job(conn: Any, job_id: str, spawn: Any) -> Callable[[], str]:
    """What a failed wait prints: the job's status, its log tail and every spawned process's output."""
    from worker import api

    def text() -> str:
        st = api.job_status(conn, job_id)
        st.pop("config", None)
        logs = "\n".join(e["line"] for e in api.logs_tail(conn, job_id, 60))
        procs = "\n".join(f"--- {p.args}\n{spawn.output(p)[-3000:]}" for p in spawn.procs)
        return f"status: {st}\nlogs:\n{logs}\nprocesses:\n{procs}"
    return text


def run_trial(conn: Any, job_id: str, accs: list[float], *, state: Any = None, worker: str = "test-worker") -> None:
    """A sweep trial's job goes queued → running → `state` (default finished) through the worker's own state
    functions, streaming one epoch event per accuracy through the Redis sink: a trial that "ran", without training."""
    from worker.record import mark_final, mark_started
    from worker.states import JobState
    from worker.streaming import RedisEventSink

    state = state or JobState.FINISHED
    assert mark_started(conn, job_id, worker, job_id) == "ok"
    sink = RedisEventSink(conn, job_id)
    sink.emit("start", {"epochs": 3, "world_size": 1})
    for epoch, acc in enumerate(accs, 1):
        sink.emit("epoch", {"epoch": epoch, "epochs": 3, "val_acc": acc, "best_val_acc": acc, "val_loss": 1 - acc,
                            "train_loss": 1.0, "train_acc": acc, "val_macro_f1": acc, "lr": 0.01, "seconds": 1.0,
                            "images_per_sec": 100.0})
    sink.close()
    fields = {"error_kind": "Pruned"} if state == JobState.PRUNED else {}
    assert mark_final(conn, job_id, worker, state, fields) == "ok"


def process_tree(pid: int) -> list[Any]:
    """The process `pid` and all its descendants (psutil.Process), or [] when it is gone: what a test kills at once to
    lose a whole node (worker, guard and ranks)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
