"""Registered datasets read as prepared shards by several real workers, each with its own var folder (so its own shard
cache, as on separate machines): a 2-node job on an in-place source (a shared `file://` path, or an S3 prefix with the
artifact store on S3 too, both on a real moto_server), and a job whose worker is SIGKILLed mid-epoch and resumed by
another. Nothing of the data passes through the submitting process; every epoch appears once and trains on each
sample once (the epoch event's `samples`). `data.cache: off` makes the shards the path."""
from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from core.data.shards import read_index
from tests.fixtures_s3 import private_s3
from tests.fixtures_worker import explain_job, make_imagefolder, process_tree, run_cli, wait_for
from tests.test_datasets import upload_tree
from tests.test_multinode import finished, mn_env, start_worker, wait_workers
from worker import api
from worker.defaults import DATASET_SAMPLE_PER_CLASS


def node_env(env: dict[str, str], tmp_path: Path, name: str) -> dict[str, str]:
    """A worker's environment with its own var folder: its own dataset and shard caches, as on its own machine."""
    return {**env, "TRAINER_VAR_DIR": str(tmp_path / name)}


def cached_shards(tmp_path: Path, name: str) -> set[str]:
    """sha256 of every shard in node `name`'s shard cache (`<var>/cache/shards/<sha256>.tar`)."""
    folder = tmp_path / name / "cache" / "shards"
    return {p.stem for p in folder.glob("*.tar")} if folder.is_dir() else set()


def shard_hashes(form_url: str) -> set[str]:
    index = read_index(form_url)
    assert all(len(split.shards) == 1 for split in index.splits.values())  # small data: one shard per split
    return {s.sha256 for split in index.splits.values() for s in split.shards}


def submit(env: dict[str, str], sets: list[str], *flags: str) -> str:
    res = run_cli(["worker", "submit", "configs/digits.yaml", *flags, *[a for s in sets for a in ("--set", s)]], env)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()[-1]


def assert_each_sample_once_per_epoch(conn: Any, job_id: str, epochs: int) -> None:
    """Every epoch in the stream once, each having trained on the whole train split once (the sizes here divide
    evenly into ranks and batches, so nothing is left out)."""
    report = json.loads(api.read_artifact(job_id, "report"))
    n_train = report["data"]["counts"]["train"]
    events = api.epoch_events(conn, job_id)
    assert [e["epoch"] for e in events] == list(range(1, epochs + 1))
    assert [e["samples"] for e in events] == [n_train] * epochs, events


@pytest.mark.slow  # a 2-node job on two real workers: one to two minutes on 2 shared cores
@pytest.mark.parametrize("where", ["file", "s3"])
def test_two_node_job_on_an_in_place_dataset_reads_shards_through_each_nodes_cache(
        where: str, redis_conn: Any, job_env: dict[str, str], spawn: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_imagefolder(tmp_path / "shapes", per_class=40, size=24)  # 84 train images: 2 ranks × 7 × 6
    server = private_s3(tmp_path / "s3") if where == "s3" else contextlib.nullcontext()
    with server as s3:
        env = mn_env(job_env)
        if s3 is not None:
            for k, v in {**s3.env, "ARTIFACTS_DIR": s3.bucket("store") + "/artifacts"}.items():
                monkeypatch.setenv(k, v)  # this process reads the store (report, index) as the workers do
                env[k] = v
            upload_tree(s3, folder, s3.bucket("src") + "/shapes")
            source = "s3://src/shapes"
        else:
            source = folder.as_uri()
        added = run_cli(["worker", "dataset", "add", "shapes", source], env)
        assert added.returncode == 0, added.stderr
        shown = json.loads(run_cli(["worker", "dataset", "show", "shapes:1", "--json"], env).stdout)
        assert shown["kind"] == "in_place" and shown["source"] == source
        if s3 is not None:  # registration read a sample per class, not the data
            assert len(s3.object_gets("src")) <= 3 * DATASET_SAMPLE_PER_CLASS < 120
        for name in ("node-a", "node-b"):
            start_worker(spawn, node_env(env, tmp_path, name), name)
        wait_workers(redis_conn, 2)
        sets = ["data.dataset=shapes", "data.cache=off", "data.image_size=16", "train.epochs=2",
                "train.batch_size=6", "export.enabled=false", "model.name=simple_cnn", "track.tensorboard=false"]
        job_id = submit(env, sets, "--nodes", "2", "--gpus", "1")
        explain = explain_job(redis_conn, job_id, spawn)
        wait_for(lambda: finished(redis_conn, job_id), 300, "the 2-node job", explain=explain)
        st = api.job_status(redis_conn, job_id)
        assert st["state"] == "finished", explain()
        report = json.loads(api.read_artifact(job_id, "report"))
        assert report["world_size"] == 2 and report["data_path"] == "shards"
        assert report["data"]["dataset"] == "shapes:1" and report["data"]["counts"]["train"] == 84
        assert_each_sample_once_per_epoch(redis_conn, job_id, 2)

        forms = json.loads(run_cli(["worker", "dataset", "show", "shapes:1", "--json"], env).stdout)["prepared"]
        assert len(forms) == 1  # prepared once, by one node, for both
        logs = " ".join(e["line"] for e in api.logs_tail(redis_conn, job_id, 2000))
        assert logs.count("preparing shapes:1") == 1, logs[-2000:]
        wanted = shard_hashes(forms[0]["url"])
        for name in ("node-a", "node-b"):  # each node fetched the shards it read into its own cache
            assert cached_shards(tmp_path, name) == wanted, name
        if s3 is not None:
            assert forms[0]["url"].startswith("s3://store/artifacts/prepared/")
            stored = s3.fs().find("store/artifacts")
            assert not [p for p in stored if "/datasets/" in p], stored  # no upload of the data: read in place
            names = {s.name for split in read_index(forms[0]["url"]).splits.values() for s in split.shards}
            gets = [k.rsplit("/", 1)[-1] for k in s3.object_gets("store")]
            assert all(gets.count(n) >= 2 for n in names), gets  # from S3, once into each node's cache
        else:
            assert not (Path(env["ARTIFACTS_DIR"]) / "datasets").exists()  # no upload of the data
            for name in ("node-a", "node-b"):  # read from the shared path itself, never synced into a node
                assert not any((tmp_path / name / "cache" / "datasets").glob("*")), name


def _step_of_epoch(conn: Any, job_id: str, epoch: int) -> dict[str, Any] | None:
    return next((e["data"] for e in api.events_since(conn, job_id, "0")
                 if e["type"] == "step" and e["data"].get("epoch") == epoch), None)


@pytest.mark.slow  # a job killed and resumed on a second worker: about two minutes on 2 shared cores
def test_a_shards_job_killed_mid_epoch_resumes_on_another_worker_each_sample_once_per_epoch(
        redis_conn: Any, job_env: dict[str, str], spawn: Any, tmp_path: Path) -> None:
    env = mn_env(job_env)
    folder = make_imagefolder(tmp_path / "shapes", per_class=80, size=32)  # 168 train images: 14 batches of 12
    assert run_cli(["worker", "dataset", "add", "shapes", folder.as_uri()], env).returncode == 0
    first = start_worker(spawn, node_env(env, tmp_path, "node-a"), "node-a")
    sets = ["data.dataset=shapes", "data.cache=off", "data.image_size=32", "train.epochs=3", "train.batch_size=12",
            "train.log_every=1", "export.enabled=false", "model.name=resnet18", "track.tensorboard=false"]
    job_id = submit(env, sets)
    explain = explain_job(redis_conn, job_id, spawn)
    step = wait_for(lambda: _step_of_epoch(redis_conn, job_id, 2), 240, "a step of epoch 2", interval=0.05,
                    explain=explain)
    for proc in process_tree(first.pid):  # node-a is lost mid-epoch: its worker, guard and rank at once
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    assert [e["epoch"] for e in api.epoch_events(redis_conn, job_id)] == [1], "epoch 2 ended before the kill"
    assert step["step"] < step["steps_per_epoch"] == 14
    assert cached_shards(tmp_path, "node-a") and not cached_shards(tmp_path, "node-b")

    start_worker(spawn, node_env(env, tmp_path, "node-b"), "node-b")
    wait_for(lambda: finished(redis_conn, job_id), 300, "the job to finish on node-b", explain=explain)
    st = api.job_status(redis_conn, job_id)
    assert st["state"] == "finished", explain()
    assert st["recoveries"] == 1 and st["worker"] == "node-b" and st["resumed_from"] == 1, st
    report = json.loads(api.read_artifact(job_id, "report"))
    assert report["data_path"] == "shards" and report["data"]["counts"]["train"] == 168
    assert_each_sample_once_per_epoch(redis_conn, job_id, 3)
    form = json.loads(run_cli(["worker", "dataset", "show", "shapes:1", "--json"], env).stdout)["prepared"][0]
    assert cached_shards(tmp_path, "node-b") == shard_hashes(form["url"])  # node-b read them itself


@pytest.mark.slow  # a 2-node job on two real workers that fails on one of them: about 40 s on 2 shared cores
def test_a_failure_on_one_node_reaches_the_job_log_and_the_jobs_error(
        redis_conn: Any, job_env: dict[str, str], spawn: Any, tmp_path: Path) -> None:
    """One node's shard cache budget is smaller than a shard, so its rank fails with a DataError while the other
    node's rank fails on the closed connection. The job's log has the failing rank's own `error` line under its node's
    tag, and the job's error names it, whichever node it was (node 0 says it as its own; node 1's is named by node 0
    as `node 1 (worker W): ...` beside node 0's closed connection)."""
    folder = make_imagefolder(tmp_path / "shapes", per_class=40, size=24)
    env = mn_env(job_env)
    assert run_cli(["worker", "dataset", "add", "shapes", folder.as_uri()], env).returncode == 0
    start_worker(spawn, {**node_env(env, tmp_path, "node-a"), "DATASET_CACHE_GB": "0.000001"}, "node-a")
    start_worker(spawn, node_env(env, tmp_path, "node-b"), "node-b")
    wait_workers(redis_conn, 2)
    sets = ["data.dataset=shapes", "data.cache=off", "data.image_size=16", "train.epochs=2", "train.batch_size=6",
            "export.enabled=false", "model.name=simple_cnn", "track.tensorboard=false"]
    job_id = submit(env, sets, "--nodes", "2", "--gpus", "1")
    explain = explain_job(redis_conn, job_id, spawn)
    wait_for(lambda: finished(redis_conn, job_id), 300, "the 2-node job to end", explain=explain)
    st = api.job_status(redis_conn, job_id)
    assert st["state"] == "failed", explain()
    node = next(n["node_rank"] for n in st["nodes"] if n["worker"] == "node-a")
    said = "the shard cache budget DATASET_CACHE_GB=1e-06 GB"
    rank_tag = " (rank 1)" if node == 1 else ""
    lines = [e["line"] for e in api.logs_tail(redis_conn, job_id, 2000)]
    assert any(line.startswith(f"[node {node}] error{rank_tag}: {said}") for line in lines), lines[-60:]
    assert not any("ChildFailedError" in line for line in lines)  # torchrun's summary is one line per failed rank
    assert any(line.startswith(f"[node {node}] [torchrun] rank {node} (local rank 0) exited with code 2")
               for line in lines), lines[-60:]
    assert said in st["error"], st["error"]
    if node == 1:
        assert f"node 1 (worker node-a): error (rank 1): {said}" in st["error"], st["error"]
