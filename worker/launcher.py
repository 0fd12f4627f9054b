"""Starting and stopping one training run: the command line, its environment, its output, its process tree.

N > 1 ranks run under `torchrun --standalone --nproc_per_node=N` (gloo on CPU, NCCL on GPUs: core picks);
one rank runs `python -m core.train` directly, which reaches its first metric a few seconds sooner.
Either way the command runs under `worker.guard` in a new session (see guard.py for why).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from worker.defaults import REPO_ROOT, TERMINATE_GRACE
from worker.procutil import terminate_tree
from worker.streaming import ENV_JOB_ID

SINK_SPEC = "worker.streaming:sink_from_env"
"""What the worker puts in CORE_EVENT_SINK so rank 0 streams its events into Redis."""


def train_command(config_path: Path, run_dir: Path, *, nproc: int, resume: bool) -> list[str]:
    """The training command line (without the guard)."""
    args = ["-m", "core.train", str(config_path), "--out", str(run_dir)] + (["--resume"] if resume else [])
    if nproc <= 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def train_env(*, job_id: str, redis_url: str, devices: list[int] | None, nproc: int) -> dict[str, str]:
    """Environment of the run: the sink, the job, the devices it may use, thread counts for CPU ranks."""
    env = dict(os.environ)
    env.update({
        "CORE_EVENT_SINK": SINK_SPEC,
        ENV_JOB_ID: job_id,
        "REDIS_URL": redis_url,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
    })
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices[:nproc])
    else:  # a CPU worker on a GPU machine must not touch the GPUs; CPU ranks share the cores
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    return env


class Launched:
    """A running command under the guard; its merged stdout/stderr lines go to `on_line`."""

    def __init__(self, cmd: list[str], env: dict[str, str], on_line: Callable[[str], None], cwd: Path = REPO_ROOT):
        guard = [sys.executable, "-m", "worker.guard", "--", *cmd]
        self.proc = subprocess.Popen(
            guard, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, bufsize=0,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, args=(on_line,), name=f"reader-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self, on_line: Callable[[str], None]) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            on_line(raw.decode("utf-8", "replace"))
        self.proc.stdout.close()

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait_output(self, timeout: float = 5.0) -> None:
        """Wait for the last output lines (the reader ends when every writer closed the pipe)."""
        self._reader.join(timeout=timeout)

    def stop(self, grace: float = TERMINATE_GRACE) -> int | None:
        """SIGTERM the guard and every process under it, SIGKILL the survivors after `grace` s. Returns the code."""
        terminate_tree(self.pid, grace=grace)
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None
