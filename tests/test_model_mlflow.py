"""The model registry mirrored into MLflow's (worker/models/mlflow_mirror.py), through the real CLI, against a real
`mlflow server` on loopback (tests/test_tracking.py's `mlflow_server`), read back with MlflowClient as an MLflow user
would: the registered version, the run it came from, the model's bytes and the aliases as they move.

An MLflow server that is not there never fails a registration: one warning line, `mlflow: null`.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.fixtures_app import seed_finished_job
from tests.test_model_registry import model, shown
from tests.test_tracking import mlflow_server
from worker.artifacts import ArtifactStore


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow_registry"), free_port()) as url:
        yield url


def test_an_unreachable_mlflow_server_never_fails_registration(redis_conn: Any, job_env: dict[str, str],
                                                               exported_run: Path) -> None:
    env = {**job_env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    job_id = seed_finished_job(redis_conn, exported_run)
    res = model(["register", job_id, "--name", "digits"], env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == "digits:1"
    warnings = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: mlflow: digits:1 registered here but not in MLflow")
    assert shown("digits:1", env)["mlflow"] is None
    moved = model(["alias", "digits", "production", "1"], env)  # nothing mirrored: nothing to tell MLflow
    assert moved.returncode == 0 and moved.stderr == ""


@pytest.mark.slow  # a fresh `mlflow server` takes ~30 s to migrate its store on 2 busy cores
def test_versions_and_aliases_appear_in_mlflow(mlflow_url: str, redis_conn: Any, job_env: dict[str, str],
                                               exported_run: Path) -> None:
    import mlflow.onnx
    from mlflow.tracking import MlflowClient

    env = {**job_env, "MLFLOW_TRACKING_URI": mlflow_url}
    client = MlflowClient(mlflow_url)
    store = ArtifactStore()

    # a job that did not track to MLflow: a run of its own in the registry experiment
    job1 = seed_finished_job(redis_conn, exported_run)
    res = model(["register", job1, "--name", "digits"], env)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    v1 = shown("digits:1", env)
    m1 = v1["mlflow"]
    assert m1["name"] == "digits" and m1["uri"] == f"models:/digits/{m1['version']}"
    registered = client.get_model_version("digits", str(m1["version"]))
    assert registered.run_id == m1["run_id"]
    assert client.get_run(m1["run_id"]).data.tags["job_id"] == job1
    mlflow.set_tracking_uri(mlflow_url)
    logged = mlflow.onnx.load_model(m1["uri"])
    assert logged.SerializeToString() == store.read_key(f"models/digits/1/{v1['deploy']}")

    # a job that tracked its own MLflow run (mlflow.json in its run folder): the model goes into that run
    exp = client.create_experiment("jobs")
    job_run = client.create_run(exp).info.run_id
    job2 = seed_finished_job(redis_conn, exported_run)
    (store.local_run_dir(job2) / "mlflow.json").write_text(json.dumps(
        {"tracking_uri": mlflow_url, "experiment_id": exp, "run_id": job_run}))
    assert model(["register", job2, "--name", "digits"], env).stdout.split()[-1] == "digits:2"
    m2 = shown("digits:2", env)["mlflow"]
    assert m2["run_id"] == job_run and m2["version"] == m1["version"] + 1
    assert client.get_model_version("digits", str(m2["version"])).run_id == job_run
    text = model(["show", "digits:2"], env)
    assert f"mlflow {m2['uri']} at {mlflow_url}" in text.stdout

    # aliases follow: set, moved, deleted
    assert model(["alias", "digits", "production", "1"], env).returncode == 0
    assert client.get_model_version_by_alias("digits", "production").version == str(m1["version"])
    moved = model(["alias", "digits", "production", "2"], env)
    assert moved.returncode == 0 and moved.stderr == "", moved.stderr
    assert client.get_model_version_by_alias("digits", "production").version == str(m2["version"])
    assert model(["alias", "digits", "production", "--delete"], env).returncode == 0
    assert "production" not in client.get_registered_model("digits").aliases
