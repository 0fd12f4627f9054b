"""The model registry through the real CLI (`python -m worker model ...`), on a real Redis and artifact store, from a
job whose run folder was trained and exported by core (tests/fixtures_runs.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.fixtures_app import seed_finished_job, seed_running_job
from tests.fixtures_worker import run_cli
from worker import api
from worker.artifacts import ArtifactStore


def model(args: list[str], env: dict[str, str]) -> Any:
    return run_cli(["worker", "model", *args], env)


def shown(ref: str, env: dict[str, str]) -> Any:
    res = model(["show", ref, "--json"], env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_register_alias_show_and_remove(redis_conn: Any, job_env: dict[str, str], exported_run: Path) -> None:
    job_id = seed_finished_job(redis_conn, exported_run, name="digits run")
    res = model(["register", job_id, "--name", "digits"], job_env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == "digits:1"
    v1 = shown("digits:1", job_env)
    report = json.loads((exported_run / "report.json").read_text())
    assert v1["job_id"] == job_id and v1["job_name"] == "digits run"
    assert v1["deploy"] == report["export"]["deploy"]["file"]
    assert v1["metrics"]["accuracy"] == report["test"]["accuracy"]
    assert v1["labels"] == json.loads((exported_run / "labels.json").read_text())
    store = ArtifactStore()
    assert {"model.onnx", "labels.json", "preprocess.json", "report.json"} <= set(v1["files"])
    for file, size in v1["files"].items():
        assert store.size(f"models/digits/1/{file}") == size

    api.delete_job(redis_conn, job_id)  # the version keeps its own copy of the files
    assert shown("digits:1", job_env)["files"] == v1["files"]
    assert store.size(f"models/digits/1/{v1['deploy']}") == v1["files"][v1["deploy"]]

    job2 = seed_finished_job(redis_conn, exported_run)
    assert model(["register", job2, "--name", "digits"], job_env).stdout.split()[-1] == "digits:2"
    assert model(["alias", "digits", "production", "1"], job_env).returncode == 0
    assert shown("digits@production", job_env)["version"] == 1
    moved = model(["alias", "digits", "production", "2"], job_env)
    assert moved.returncode == 0 and "(was 1)" in moved.stdout
    assert shown("digits@production", job_env)["version"] == 2 and shown("digits", job_env)[1]["aliases"] == [
        "production"]
    listed = json.loads(model(["list", "--json"], job_env).stdout)
    assert listed[0]["name"] == "digits" and listed[0]["versions"] == [1, 2] and listed[0]["aliases"] == {
        "production": 2}

    assert model(["rm", "digits:2"], job_env).returncode == 0
    assert shown("digits", job_env)[0]["version"] == 1
    assert model(["show", "digits@production", "--json"], job_env).returncode == 2  # its alias went with it
    assert model(["register", job2, "--name", "digits"], job_env).stdout.split()[-1] == "digits:3"  # never reused
    assert model(["rm", "digits"], job_env).returncode == 0
    assert json.loads(model(["list", "--json"], job_env).stdout) == []
    assert not store.listing("models/digits")


def test_refusals_name_the_problem_and_change_nothing(redis_conn: Any, job_env: dict[str, str],
                                                     exported_run: Path) -> None:
    job_id = seed_finished_job(redis_conn, exported_run)
    running = seed_running_job(redis_conn)
    cases = [
        (["register", "20250101-000000-abcdef", "--name", "digits"], "no job 20250101-000000-abcdef"),
        (["register", running, "--name", "digits"], "only a finished job can be registered"),
        (["register", job_id, "--name", "Digits!"], "invalid model name 'Digits!'"),
        (["show", "nothing"], "no model named 'nothing'"),
        (["alias", "nothing", "prod", "1"], "no model named 'nothing'"),
        (["show", "digits:x"], "use NAME, NAME:VERSION or NAME@ALIAS"),
    ]
    for args, message in cases:
        res = model(args, job_env)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    assert json.loads(model(["list", "--json"], job_env).stdout) == []
    assert model(["register", job_id, "--name", "digits"], job_env).returncode == 0
    for args, message in [(["alias", "digits", "prod", "7"], "has no version 7 (versions: 1)"),
                          (["alias", "digits", "PROD", "1"], "invalid alias 'PROD'"),
                          (["show", "digits@staging"], "has no alias 'staging'"),
                          (["rm", "digits@staging"], "not an alias")]:
        res = model(args, job_env)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
    assert shown("digits", job_env)[0]["aliases"] == []
