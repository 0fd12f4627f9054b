"""Process-tree plumbing shared by the guard, the launcher and the embedded Redis: no rank may outlive its job.

torchrun starts every rank in a session of its own, so killing one process group is not enough; we kill the whole
descendant tree (psutil), and the guard is a child subreaper so orphaned ranks are re-parented to it, not to init.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import time
from collections.abc import Iterable

import psutil

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_REAP_WAIT = 3.0
"""Seconds terminate_tree waits for the guard to reap its killed tree, then for the guard to exit on its own: a few
of its poll intervals (worker.defaults.GUARD_POLL_INTERVAL), and its own bounded clean-up of leftovers."""


try:  # loaded at import: a preexec_fn (after fork, before exec) must not load libraries
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def _prctl(option: int, value: int) -> bool:
    try:
        return _LIBC is not None and _LIBC.prctl(option, value, 0, 0, 0) == 0
    except AttributeError:  # not Linux: the guard's parent polling still covers us
        return False


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent thread dies (Linux; use in preexec_fn)."""
    return _prctl(_PR_SET_PDEATHSIG, int(sig))


def set_child_subreaper() -> bool:
    """Become the reaper of orphaned descendants (Linux), so ranks of a dead torchrun stay findable."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def set_process_name(name: str) -> None:
    """Set this process's short name (`ps -o comm`, psutil's `name()`; Linux, at most 15 bytes; else a no-op)."""
    try:
        with open("/proc/self/comm", "w", encoding="utf-8") as f:
            f.write(name[:15])
    except OSError:
        pass


def raise_oom_score(value: int) -> None:
    """Make this process (and what it starts) the kernel OOM killer's first choice, up to `value` (-1000..1000);
    raising it needs no privilege. Never lowers it; a no-op where /proc is missing."""
    try:
        with open("/proc/self/oom_score_adj", "r+", encoding="ascii") as f:
            if int(f.read().strip() or 0) < value:
                f.seek(0)
                f.write(str(value))
    except (OSError, ValueError):
        pass


def descendants(pid: int) -> list[psutil.Process]:
    """All live descendants of `pid` (empty when it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    """Send `sig` to each process, ignoring the ones already gone."""
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def terminate_tree(pid: int, *, grace: float, include_root: bool = True) -> list[int]:
    """SIGTERM the tree under `pid` (and `pid`), SIGKILL whatever is still alive after `grace` seconds.

    Returns the pids that needed SIGKILL. The tree is re-read before SIGKILL, so children spawned meanwhile die too.
    `pid` is a guard (worker/guard.py): the subreaper that reaps its tree, and that exits by itself once its command
    is gone. So the tree below it goes first, and we wait until the guard has reaped all of it (zombies included);
    then we wait for the guard to exit, and SIGKILL it only if it does not. A guard killed before it reaped its
    command left that command a zombie re-parented to init, which reaps when it gets to it (a job's torchrun that
    exited near the end of the grace outlived its cancel that way, as a zombie, in CI).
    """
    try:
        root = [psutil.Process(pid)] if include_root else []
    except psutil.Error:
        root = []
    first = descendants(pid)
    signal_all(first + root, signal.SIGTERM)
    psutil.wait_procs(first + root, timeout=grace)
    # zombies too: only their reaping makes them gone; and the first ones even if no longer below (a guard that died)
    below = list(set(first) | set(descendants(pid)))
    killed = [p.pid for p in below if _alive(p)]
    signal_all(below, signal.SIGKILL)
    psutil.wait_procs(below, timeout=_REAP_WAIT)  # the guard reaps them within its poll interval
    if root:
        _gone, stuck = psutil.wait_procs(root, timeout=_REAP_WAIT)
        if stuck and _alive(stuck[0]):
            killed.append(pid)
            signal_all(stuck, signal.SIGKILL)
            psutil.wait_procs(stuck, timeout=_REAP_WAIT)
    return killed


def kill_tree(pid: int, *, include_root: bool = True) -> None:
    """SIGKILL the tree under `pid` at once (the guard uses it when its worker died)."""
    for _ in range(3):  # a dying parent can fork one more child between listing and killing
        procs = descendants(pid)
        if include_root:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        if not procs:
            return
        signal_all(procs, signal.SIGKILL)
        psutil.wait_procs(procs, timeout=1.0)
        include_root = False


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pid_alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie."""
    try:
        return _alive(psutil.Process(pid))
    except psutil.Error:
        return False


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of `pids` is alive; return the ones still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    pids = list(pids)
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def own_session_preexec() -> None:
    """preexec_fn for children that must die with this process: parent-death SIGKILL (Linux)."""
    set_parent_death_signal(signal.SIGKILL)
    os.setpgrp()
