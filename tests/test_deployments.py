"""Managed deployments (README "Models and serving"): real workers host the inference server; a deployment becomes
ready with a URL that answers the Open Inference Protocol behind its token, survives the death of its worker (another
worker takes it over), keeps its model version from being removed, and ends with `undeploy`."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_app import open_page, seed_finished_job, submit_digits
from tests.fixtures_worker import run_cli, wait_for
from tests.test_serving import call, multipart, ready


def deployments(env: dict[str, str]) -> list[dict[str, Any]]:
    res = run_cli(["worker", "deployments", "--json"], env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_deploy_survive_a_dead_worker_and_undeploy(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                                  exported_run: Path) -> None:
    job_id = seed_finished_job(redis_conn, exported_run)
    assert run_cli(["worker", "model", "register", job_id, "--name", "digits"], job_env).returncode == 0
    assert run_cli(["worker", "model", "alias", "digits", "production", "1"], job_env).returncode == 0
    first = spawn.python(["worker", "run", "--cpu", "--slots", "1", "--no-prewarm", "--name", "host-a"], job_env,
                         name="host-a")
    res = run_cli(["worker", "deploy", "digits@production"], job_env)
    assert res.returncode == 0, res.stderr
    dep_id = res.stdout.split()[-1]
    token = next(line.split()[-1] for line in res.stdout.splitlines() if line.startswith("bearer token"))

    live = wait_for(lambda: [d for d in deployments(job_env) if d["id"] == dep_id and d["state"] == "ready"], 120,
                    "the deployment to be ready", explain=lambda: spawn.output(first)[-3000:])[0]
    assert live["worker"] == "host-a" and live["url"].startswith("http://127.0.0.1:") and "token" not in live
    pp = json.loads((exported_run / "export/preprocess.json").read_text())
    c = 1 if pp["color_mode"] == "L" else 3
    body = json.dumps({"inputs": [{"name": pp["input_name"], "shape": [1, c, *pp["input_size"]], "datatype": "FP32",
                                   "data": [0.0] * (c * pp["input_size"][0] * pp["input_size"][1])}]}).encode()
    auth = {"Authorization": f"Bearer {token}"}
    status, out = call(live["url"] + "/v2/models/digits/infer", body, headers=auth)
    assert status == 200 and out["model_version"] == "1"
    assert call(live["url"] + "/v2/models/digits/infer", body)[0] == 401
    res = run_cli(["worker", "model", "rm", "digits:1"], job_env)
    assert res.returncode == 2 and f"served by deployment {dep_id}" in res.stderr

    at = open_page("try", {"job": job_id})  # Try it: the job's test samples, through the deployment
    shown = [s["image"] for s in json.loads((exported_run / "report.json").read_text())["samples"]]
    at.radio(key="try:runner").set_value(next(o for o in at.radio(key="try:runner").options if dep_id in o)).run()
    assert not at.exception, [e.value for e in at.exception]
    via_page = [t.value for t in at.markdown if t.value.startswith("Prediction:")]
    body_files, headers = multipart([(Path(n).name, (exported_run / n).read_bytes()) for n in shown[:len(via_page)]])
    _, direct = call(live["url"] + "/v2/models/digits/classify", body_files, headers={**headers, **auth})
    assert via_page and via_page == [f"Prediction: **{r['top'][0]['label']}** ({r['top'][0]['prob']:.1%})"
                                     for r in direct]  # the deployment's answers (it may serve the INT8 file)

    spawn.python(["worker", "run", "--cpu", "--slots", "1", "--no-prewarm", "--name", "host-b"], job_env,
                 name="host-b")
    wait_for(lambda: len(run_cli(["worker", "workers", "--json"], job_env).stdout.split('"name"')) > 2, 60,
             "the second worker")
    os.killpg(first.pid, signal.SIGKILL)  # the worker and, by its parent-death signal, its server
    moved = wait_for(lambda: [d for d in deployments(job_env) if d["state"] == "ready" and d["worker"] == "host-b"],
                     120, "the deployment on the other worker")[0]
    assert moved["url"] != live["url"] and not ready(live["url"])
    assert call(moved["url"] + "/v2/models/digits/infer", body, headers=auth)[0] == 200

    assert run_cli(["worker", "undeploy", dep_id], job_env).returncode == 0
    wait_for(lambda: not ready(moved["url"]), 30, "the server to end")
    (stopped,) = deployments(job_env)
    assert stopped["state"] == "stopped"
    wait_for(lambda: not deployments(job_env)[0]["replica_hosts"], 30, "the replica record to go")
    assert run_cli(["worker", "model", "rm", "digits:1"], job_env).returncode == 0  # nothing serves it now


def test_bad_deploys_are_refused(redis_conn: Any, job_env: dict[str, str]) -> None:
    for args, message in ((["deploy", "nothing"], "no model named 'nothing'"),
                          (["undeploy", "d-00000000"], "no deployment 'd-00000000'")):
        res = run_cli(["worker", *args], job_env)
        assert res.returncode == 2 and message in res.stderr, res.stderr
    assert deployments(job_env) == []


def _deploy_ready(job_env: dict[str, str], spawn: Any, worker: Any, ref: str) -> tuple[str, str, dict[str, Any]]:
    """(deployment id, its token, its `deployments` row once ready)."""
    res = run_cli(["worker", "deploy", ref], job_env)
    assert res.returncode == 0, res.stderr
    dep_id = res.stdout.split()[-1]
    token = next(line.split()[-1] for line in res.stdout.splitlines() if line.startswith("bearer token"))
    live = wait_for(lambda: [d for d in deployments(job_env) if d["id"] == dep_id and d["state"] == "ready"], 120,
                    "the deployment to be ready", explain=lambda: spawn.output(worker)[-3000:])[0]
    return dep_id, token, live


def _zero_infer(exported_run: Path) -> bytes:
    pp = json.loads((exported_run / "export/preprocess.json").read_text())
    c = 1 if pp["color_mode"] == "L" else 3
    return json.dumps({"inputs": [{"name": pp["input_name"], "shape": [1, c, *pp["input_size"]], "datatype": "FP32",
                                   "data": [0.0] * (c * pp["input_size"][0] * pp["input_size"][1])}]}).encode()


@pytest.mark.slow
def test_tokens_rotate_and_revoke_while_the_server_runs(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                                        exported_run: Path) -> None:
    import time

    from worker import api, keys

    job_id = seed_finished_job(redis_conn, exported_run)
    assert run_cli(["worker", "model", "register", job_id, "--name", "digits"], job_env).returncode == 0
    worker = spawn.python(["worker", "run", "--cpu", "--slots", "1", "--no-prewarm", "--name", "host-a"], job_env,
                          name="host-a")
    dep_id, first, live = _deploy_ready(job_env, spawn, worker, "digits")
    infer, body = live["url"] + "/v2/models/digits/infer", _zero_infer(exported_run)

    def status(token: str) -> int:
        return call(infer, body, headers={"Authorization": f"Bearer {token}"})[0]
    assert status(first) == 200
    stored = b"".join(str(redis_conn.dump(k)).encode() for k in redis_conn.keys(f"*{dep_id}*"))
    assert first.encode() not in stored  # Redis keeps a digest of the users' token, never the token

    res = run_cli(["worker", "deploy-token", dep_id, "--rotate"], job_env)
    assert res.returncode == 0, res.stderr
    rotated_at, second = time.monotonic(), res.stdout.split()[-1]
    assert status(second) == 200  # the new token works on its first request
    wait_for(lambda: status(first) == 401, 5, "the old token to stop working")
    assert time.monotonic() - rotated_at < 1.5
    assert all(status(second) == 200 for _ in range(20))  # and keeps working, on the same server process
    (same,) = [d for d in deployments(job_env) if d["id"] == dep_id]
    assert same["url"] == live["url"] and same["replica_hosts"][0]["pid"] == live["replica_hosts"][0]["pid"]
    assert second.encode() not in b"".join(str(redis_conn.dump(k)).encode() for k in redis_conn.keys(f"*{dep_id}*"))

    assert run_cli(["worker", "deploy-token", dep_id, "--revoke"], job_env).returncode == 0
    wait_for(lambda: status(second) == 401, 1.5, "the revoked token to stop working")
    picture = (exported_run / json.loads((exported_run / "report.json").read_text())["samples"][0]["image"])
    try:
        api.deployments.classify(redis_conn, dep_id, [("x.png", picture.read_bytes())], 1)
        raise AssertionError("Try it still reached a revoked deployment")
    except api.ModelError as err:
        assert "revoked" in str(err) and "--rotate" in str(err)
    res = run_cli(["worker", "deploy-token", dep_id, "--rotate"], job_env)
    third = res.stdout.split()[-1]
    assert status(third) == 200 and status(second) == 401
    assert api.deployments.classify(redis_conn, dep_id, [("x.png", picture.read_bytes())], 1)[0]["top"]
    assert keys.deployment_tokens(dep_id).encode() in redis_conn.keys(f"*{dep_id}*")

    for args, message in ((["deploy-token", "d-00000000", "--rotate"], "no deployment 'd-00000000'"),
                          (["deploy-token", dep_id], "one of the arguments --rotate --revoke is required")):
        res = run_cli(["worker", *args], job_env)
        assert res.returncode == 2 and message in res.stderr, res.stderr


@pytest.mark.slow
def test_stopped_and_failed_deployments_leave_and_expire(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                                         exported_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import api, keys

    for k, v in (("DEPLOYMENT_RETENTION_S", "8"), ("DEPLOYMENT_FAILED_GRACE_S", "2")):
        job_env[k] = v
        monkeypatch.setenv(k, v)
    job_id = seed_finished_job(redis_conn, exported_run)
    for _ in range(2):
        assert run_cli(["worker", "model", "register", job_id, "--name", "digits"], job_env).returncode == 0
    broken = api.models.resolve(redis_conn, "digits:2")
    Path(api.ArtifactStore().path(broken.key(broken.deploy))).write_bytes(b"not an ONNX file")
    worker = spawn.python(["worker", "run", "--cpu", "--slots", "1", "--no-prewarm", "--name", "host-a"], job_env,
                          name="host-a")

    def records(dep_id: str) -> list[bytes]:
        return redis_conn.keys(f"*{dep_id}*")
    dep_id, _, live = _deploy_ready(job_env, spawn, worker, "digits:1")
    assert run_cli(["worker", "undeploy", dep_id], job_env).returncode == 0
    (stopped,) = api.deployments.listing(redis_conn)  # still shown, as stopped, for the retention
    assert stopped["state"] == "stopped" and stopped["ended_at"] > 0
    assert dep_id.encode() not in redis_conn.smembers(keys.deployments_active())  # no worker looks at it again
    wait_for(lambda: not ready(live["url"]), 30, "the server to end")
    wait_for(lambda: deployments(job_env) == [] and not records(dep_id), 30, "the stopped deployment to expire")

    res = run_cli(["worker", "deploy", "digits:2"], job_env)
    failing = res.stdout.split()[-1]
    failed = wait_for(lambda: [d for d in deployments(job_env) if d["state"] == "failed"], 120,
                      "the deployment of a broken file to fail", explain=lambda: spawn.output(worker)[-3000:])[0]
    assert failed["id"] == failing and "exited 3 times" in failed["error"]
    wait_for(lambda: failing.encode() not in redis_conn.smembers(keys.deployments_active()), 30,
             "the failed deployment to be retired after its grace period")
    assert [d["id"] for d in api.deployments.listing(redis_conn)] == [failing]  # shown until the retention ends
    wait_for(lambda: deployments(job_env) == [] and not records(failing), 30, "the failed deployment to expire")
    assert run_cli(["worker", "model", "rm", "digits:2"], job_env).returncode == 0


def test_a_gpu_replica_waits_for_a_worker_with_a_free_gpu(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                                          exported_run: Path) -> None:
    """On CPU-only workers a `--gpus 1` deployment stays starting, saying why, while a CPU one beside it is served."""
    job_id = seed_finished_job(redis_conn, exported_run)
    assert run_cli(["worker", "model", "register", job_id, "--name", "digits"], job_env).returncode == 0
    res = run_cli(["worker", "deploy", "digits", "--gpus", "99"], job_env)
    assert res.returncode == 2 and "gpus: must be 0 to" in res.stderr, res.stderr
    res = run_cli(["worker", "deploy", "digits", "--gpus", "1"], job_env)
    assert res.returncode == 0, res.stderr
    gpu_dep = res.stdout.split()[-1]
    (waiting,) = deployments(job_env)
    assert waiting["waiting"] == "no worker is running (python -m worker run)"
    worker = spawn.python(["worker", "run", "--cpu", "--slots", "1", "--no-prewarm", "--name", "cpu-host"], job_env,
                          name="cpu-host")
    cpu_dep, _, _ = _deploy_ready(job_env, spawn, worker, "digits")  # the worker tends: it serves what it can
    (gpu,) = [d for d in deployments(job_env) if d["id"] == gpu_dep]
    assert gpu["state"] == "starting" and gpu["replica_hosts"] == [] and gpu["gpus"] == 1
    assert gpu["waiting"] == "needs a worker with 1 free GPU(s); no live worker has 1 GPU(s) (GPUs: cpu-host: 0)"
    listed = run_cli(["worker", "deployments"], job_env).stdout
    assert f"{gpu_dep}  digits" in listed and "waiting: needs a worker with 1 free GPU(s)" in listed
    assert cpu_dep in listed


def test_gpu_replicas_take_the_gpus_training_leaves(redis_conn: Any, job_env: dict[str, str], exported_run: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's placement, with its GPU inventory given (no GPU here): a replica asking for a GPU starts only when
    one is free of the training job, on that GPU (CUDA_VISIBLE_DEVICES, `serve --gpu`); the next one waits."""
    import psutil

    from worker import api, deploy_host, devices

    monkeypatch.setenv("WORKER_SERVE_SLOTS", "4")
    job_id = seed_finished_job(redis_conn, exported_run)
    assert run_cli(["worker", "model", "register", job_id, "--name", "digits"], job_env).returncode == 0
    first, _ = api.deployments.create(redis_conn, "digits", gpus=1)
    ledger = devices.DeviceLedger([0, 1])
    assert ledger.take(devices.TRAINING, 2) == [0, 1]
    host = deploy_host.Host(redis_conn, "gpu-host", "127.0.0.1", ledger=ledger)
    try:
        host.tend()
        assert not host.servers and api.deployments.hosts(redis_conn, first.id) == {}  # both GPUs train
        assert ledger.take(devices.TRAINING, 1) == [0]  # the next job needs one
        host.tend()
        (server,) = host.servers.values()
        assert server.gpus == [1]
        proc = psutil.Process(server.proc.pid)
        assert proc.environ()["CUDA_VISIBLE_DEVICES"] == "1" and "--gpu" in proc.cmdline()
        second, _ = api.deployments.create(redis_conn, "digits", gpus=1)
        host.tend()
        assert len(host.servers) == 1 and api.deployments.hosts(redis_conn, second.id) == {}  # no GPU left

        def first_ready() -> bool:
            host.tend()
            return api.deployments.hosts(redis_conn, first.id)[0]["state"] == "ready"
        wait_for(first_ready, 120, "the GPU replica to answer (ONNX Runtime falls back to the CPU here)",
                 interval=0.5)
        assert ledger.take(devices.TRAINING, 2) is None  # a 2-GPU job does not fit beside the replica
    finally:
        host.close()
    assert server.proc.poll() is not None and ledger.take(devices.TRAINING, 2) == [0, 1]  # given back at its end


def test_a_worker_takes_no_job_on_the_gpus_its_replicas_hold(redis_conn: Any, job_env: dict[str, str]) -> None:
    """A worker with two GPUs (its inventory given: no GPU here), one of them serving a deployment: a 2-GPU job is
    not taken, and one that a replica beat to its GPUs just after the dequeue goes back to the front of its queue,
    unstarted; a 1-GPU job gets the GPU the replica left."""
    from worker import devices
    from worker.artifacts import ArtifactStore
    from worker.record import JobRecord
    from worker.states import JobState
    from worker.worker import TrainerWorker

    worker = TrainerWorker(redis_conn, redis_url=job_env["REDIS_URL"], store=ArtifactStore(), name="gpu-worker",
                           resources={"kind": "gpu", "slots": 2, "devices": [0, 1], "gpus": []}, prewarm=False)
    ledger, replica = worker.ctx.ledger, ("dep", 0)
    big = submit_digits(redis_conn, gpus=2)

    def state(job_id: str) -> JobState:
        return JobRecord.find(redis_conn, job_id, "state").state

    assert ledger.take(replica, 1) == [1]
    assert worker.dequeue_job_and_maintain_ttl(None) is None  # burst-style look: nothing fits one GPU
    assert state(big) is JobState.QUEUED
    ledger.give_back(replica)
    job, queue = worker.dequeue_job_and_maintain_ttl(None)
    assert job.args[0] == big
    assert ledger.take(replica, 1) == [1]  # the deployment thread wins the race
    worker.execute_job(job, queue)
    assert queue.job_ids[:1] == [job.id] and state(big) is JobState.QUEUED and ledger.held(devices.TRAINING) == []

    small = submit_digits(redis_conn, gpus=1)
    job, queue = worker.dequeue_job_and_maintain_ttl(None)
    assert job.args[0] == small and ledger.take(devices.TRAINING, 1) == [0]
    assert worker.ctx.training_devices(1) == [0]


def test_a_host_record_written_just_after_an_undeploy_expires_with_the_deployment(
        redis_conn: Any, job_env: dict[str, str], exported_run: Path) -> None:
    """A worker that claims or updates a replica in the instant after an undeploy (the hosts hash did not exist when
    the undeploy gave the records their TTL, or it is written anew) leaves no hash behind that never expires."""
    from worker import api, deploy_host, keys

    job_id = seed_finished_job(redis_conn, exported_run)
    assert run_cli(["worker", "model", "register", job_id, "--name", "digits"], job_env).returncode == 0
    dep, _ = api.deployments.create(redis_conn, "digits")
    api.deployments.stop(redis_conn, dep.id)
    hkey = keys.deployment_hosts(dep.id)
    assert not redis_conn.exists(hkey) and redis_conn.ttl(keys.deployment(dep.id)) > 0
    host = deploy_host.Host(redis_conn, "late-host", "127.0.0.1")
    assert host._claim(dep, 0, None)  # it had read the deployment before the undeploy
    assert 0 < redis_conn.ttl(hkey) <= redis_conn.ttl(keys.deployment(dep.id))
    redis_conn.delete(keys.deployment(dep.id))  # the record expired
    host._record(dep, 0, state="ready", url="http://127.0.0.1:1")
    assert not redis_conn.exists(hkey)
