"""Redis access is not code execution on the workers: an RQ job put into a live worker's queue by hand that names
any function but the product's own (or carries a callback) is refused, logged and failed with the reason, and
nothing it names is imported or run. A real worker process, real RQ jobs, a module whose import leaves a mark."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rq import Callback, Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from tests.fixtures_worker import wait_for
from worker import api, keys
from worker.queues import JOB_FUNCTION


def test_a_worker_runs_only_the_product_job_function(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                                     tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "lure.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marks / 'imported')!r}).touch()\n"
        "def act(path):\n    Path(path).touch()\n")
    env = {**job_env, "PYTHONPATH": os.pathsep.join([str(tmp_path), job_env.get("PYTHONPATH", "")])}
    worker = spawn.python(["worker", "run", "--cpu", "--slots", "1", "--no-prewarm"], env, name="worker")
    wait_for(lambda: api.list_workers(redis_conn), 60, "the worker to advertise")

    queue = Queue(keys.queue_name(1, "default"), connection=redis_conn, serializer=JSONSerializer)
    jobs = [
        queue.enqueue_call("os.system", args=[f"touch {marks / 'shell'}"]),
        queue.enqueue_call("lure.act", args=[str(marks / "ran")]),
        queue.enqueue_call(JOB_FUNCTION, args=["20250101-000000-abcdef"], on_failure=Callback("lure.act")),
    ]

    def states() -> list[Any]:
        return [Job.fetch(j.id, connection=redis_conn, serializer=JSONSerializer).get_status() for j in jobs]

    wait_for(lambda: all(s == JobStatus.FAILED for s in states()), 60, "the three jobs to be failed",
             explain=lambda: f"{states()}\n{spawn.output(worker)[-3000:]}")
    for j in jobs:
        info = Job.fetch(j.id, connection=redis_conn, serializer=JSONSerializer).latest_result().exc_string
        assert "refused RQ job" in info and JOB_FUNCTION in info, info
    assert sorted(p.name for p in marks.iterdir()) == []  # nothing ran, nothing was even imported
    log = spawn.output(worker)
    assert "refused RQ job" in log and "'os.system'" in log and "callbacks lure.act" in log
    assert worker.poll() is None and api.list_workers(redis_conn)  # the worker goes on serving
