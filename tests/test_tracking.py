"""MLflow and TensorBoard through core's sink interface (core/tracking.py), against a real `mlflow server` (sqlite
store, artifacts proxied into a temp folder, a free loopback port) started by this module, and TensorBoard event files
read back with tensorboard's own reader.

- A small synthetic run trained by `python -m core.train` with MLFLOW_TRACKING_URI logs params, per-epoch metrics (step =
  epoch), step losses, tags, the report, `model.onnx` as an MLflow ONNX model and bundle.zip; resumed, it continues the
  same MLflow run and no epoch appears twice, in MLflow or in TensorBoard.
- A server that is not there yet: emit() stays instant, one warning is printed, and once the server is up the events
  arrive by themselves.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.fixtures_worker import wait_for

SERVER_START_TIMEOUT = 180.0
"""Seconds `mlflow server` may take to answer /health (it migrates a fresh sqlite store first: ~30 s on 2 busy cores)."""


@contextlib.contextmanager
def mlflow_server(root: Path, port: int) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1:port with its sqlite store and artifacts under `root`; stopped (its whole process
    group) on exit."""
    import urllib.request

    from worker.procutil import own_session_preexec

    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner: fewer processes
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=own_session_preexec)  # noqa: PLW1509 - spawned before any thread of ours
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited: {(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False
        wait_for(up, SERVER_START_TIMEOUT, "mlflow server to answer /health", interval=0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def late_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A port with no server yet, then (test by test) the server on it: `start()` starts it once, the module's end
    stops it."""
    stack = contextlib.ExitStack()
    port = free_port()
    state: dict[str, Any] = {"url": f"http://127.0.0.1:{port}", "started": False}

    def start() -> str:
        if not state["started"]:
            stack.enter_context(mlflow_server(tmp_path_factory.mktemp("mlflow"), port))
            state["started"] = True
        return state["url"]

    state["start"] = start
    with stack:
        yield state


def client(url: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(url)


def test_an_absent_server_never_blocks_and_is_retried_in_the_background(late_server: dict[str, Any], tmp_path: Path,
                                                                       capfd: pytest.CaptureFixture[str]) -> None:
    from core.config import load_config
    from core.tracking import MLFLOW_RUN_FILE, MlflowSink

    cfg = load_config(None, ["track.run_name=late", "track.tags.job_id=late-job"])
    (tmp_path / "split.json").write_text('{"train": [1], "val": [2], "test": [3]}')
    sink = MlflowSink(late_server["url"], tmp_path, cfg.to_dict(), resume=False)
    started = time.perf_counter()
    sink.emit("start", {"epochs": 2, "resumed_from": None, "steps_per_epoch": 100})
    for step in range(1, 2001):  # a long epoch's worth of step events, while nothing answers
        sink.emit("step", {"epoch": 1, "step": step, "global_step": step, "loss": 1.0 / step, "lr": 1e-3})
    sink.emit("epoch", {"epoch": 1, "epochs": 2, "train_loss": 0.5, "val_acc": 0.75, "lr": 1e-3})
    assert time.perf_counter() - started < 1.0  # emit only buffers: the training thread never waits
    wait_for(lambda: sink.failing, 60, "the sink to notice the server is away")
    url = late_server["start"]()  # now it comes up; the sink finds it on one of its next tries
    wait_for(lambda: (tmp_path / MLFLOW_RUN_FILE).exists(), 90, "the run to be created once the server is up")
    sink.emit("epoch", {"epoch": 2, "epochs": 2, "train_loss": 0.25, "val_acc": 0.875, "lr": 1e-4})
    sink.emit("phase", {"phase": "done"})
    sink.close()
    err = capfd.readouterr().err
    assert err.count("unreachable or refusing") == 1, err  # said once, not per try
    assert "retrying in the background" in err and "reachable again" in err
    run_id = json.loads((tmp_path / MLFLOW_RUN_FILE).read_text())["run_id"]
    run = client(url).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "late" and run.data.tags["job_id"] == "late-job"
    assert [(m.step, m.value) for m in client(url).get_metric_history(run_id, "val_acc")] == [(1, 0.75), (2, 0.875)]
    assert len(client(url).get_metric_history(run_id, "step_loss")) == 2000


def test_mlflow_and_tensorboard_follow_a_run_and_its_resume(late_server: dict[str, Any], tmp_path: Path) -> None:
    import mlflow
    import mlflow.onnx

    from core.tracking import MLFLOW_RUN_FILE, TB_DIR
    from tests.fixtures_worker import run_cli

    url = late_server["start"]()
    run_dir = tmp_path / "run"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "2"}
    common = ["--set", "data.name=synthetic", "--set", "data.synthetic_size=200", "--set", "data.synthetic_classes=4",
              "--set", "data.synthetic_image_size=16", "--set", "data.image_size=16", "--set", "export.int8=false",
              "--set", "train.batch_size=16", "--set", "track.run_name=tracked",
              "--set", "track.tags.job_id=job-1", "--set", "track.mlflow_experiment=tests"]
    res = run_cli(["core.train", "configs/digits.yaml", "--out", str(run_dir), "--set", "train.epochs=2", *common],
                  env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    first = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())
    c = client(url)
    run = c.get_run(first["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert c.get_experiment(run.info.experiment_id).name == "tests"
    params = run.data.params
    assert params["data.name"] == "synthetic" and params["train.epochs"] == "2" and params["optim.name"] == "adamw"
    assert not any(k.startswith("track.") for k in params)
    tags = run.data.tags
    assert tags["job_id"] == "job-1" and len(tags["dataset_hash"]) == 64
    steps = {m.step for m in c.get_metric_history(run.info.run_id, "step_loss")}
    assert steps and max(steps) > 1
    assert {m.step for m in c.get_metric_history(run.info.run_id, "val_acc")} == {1, 2}
    report = json.loads((run_dir / "report.json").read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(report["test"]["accuracy"])
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"report.json", "bundle.zip"}
    mlflow.set_tracking_uri(url)
    model = mlflow.onnx.load_model(f"runs:/{run.info.run_id}/model")  # the ONNX model, as MLflow serves it
    assert [i.name for i in model.graph.input] == ["input"]

    # resumed (one more epoch): the same MLflow run, each epoch once; TensorBoard likewise
    res = run_cli(["core.train", "configs/digits.yaml", "--out", str(run_dir), "--resume", "--set", "train.epochs=3",
                   "--set", "export.enabled=false", *common], env, timeout=600)  # (the first run's export stays)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"] == first["run_id"]
    assert len(c.search_runs([run.info.experiment_id])) == 1
    history = c.get_metric_history(run.info.run_id, "val_acc")
    assert sorted(m.step for m in history) == [1, 2, 3]
    losses = [m.step for m in c.get_metric_history(run.info.run_id, "step_loss")]
    assert len(losses) == len(set(losses))
    assert c.get_run(run.info.run_id).info.status == "FINISHED"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TB_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    assert {"step/loss", "step/lr", "epoch/val_acc", "epoch/train_loss", "test/accuracy"} <= set(acc.Tags()["scalars"])
    assert sorted(s.step for s in acc.Scalars("epoch/val_acc")) == [1, 2, 3]
    val = {s.step: s.value for s in acc.Scalars("epoch/val_acc")}
    epochs = [json.loads(line)["data"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "epoch"]
    assert val == pytest.approx({e["epoch"]: e["val_acc"] for e in epochs})


def test_a_worker_names_and_tags_the_mlflow_run_after_its_job(late_server: dict[str, Any], job_env: dict[str, str],
                                                              redis_conn: Any, spawn: Any, tmp_path: Path) -> None:
    """MLFLOW_TRACKING_URI set on a worker (`python -m worker run`): the job's MLflow run is named after the job and
    tagged with the job id, the worker and the uploaded dataset's hash (the name of its file in the artifact store)."""
    from tests.fixtures_worker import explain_job, make_imagefolder, run_cli
    from worker import api

    url = late_server["start"]()
    env = {**job_env, "MLFLOW_TRACKING_URI": url}
    spawn.python(["worker", "run", "--cpu", "--slots", "1", "--name", "tracked-worker"], env, name="worker")
    folder = make_imagefolder(tmp_path / "shapes", per_class=12, size=16)
    res = run_cli(["worker", "submit", "configs/digits.yaml", "--set", "data.name=imagefolder",
                   "--set", f"data.path={folder}", "--set", "data.image_size=16", "--set", "train.epochs=1",
                   "--set", "train.batch_size=8", "--set", "export.enabled=false",
                   "--set", "track.mlflow_experiment=worker-jobs"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = res.stdout.split()[-1]
    wait_for(lambda: api.job_status(redis_conn, job_id)["final"], 240, "the job to end",
             explain=explain_job(redis_conn, job_id, spawn))
    status = api.job_status(redis_conn, job_id)
    assert status["state"] == "finished", explain_job(redis_conn, job_id, spawn)()
    c = client(url)
    (run,) = c.search_runs([c.get_experiment_by_name("worker-jobs").experiment_id])
    assert run.info.run_name == status["name"] and run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["job_id"] == job_id and tags["worker"] == "tracked-worker"
    assert f"artifact:datasets/{tags['dataset_hash']}.zip" == status["config"]["data"]["path"]
    assert {m.step for m in c.get_metric_history(run.info.run_id, "val_acc")} == {1}
