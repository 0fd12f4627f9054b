"""Starting and stopping one training run: the command line, its environment, its output, its process tree.

N > 1 ranks run under torchrun (`python -m worker.torchrun`, its store on 127.0.0.1 only; gloo on CPU, NCCL on GPUs:
core picks);
one rank runs `python -m core.train` directly, which reaches its first metric a few seconds sooner.
Either way the command runs under `worker.guard` in a new session (see guard.py for why).

A one-rank run usually does not start a process at all: the worker keeps one `WarmTrainer` ready, a guard plus a
`python -m worker.warmstart` process that has already imported torch and core and waits on its stdin for a job.
Handing a job to it skips the interpreter start-up and the imports (most of the time to the first step).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from worker.defaults import (
    BOUND_STATIC,
    MULTINODE_PG_TIMEOUT,
    RENDEZVOUS_TIMEOUT,
    REPO_ROOT,
    TERMINATE_GRACE,
)
from worker.paths import extraction_cache_dir, shard_cache_dir
from worker.procutil import terminate_tree
from worker.streaming import ENV_JOB_ID
from worker.warmstart import READY_LINE

SINK_SPEC = "worker.streaming:sink_from_env"
"""What the worker puts in CORE_EVENT_SINK so rank 0 streams its events into Redis."""


@dataclasses.dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of one multi-node attempt meet: node 0's address and a port it picked, the node count, this
    node's rank, and an id shared by every node of the attempt (job id + attempt)."""

    addr: str
    port: int
    nnodes: int
    node_rank: int
    run_id: str


@dataclasses.dataclass(frozen=True)
class TrainCommand:
    """One run's training command, built once and passed on as a value: the `core.train` arguments, how many ranks
    run them on this machine, and (one node of a multi-node job) where the nodes meet. `argv()` is the command line
    a cold start runs; a one-rank command can instead go to a pre-started trainer, which takes `train_args` as is."""

    train_args: tuple[str, ...]
    nproc: int = 1
    rendezvous: Rendezvous | None = None

    @property
    def one_rank(self) -> bool:
        """One process on one machine: `python -m core.train` directly (or a pre-started trainer), no torchrun."""
        return self.nproc <= 1 and self.rendezvous is None

    def argv(self) -> list[str]:
        """The command line (without the guard). With `rendezvous`: torchrun's static rendezvous at node 0's address
        (node ranks handed out by the gang), its store timeout RENDEZVOUS_TIMEOUT, its store listening on that address
        only (worker/torchrun.py: `bound-static`)."""
        args = ["-m", "core.train", *self.train_args]
        if self.rendezvous is not None:
            r = self.rendezvous
            endpoint = f"[{r.addr}]:{r.port}" if ":" in r.addr else f"{r.addr}:{r.port}"
            return [sys.executable, "-m", "worker.torchrun", f"--nnodes={r.nnodes}",
                    f"--nproc-per-node={self.nproc}", f"--rdzv-backend={BOUND_STATIC}", f"--rdzv-endpoint={endpoint}",
                    f"--rdzv-id={r.run_id}", f"--rdzv-conf=rank={r.node_rank},timeout={RENDEZVOUS_TIMEOUT}",
                    "--max-restarts=0", *args]
        if self.one_rank:
            return [sys.executable, *args]
        # one machine, several ranks: the same rendezvous at 127.0.0.1, port picked by the kernel (a store on loopback
        # only; torchrun's --standalone store would listen on every interface)
        return [sys.executable, "-m", "worker.torchrun", "--nnodes=1", f"--nproc-per-node={self.nproc}",
                f"--rdzv-backend={BOUND_STATIC}", "--rdzv-endpoint=127.0.0.1:0", "--rdzv-id=local",
                "--rdzv-conf=rank=0", "--max-restarts=0", *args]


def train_command(config_path: Path, run_dir: Path, *, nproc: int, resume: bool,
                  rendezvous: Rendezvous | None = None) -> TrainCommand:
    """The training command of one run: `core.train CONFIG --out RUN_DIR [--resume]` on `nproc` ranks."""
    args = (str(config_path), "--out", str(run_dir)) + (("--resume",) if resume else ())
    return TrainCommand(args, nproc=nproc, rendezvous=rendezvous)


def interface_of(addr: str) -> str | None:
    """The network interface that holds `addr` on this machine (None when none does)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == addr for a in addrs):
            return name
    return None


def train_env(*, job_id: str, redis_url: str, devices: list[int] | None, nproc: int,
              advertise_addr: str | None = None) -> dict[str, str]:
    """Environment of the run: the sink, the job, the devices it may use, thread counts for CPU ranks.

    With `advertise_addr` (a node of a multi-node job): the process-group timeout CORE_DIST_TIMEOUT (a lost peer
    stops this node within a minute), and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, when not set already, name the
    interface holding that address, so the ranks talk over the address the other machines reach. Datasets are extracted
    into this machine's extraction cache (DATA_CACHE_DIR, unless set: `worker.paths.extraction_cache_dir`)."""
    from core.data.defaults import CACHE_DIR_ENV, SHARD_DIR_ENV

    env = dict(os.environ)
    env.setdefault(CACHE_DIR_ENV, str(extraction_cache_dir()))
    env.setdefault(SHARD_DIR_ENV, str(shard_cache_dir()))  # prepared shards (issue 20)
    if advertise_addr:
        env.setdefault("CORE_DIST_TIMEOUT", str(MULTINODE_PG_TIMEOUT))  # the worker's own environment may raise it
        iface = interface_of(advertise_addr)
        if iface:
            env.setdefault("GLOO_SOCKET_IFNAME", iface)
            env.setdefault("NCCL_SOCKET_IFNAME", iface)
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
    """A running command under the guard; its merged stdout/stderr lines go to `on_line` (which may be replaced
    while it runs). With `stdin_pipe` the command reads what `send` writes, else its stdin is /dev/null."""

    def __init__(self, cmd: list[str], env: dict[str, str], on_line: Callable[[str], None], cwd: Path = REPO_ROOT,
                 *, stdin_pipe: bool = False):
        guard = [sys.executable, "-m", "worker.guard", "--", *cmd]
        self.on_line = on_line
        self.proc = subprocess.Popen(
            guard, env=env, cwd=str(cwd), stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, bufsize=0,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name=f"reader-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self.on_line(raw.decode("utf-8", "replace"))
        self.proc.stdout.close()

    def send(self, text: str) -> bool:
        """Write `text` to the command's stdin and close it; False when the command is gone."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode("utf-8"))
            self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

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


def _has_live_child(pid: int) -> bool:
    """Whether the process `pid` (a guard) still has a child that is not a zombie (the command it guards)."""
    import psutil

    try:
        return any(c.status() != psutil.STATUS_ZOMBIE for c in psutil.Process(pid).children())
    except psutil.Error:
        return False


class WarmTrainer:
    """One pre-started one-rank training process (see the module docstring); it serves one job, then the worker
    starts the next. `take` hands a job over, or returns None when the job must start cold (torchrun, another
    environment, the warm process died)."""

    def __init__(self, env: dict[str, str]):
        self.env = {k: v for k, v in env.items() if k != ENV_JOB_ID}
        self.proc: Launched | None = None
        self.ready = threading.Event()
        self._early: collections.deque[str] = collections.deque(maxlen=200)
        self._lock = threading.Lock()

    def state(self) -> str:
        """ready, starting or off (for the worker's advertisement)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return "off"
        return "ready" if self.ready.is_set() else "starting"

    def start(self) -> None:
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return
            self.ready.clear()
            self._early.clear()
            self.proc = Launched([sys.executable, "-m", "worker.warmstart"], self.env, self._before_handoff,
                                 stdin_pipe=True)

    def _before_handoff(self, line: str) -> None:
        if line.strip() == READY_LINE:
            self.ready.set()
            return
        with self._lock:  # import warnings and the like: passed on to the job that gets this process
            self._early.append(line)

    def take(self, command: TrainCommand, env: dict[str, str], on_line: Callable[[str], None]) -> Launched | None:
        if not command.one_rank or {k: v for k, v in env.items() if k != ENV_JOB_ID} != self.env:
            return None  # not for a warm process; it stays ready for the next one-rank job
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is not None:
            proc.wait_output(timeout=1.0)
            return None
        if not _has_live_child(proc.pid):  # the trainer died and its guard has not exited yet: it would fail the job
            proc.stop(grace=1.0)
            return None
        with self._lock:
            early = list(self._early)
            proc.on_line = on_line
        for line in early:
            on_line(line)
        job = {"argv": list(command.train_args), "env": {ENV_JOB_ID: env.get(ENV_JOB_ID, "")}}
        if not proc.send(json.dumps(job) + "\n"):
            proc.stop(grace=1.0)
            return None
        return proc

    def stop(self) -> None:
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is not None:
            proc.stop(grace=2.0)
