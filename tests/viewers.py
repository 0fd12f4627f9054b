"""What live viewers cost the dashboard's server: its CPU seconds while N real Chromium pages watch a page, side by
side with N = 0 (the benchmark's viewers row, `python -m tests.bench --only viewers`).

A private redis-server holds a running job whose event stream grows as a training run's does (a step event every
STEP_EVERY s through the worker's own Redis sink, an epoch event every EPOCH_EVERY s), its worker advertised as alive,
and a few ended jobs. The dashboard runs as `honcho start` runs it (`python -m app`: the repository's
.streamlit/config.toml, loopback). Chromium is Debian's /usr/bin/chromium through Playwright, never a downloaded one.
Only the server process's own CPU time (user + system, its children included) is counted, read from /proc.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
STEP_EVERY = 0.5
"""Seconds between the fake run's step events (a CPU SimpleCNN run logs about that often)."""
EPOCH_EVERY = 20.0
"""Seconds between its epoch events."""
PAGES = {"job": "/job?job={job}", "jobs": "/jobs", "workers": "/workers"}
"""The live pages measured, as URL paths."""


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system + t.children_user + t.children_system


class Feeder:
    """The running job's side: step and epoch events through RedisEventSink, the worker's heartbeat."""

    def __init__(self, conn: Any, job_id: str, worker: str):
        self.conn, self.job_id, self.worker = conn, job_id, worker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="viewers-feeder", daemon=True)

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from worker.presence import advertise
        from worker.streaming import RedisEventSink

        sink = RedisEventSink(self.conn, self.job_id)
        steps_per_epoch = max(1, round(EPOCH_EVERY / STEP_EVERY))
        epochs = 1000
        sink.emit("start", {"epochs": epochs, "world_size": 1, "classes": [str(i) for i in range(10)],
                            "counts": {"train": 1257, "val": 360, "test": 180}, "steps_per_epoch": steps_per_epoch})
        sink.emit("phase", {"phase": "train"})
        step, last_beat = 0, 0.0
        try:
            while not self._stop.wait(STEP_EVERY):
                step += 1
                epoch, in_epoch = divmod(step - 1, steps_per_epoch)
                sink.emit("step", {"epoch": epoch + 1, "step": in_epoch + 1, "global_step": step,
                                   "steps_per_epoch": steps_per_epoch, "loss": 2.0 / (1 + step / 50), "lr": 1e-3,
                                   "images_per_sec": 900.0 + step % 7})
                if in_epoch + 1 == steps_per_epoch:
                    e = epoch + 1
                    sink.emit("epoch", {"epoch": e, "epochs": epochs, "train_loss": 1 / e, "train_acc": 1 - 0.5 / e,
                                        "val_loss": 1.1 / e, "val_acc": 1 - 0.6 / e, "val_macro_f1": 1 - 0.6 / e,
                                        "lr": 1e-3, "seconds": EPOCH_EVERY, "images_per_sec": 900.0,
                                        "best_val_acc": 1 - 0.6 / e})
                if time.monotonic() - last_beat > 2:
                    advertise(self.conn, self.worker, {"name": self.worker, "hostname": "bench", "kind": "cpu",
                                                       "slots": 1, "state": "busy", "current_job": self.job_id,
                                                       "gpus": [], "queues": []}, 10)
                    last_beat = time.monotonic()
        finally:
            sink.close()


@contextlib.contextmanager
def live_dashboard(url: str) -> Iterator[dict[str, Any]]:
    """The dashboard on a free port against Redis at `url`, with a running job being fed; yields {"base", "pid",
    "job", "conn"}. Everything it started is stopped on exit."""
    from tests.fixtures_app import TEST_WORKER, seed_running_job, submit_digits
    from tests.fixtures_redis import free_port, service_env, stop

    with tempfile.TemporaryDirectory(prefix="bench-viewers-") as tmp, \
            service_env(url, Path(tmp), var_dir=True) as conn:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DASHBOARD_")}
        env.update(PORT=str(port), PYTHONPATH=str(ROOT))
        log = (Path(tmp) / "dashboard.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for i in range(3):
                submit_digits(conn, [f"train.seed={i}"], name=f"queued {i}")  # the jobs page has active jobs
            job_id = seed_running_job(conn)
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the dashboard did not start: "
                                           + (Path(tmp) / "dashboard.log").read_text()[-2000:]) from None
                    time.sleep(0.3)
            with Feeder(conn, job_id, TEST_WORKER):
                yield {"base": base, "pid": proc.pid, "job": job_id, "conn": conn}
        finally:
            stop(proc)
            log.close()


@contextlib.contextmanager
def viewers(browser: Any, url: str, n: int) -> Iterator[list[Any]]:
    """n pages (each its own Streamlit session) showing `url`, loaded and drawn; closed on exit."""
    contexts = [browser.new_context(viewport={"width": 1440, "height": 1200}) for _ in range(n)]
    try:
        pages = []
        for ctx in contexts:
            page = ctx.new_page()
            page.goto(url)
            page.get_by_test_id("stMain").wait_for(timeout=60_000)
            pages.append(page)
        for page in pages:
            page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stPlotlyChart\"], "
                                   "[data-testid=\"stDataFrame\"], [data-testid=\"stAlert\"]').length > 0",
                                   timeout=60_000)
        yield pages
    finally:
        for ctx in contexts:
            ctx.close()


def measure(stack: dict[str, Any], page: str, n: int, seconds: float, reps: int,
            browser: Any) -> dict[int, list[float]]:
    """Server CPU seconds per minute with 0 and with n viewers of `page`, alternating (0, n, n, 0, ...) `reps` times
    each; a settling pause of 5 s after the viewers have loaded is not counted."""
    url = stack["base"] + PAGES[page].format(job=stack["job"])
    out: dict[int, list[float]] = {0: [], n: []}
    order = [0, n]
    for rep in range(reps):
        for count in (order if rep % 2 == 0 else order[::-1]):
            with viewers(browser, url, count) as pages:
                time.sleep(5.0)
                c0, t0 = cpu_seconds(stack["pid"]), time.monotonic()
                time.sleep(seconds)
                used, wall = cpu_seconds(stack["pid"]) - c0, time.monotonic() - t0
                assert all(not p.is_closed() for p in pages)
            out[count].append(used / wall * 60.0)
    return out


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def main() -> None:
    """`python -m tests.viewers [PAGE] [N] [SECONDS]`: one measurement, printed (for profiling by hand)."""
    from tests.fixtures_redis import private_redis

    page = sys.argv[1] if len(sys.argv) > 1 else "job"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 30.0
    with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp)) as server, \
            live_dashboard(server.url) as stack, chromium() as browser:
        print(f"dashboard pid {stack['pid']} at {stack['base']}", flush=True)
        res = measure(stack, page, n, seconds, 1, browser)
        idle, busy = res[0][0], res[n][0]
        print(f"{page}: server CPU s per minute: 0 viewers {idle:.2f}, {n} viewers {busy:.2f}: "
              f"{(busy - idle) / n:.2f} CPU s per viewer-minute ({(busy - idle) / n / 60:.1%} of a core per viewer)")


if __name__ == "__main__":
    main()
