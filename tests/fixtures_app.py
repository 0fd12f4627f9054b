"""Helpers for the dashboard tests (tests/test_app*.py, tests/test_browser.py) and the benchmark's page timings.

- `open_page(page, query)`: an AppTest of the real entry file, on one page (what a browser at that URL gets).
- `seed_finished_job(conn, run_dir)`: a job that went queued → running → finished through worker's own state
  functions and event sink, with a real run folder (trained and exported by core) in the artifact store.
- `seed_step_events(conn, job_id, n)`: n metric events in a job's stream (the bench's 20,000-point job page).
- `seed_jobs(conn, n)`: n queued jobs through the real submission function (the bench's 1,000-job jobs page).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app" / "streamlit_app.py"
DIGITS = ROOT / "configs" / "digits.yaml"
PAGES = {
    "new": "views/new_job.py", "jobs": "views/jobs.py", "job": "views/job.py", "compare": "views/compare.py",
    "workers": "views/workers.py", "try": "views/try_it.py", "sweeps": "views/sweeps.py",
    "datasets": "views/datasets.py", "models": "views/models.py", "settings": "views/settings.py",
}
TEST_WORKER = "test-worker"


def open_page(page: str, query: dict[str, str] | None = None, *, timeout: float = 60) -> Any:
    """AppTest of app/streamlit_app.py showing `page` (a key of PAGES), with `query` as the URL's query string."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.query_params.update(query or {})
    at.run()
    if PAGES[page] != PAGES["new"]:
        at.switch_page(PAGES[page]).run()
    return at


def texts(at: Any) -> str:
    """Everything an AppTest page shows as text (markdown, captions, alerts, metrics), for `in` checks."""
    parts: list[str] = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "error", "warning", "info", "success"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    return "\n".join(parts)


def submit_digits(conn: Any, overrides: list[str] | None = None, **kwargs: Any) -> str:
    from worker import api

    return api.submit_job(DIGITS, list(overrides or []), connection=conn, allow_local_paths=True, **kwargs).job_id


def seed_finished_job(conn: Any, run_dir: Path, *, name: str | None = None, overrides: list[str] | None = None) -> str:
    """A finished job whose run folder is a copy of `run_dir`, with the run's metrics.jsonl replayed into its stream.

    It takes the path a worker takes (submit → mark_started → the Redis event sink → mark_final), minus training.
    """
    from core.events import read_jsonl
    from worker import api
    from worker.artifacts import ArtifactStore
    from worker.queues import discard_rq_job
    from worker.record import JobRecord, mark_final, mark_started
    from worker.states import JobState
    from worker.streaming import RedisEventSink

    job_id = submit_digits(conn, ["export.enabled=true", *(overrides or [])], name=name)
    discard_rq_job(conn, JobRecord.fetch(conn, job_id).rq_job)  # no worker may pick it up
    assert mark_started(conn, job_id, TEST_WORKER, job_id) == "ok"
    sink = RedisEventSink(conn, job_id)
    for rec in read_jsonl(run_dir / "metrics.jsonl"):
        sink.emit(rec["type"], rec["data"])
    sink.close()
    store = ArtifactStore()
    dest = store.local_run_dir(job_id)
    shutil.copytree(run_dir, dest, dirs_exist_ok=True)
    assert mark_final(conn, job_id, TEST_WORKER, JobState.FINISHED, {"artifacts": store.artifact_uris(job_id)}) == "ok"
    assert api.job_status(conn, job_id)["state"] == "finished"
    return job_id


def seed_running_job(conn: Any) -> str:
    """A job in state running, owned by TEST_WORKER (not alive: the dashboard says its worker stopped)."""
    from worker.queues import discard_rq_job
    from worker.record import JobRecord, mark_started

    job_id = submit_digits(conn, ["train.epochs=100"])
    discard_rq_job(conn, JobRecord.fetch(conn, job_id).rq_job)
    assert mark_started(conn, job_id, TEST_WORKER, job_id) == "ok"
    return job_id


def seed_step_events(conn: Any, job_id: str, n: int, *, steps_per_epoch: int = 100) -> None:
    """n events in the job's stream (a step per entry, an epoch event closing each epoch), written in batches."""
    import json

    from worker import keys

    epochs = -(-n // (steps_per_epoch + 1))
    written, e = 0, 0
    with conn.pipeline(transaction=False) as pipe:
        while written < n:
            e += 1
            for s in range(1, steps_per_epoch + 1):
                if written >= n:
                    break
                data = {"epoch": e, "step": s, "global_step": (e - 1) * steps_per_epoch + s,
                        "steps_per_epoch": steps_per_epoch, "epochs": epochs, "loss": 2.0 / (e + s / 100),
                        "lr": 1e-3, "images_per_sec": 1000.0 + s}
                pipe.xadd(keys.events(job_id), {"type": "step", "data": json.dumps(data)})
                written += 1
            if written < n:
                data = {"epoch": e, "epochs": epochs, "train_loss": 1.0 / e, "train_acc": 1 - 0.5 / e,
                        "val_loss": 1.1 / e, "val_acc": 1 - 0.6 / e, "lr": 1e-3, "seconds": 10.0,
                        "images_per_sec": 1000.0, "best_val_acc": 1 - 0.6 / e}
                pipe.xadd(keys.events(job_id), {"type": "epoch", "data": json.dumps(data)})
                written += 1
            if len(pipe) >= 2000:
                pipe.execute()
        pipe.execute()


def seed_jobs(conn: Any, n: int) -> list[str]:
    """n queued digits jobs, submitted through the real submission function."""
    return [submit_digits(conn, [f"train.seed={i}"]) for i in range(n)]


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    """The worker tests' `wait_for`, with the slower poll the dashboard tests use."""
    from tests.fixtures_worker import wait_for

    return wait_for(predicate, timeout, what, interval)
