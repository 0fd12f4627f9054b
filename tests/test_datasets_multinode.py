"""A 2-node job on a registered dataset that is read from its prepared shards: two real workers, one torchrun node
each, the form prepared once (one node prepares under the Redis lock, the other waits), both ranks streaming their
part of every epoch (`data.cache: off` makes the shards the path)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_worker import explain_job, make_imagefolder, run_cli, wait_for
from tests.test_multinode import finished, mn_env, start_worker, wait_workers
from worker import api


@pytest.mark.slow
def test_two_node_job_on_a_registered_dataset_reads_shards(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                                         tmp_path: Path) -> None:
    env = mn_env(job_env)
    folder = make_imagefolder(tmp_path / "shapes", per_class=24, size=24)
    assert run_cli(["worker", "dataset", "add", "shapes", folder.as_uri()], env).returncode == 0
    start_worker(spawn, env, "node-a")
    start_worker(spawn, env, "node-b")
    wait_workers(redis_conn, 2)
    sets = ["data.dataset=shapes", "data.cache=off", "data.image_size=16", "train.epochs=2", "train.batch_size=8",
            "export.enabled=false", "model.name=simple_cnn"]
    res = run_cli(["worker", "submit", "configs/digits.yaml", "--nodes", "2", "--gpus", "1",
                   *[a for s in sets for a in ("--set", s)]], env)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.split()[-1]
    wait_for(lambda: finished(redis_conn, job_id), 300, "the 2-node job", explain=explain_job(redis_conn, job_id, spawn))
    st = api.job_status(redis_conn, job_id)
    assert st["state"] == "finished", explain_job(redis_conn, job_id, spawn)()
    report = json.loads(api.read_artifact(job_id, "report"))
    assert report["world_size"] == 2 and report["data_path"] == "shards"
    assert report["data"]["dataset"] == "shapes:1"
    forms = json.loads(run_cli(["worker", "dataset", "show", "shapes:1", "--json"], env).stdout)["prepared"]
    assert len(forms) == 1  # prepared once, for both nodes
    epochs = [e for e in api.epoch_events(redis_conn, job_id)]
    assert [e["epoch"] for e in epochs] == [1, 2]
