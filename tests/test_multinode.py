"""Multi-node jobs: the gang reservation in Redis (worker/gang.py) and real gangs of `python -m worker run`
processes running one DDP job with torchrun's static rendezvous (worker/multinode.py).

Workers here are CPU workers with one slot each (`--cpu --slots 1`), advertising 127.0.0.1 (WORKER_ADDR), so every
byte stays on loopback; tests/test_multinode_netns.py runs the same over a veth pair between two network namespaces.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.fixtures_worker import DIGITS, explain_job, run_cli, wait_for
from tests.test_worker_jobs import rank_processes
from worker import api, gang, keys
from worker.errors import SubmissionError
from worker.presence import advertise
from worker.submit import submit_job

FAST = ["export.enabled=false", "train.log_every=2", "data.image_size=8"]
"""Every job here: digits at 8 px, no export, frequent step events."""


def start_worker(spawn: Any, env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
    return spawn.python(["worker", "run", "--cpu", "--slots", "1", "--no-prewarm", "--name", name], env, name=name)


def mn_env(job_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**job_env, "WORKER_ADDR": "127.0.0.1", **extra}


def fake_worker(conn: Any, name: str, slots: int = 1, ttl: int = 30) -> None:
    """An advertisement without a process (the reservation logic only reads advertisements)."""
    advertise(conn, name, {"name": name, "kind": "cpu", "slots": slots, "state": "idle"}, ttl)


def wait_workers(conn: Any, n: int) -> None:
    wait_for(lambda: len(api.list_workers(conn)) >= n, 60, f"{n} live workers")


def finished(conn: Any, job_id: str) -> bool:
    return bool(api.job_status(conn, job_id)["final"])


# ============================================================================================= reservation only
def test_bad_node_counts_are_refused_and_nothing_is_enqueued(redis_conn: Any, job_env: dict[str, str]) -> None:
    fake_worker(redis_conn, "w-a")
    fake_worker(redis_conn, "w-b", slots=2)
    for nodes, why in ((0, "from 1 to"), (-1, "from 1 to"), (3, "need 3 live workers")):
        with pytest.raises(SubmissionError, match=why):
            submit_job(DIGITS, FAST, connection=redis_conn, allow_local_paths=True, nodes=nodes)
    with pytest.raises(SubmissionError, match="host 2; 1 can"):  # two nodes of 2 slots: one worker has 2
        submit_job(DIGITS, FAST, connection=redis_conn, allow_local_paths=True, nodes=2, gpus=2)
    assert api.list_jobs(redis_conn) == [] and redis_conn.zcard(keys.gangs()) == 0
    res = run_cli(["worker", "submit", str(DIGITS), "--nodes", "3", *[a for s in FAST for a in ("--set", s)]],
                  job_env)
    assert res.returncode == 2 and "nodes: 3 nodes" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert api.list_jobs(redis_conn) == []


def test_gang_fills_in_order_and_starts_atomically(redis_conn: Any, job_env: dict[str, str]) -> None:
    """Two 2-node jobs, two workers: both reserve for the earlier one (no split, no deadlock); the second reservation
    starts it in the same Lua call; a dead reserved worker is dropped and replaced; cancel releases everyone."""
    for name in ("w-a", "w-b", "w-c"):
        fake_worker(redis_conn, name)
    first = submit_job(DIGITS, FAST, connection=redis_conn, allow_local_paths=True, nodes=2)
    second = submit_job(DIGITS, FAST, connection=redis_conn, allow_local_paths=True, nodes=2, priority="high")
    assert api.job_status(redis_conn, first)["waiting"] == "0 of 2 workers reserved"
    # priority before submission time: the later high-priority job is served first
    assert gang.try_reserve(redis_conn, "w-a", 1) == second
    assert gang.try_reserve(redis_conn, "w-a", 1) == second  # one reservation per worker
    st = api.job_status(redis_conn, second)
    assert st["waiting"] == "1 of 2 workers reserved" and st["nodes"][0]["state"] == "reserved"
    assert gang.try_reserve(redis_conn, "w-b", 1) == second
    assert api.job_status(redis_conn, second)["state"] == "running"  # w-a + w-b completed it atomically
    assert json.loads(redis_conn.hget(keys.job(second), "gang")) == ["w-a", "w-b"]
    assert redis_conn.zrange(keys.gangs(), 0, -1) == [first.encode()]

    assert gang.try_reserve(redis_conn, "w-c", 1) == first
    redis_conn.delete(keys.worker("w-c"))  # w-c dies while reserved
    fake_worker(redis_conn, "w-d")
    assert gang.try_reserve(redis_conn, "w-d", 1) == first
    assert gang.poll(redis_conn, first, "w-d", timeout=60)[0] == "wait"
    assert gang.members(redis_conn, first) == ["w-d"], "the dead worker was not dropped"
    assert api.job_status(redis_conn, first)["waiting"] == "1 of 2 workers reserved"

    assert api.cancel_job(redis_conn, first) == "cancelled"
    assert gang.reserved_job(redis_conn, "w-d") is None and redis_conn.zcard(keys.gangs()) == 0


def test_incomplete_gang_is_released_after_the_timeout(redis_conn: Any, job_env: dict[str, str]) -> None:
    for name in ("w-a", "w-b"):
        fake_worker(redis_conn, name)
    job = submit_job(DIGITS, FAST, connection=redis_conn, allow_local_paths=True, nodes=2)
    assert gang.try_reserve(redis_conn, "w-a", 1) == job
    assert gang.poll(redis_conn, job, "w-a", timeout=60)[0] == "wait"
    redis_conn.hset(keys.job(job), "gang_since", time.time() - 61)  # its first reservation is 61 s old
    assert gang.poll(redis_conn, job, "w-a", timeout=60)[0] == "released"
    st = api.job_status(redis_conn, job)
    assert st["state"] == "queued" and "did not complete within 60 s" in st["waiting"]
    assert gang.reserved_job(redis_conn, "w-a") is None and gang.members(redis_conn, job) == []
    assert redis_conn.zrange(keys.gangs(), 0, -1) == [job.encode()]  # still waiting for a gang


# ========================================================================================= real gangs (test 1)
def test_two_node_job_on_two_workers(redis_conn: Any, job_env: dict[str, str], spawn: Any, test_token: str) -> None:
    """Issue test 1: `--nodes 2 --gpus 1` on two one-slot workers finishes; world size 2; the record names both."""
    env = mn_env(job_env)
    start_worker(spawn, env, "node-a")
    start_worker(spawn, env, "node-b")
    wait_workers(redis_conn, 2)
    res = run_cli(["worker", "submit", str(DIGITS), "--nodes", "2", "--gpus", "1",
                   *[a for s in ["train.epochs=1", *FAST] for a in ("--set", s)]], env)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.split()[-1]
    wait_for(lambda: finished(redis_conn, job_id), 180, "the 2-node job", explain=explain_job(redis_conn, job_id, spawn))
    st = api.job_status(redis_conn, job_id)
    assert st["state"] == "finished", explain_job(redis_conn, job_id, spawn)()
    report = json.loads(api.read_artifact(job_id, "report"))
    assert report["world_size"] == 2 and st["world_size"] == "2"
    assert sorted(st["gang"]) == ["node-a", "node-b"]
    assert [(n["node_rank"], n["state"]) for n in st["nodes"]] == [(0, "finished"), (1, "finished")]
    assert {n["worker"] for n in st["nodes"]} == {"node-a", "node-b"}
    lines = [e["line"] for e in api.logs_tail(redis_conn, job_id, 2000)]
    assert any(line.startswith("[node 0] ") for line in lines) and any(line.startswith("[node 1] ") for line in lines)
    assert any("--nnodes=2" in line or "rendezvous at 127.0.0.1:" in line for line in lines)
    status_json = json.loads(run_cli(["worker", "status", job_id, "--json"], env).stdout)
    assert len(status_json["nodes"]) == 2
    assert rank_processes(test_token) == []
