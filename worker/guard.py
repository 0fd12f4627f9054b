"""`python -m worker.guard -- CMD...`: runs a job's command so that no process of it outlives the job.

The worker starts the guard in a session of its own; the guard starts CMD (torchrun, or core.train for one rank).
- It is a child subreaper: ranks orphaned by a dying torchrun are re-parented to it, so it can still find them.
- When its worker dies (even by SIGKILL) it learns it at once (parent-death signal, plus polling its parent pid) and
  SIGKILLs the whole tree: the job will resume from its checkpoint elsewhere, nothing may keep training here.
- On SIGTERM (cancel, time limit, worker shutdown) it forwards SIGTERM to every descendant and SIGKILLs the ones
  still alive after the grace period.
- When CMD exits, it kills any leftover descendant and exits with CMD's exit code.
- It raises its own `oom_score_adj` (inherited by CMD): if memory runs out faster than the worker's memory watch
  (worker/memlimit.py) looks, the kernel kills the job, not the worker, Redis or the dashboard.

It imports neither torch nor Redis, so it starts in a fraction of a second.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from worker.defaults import GUARD_POLL_INTERVAL, JOB_OOM_SCORE_ADJ, TERMINATE_GRACE
from worker.procutil import (
    descendants,
    kill_tree,
    raise_oom_score,
    set_child_subreaper,
    set_parent_death_signal,
    signal_all,
)


def _say(msg: str) -> None:
    try:
        print(f"[guard] {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # the worker (our stdout's reader) is gone: keep going, killing matters more
        pass


class Guard:
    def __init__(self, cmd: list[str], grace: float = TERMINATE_GRACE):
        self.cmd = cmd
        self.grace = grace
        self.parent = os.getppid()
        self.child: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.kill_at: float | None = None
        self.parent_died = False

    def on_term(self, signum: int, frame: object) -> None:
        if self.kill_at is None:
            _say(f"got {signal.Signals(signum).name}: stopping the job (SIGKILL in {self.grace:g} s)")
            self.kill_at = time.monotonic() + self.grace
            signal_all(descendants(os.getpid()), signal.SIGTERM)

    def on_parent_death(self, signum: int, frame: object) -> None:
        self.parent_died = True

    def reap(self) -> None:
        """Collect every exited child (orphans re-parented to us too); remember CMD's exit code."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.child is not None and pid == self.child.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                if self.returncode < 0:
                    self.returncode = 128 - self.returncode  # killed by a signal: shell convention
                self.child.returncode = self.returncode  # tell Popen it was reaped

    def run(self) -> int:
        set_child_subreaper()
        signal.signal(signal.SIGUSR1, self.on_parent_death)
        set_parent_death_signal(signal.SIGUSR1)
        if os.getppid() != self.parent:  # the worker died before the kernel hook was in place
            return 137
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_term)
        raise_oom_score(JOB_OOM_SCORE_ADJ)
        self.child = subprocess.Popen(self.cmd)
        me = os.getpid()
        while True:
            self.reap()
            if self.parent_died or os.getppid() != self.parent:
                _say("the worker died: killing the job's processes")
                kill_tree(me, include_root=False)
                self.reap()
                return 137
            if self.kill_at is not None and time.monotonic() >= self.kill_at:
                signal_all(descendants(me), signal.SIGKILL)
            if self.returncode is not None:
                break
            time.sleep(GUARD_POLL_INTERVAL)
        leftovers = descendants(me)
        if leftovers:  # a rank that ignored its launcher's exit
            _say(f"{len(leftovers)} process(es) outlived the job's command; stopping them")
            signal_all(leftovers, signal.SIGTERM)
            deadline = time.monotonic() + min(self.grace, 2.0)
            while descendants(me) and time.monotonic() < deadline:
                self.reap()
                time.sleep(0.1)
            kill_tree(me, include_root=False)
        self.reap()
        return int(self.returncode)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m worker.guard -- CMD [ARGS...]", file=sys.stderr)
        return 2
    return Guard(argv).run()


if __name__ == "__main__":
    sys.exit(main())
