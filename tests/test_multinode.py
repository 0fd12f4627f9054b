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

from tests.conftest import processes_with_token
from tests.fixtures_worker import DIGITS, explain_job, process_tree, run_cli, wait_for
from tests.test_worker_jobs import rank_processes
from worker import api, gang, keys
from worker.errors import SubmissionError
from worker.outcome import last_words
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
    first = submit_job(DIGITS, FAST, connection=redis_conn, allow_local_paths=True, nodes=2).job_id
    second = submit_job(DIGITS, FAST, connection=redis_conn, allow_local_paths=True, nodes=2, priority="high").job_id
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
    job = submit_job(DIGITS, FAST, connection=redis_conn, allow_local_paths=True, nodes=2).job_id
    assert gang.try_reserve(redis_conn, "w-a", 1) == job
    assert gang.poll(redis_conn, job, "w-a", timeout=60)[0] == "wait"
    redis_conn.hset(keys.job(job), "gang_since", time.time() - 61)  # its first reservation is 61 s old
    assert gang.poll(redis_conn, job, "w-a", timeout=60)[0] == "released"
    st = api.job_status(redis_conn, job)
    assert st["state"] == "queued" and "did not complete within 60 s" in st["waiting"]
    assert gang.reserved_job(redis_conn, "w-a") is None and gang.members(redis_conn, job) == []
    assert redis_conn.zrange(keys.gangs(), 0, -1) == [job.encode()]  # still waiting for a gang


def test_single_node_job_runs_when_a_gang_cannot_complete(redis_conn: Any, job_env: dict[str, str],
                                                         spawn: Any) -> None:
    """The starvation rule: a worker reserved for a gang that cannot complete (its second worker never comes) is
    released after the timeout (3 s here) and then takes the queued single-node job; the gang job keeps waiting."""
    fake_worker(redis_conn, "w-absent", ttl=120)  # alive enough to accept the 2-node job, but never reserves
    env = mn_env(job_env, GANG_RESERVATION_TIMEOUT="3")
    start_worker(spawn, env, "node-a")
    wait_workers(redis_conn, 2)
    waiting = submit_job(DIGITS, FAST, connection=redis_conn, allow_local_paths=True, nodes=2).job_id
    wait_for(lambda: gang.reserved_job(redis_conn, "node-a") == waiting, 30, "node-a to reserve itself")
    single = submit_job(DIGITS, ["train.epochs=1", *FAST], connection=redis_conn, allow_local_paths=True).job_id
    wait_for(lambda: finished(redis_conn, single), 120, "the single-node job",
             explain=explain_job(redis_conn, single, spawn))
    assert api.job_status(redis_conn, single)["state"] == "finished"
    st = api.job_status(redis_conn, waiting)
    assert st["state"] == "queued" and st["waiting"], st
    logs = [e["line"] for e in api.logs_tail(redis_conn, waiting, 100)]
    assert any("did not complete within 3 s" in line for line in logs), logs


def test_a_nodes_last_words_are_its_ranks_error_not_torchruns_summary() -> None:
    """What node 1's worker reads from its output when its rank failed (tests/test_datasets_multinode.py runs it for
    real): the rank's own `error` line, not torch's log line nor python -m worker.torchrun's summary after it."""
    lines = ["[node 1] [worker] attempt 0 on worker node-a (vm), 1 CPU rank(s) (gloo)\n",
             "[node 1] error (rank 1): the shard cache budget is smaller than one shard\n",
             ("[node 1] E1207 15:55:25.528000 2547 .venv/lib/python3.11/site-packages/torch/distributed/elastic/"
             "multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 0 (pid: 2552) of binary: python\n"),
             "[node 1] [torchrun] rank 1 (local rank 0) exited with code 2\n"]
    assert last_words(lines) == "error (rank 1): the shard cache budget is smaller than one shard"
    traceback = ["[node 1] Traceback (most recent call last):\n", '[node 1]   File "x.py", line 1, in <module>\n',
                 "[node 1] ValueError: bad\n", "[node 1] error (rank 1): training failed (traceback above)\n",
                 "[node 1] [torchrun] rank 1 (local rank 0) exited with code 1\n"]
    assert last_words(traceback) == "ValueError: bad"


# ========================================================================================= real gangs (test 1)
def test_two_node_job_on_two_workers(redis_conn: Any, job_env: dict[str, str], spawn: Any, test_token: str) -> None:
    """`--nodes 2 --gpus 1` on two one-slot workers finishes; world size 2; the record names both."""
    env = mn_env(job_env)
    start_worker(spawn, env, "node-a")
    start_worker(spawn, env, "node-b")
    wait_workers(redis_conn, 2)
    res = run_cli(["worker", "submit", str(DIGITS), "--nodes", "2", "--gpus", "1",
                   *[a for s in ["train.epochs=1", *FAST] for a in ("--set", s)]], env)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.split()[-1]
    seen: set[tuple[str, int]] = set()

    def store_listening() -> bool:  # node 0's rendezvous store, while the job runs
        seen.update(listening_sockets(test_token))
        rdzv = api.job_status(redis_conn, job_id).get("rendezvous") or {}
        return bool(rdzv) and ("127.0.0.1", int(rdzv["port"])) in seen
    wait_for(store_listening, 120, "node 0's rendezvous store to listen",
             explain=explain_job(redis_conn, job_id, spawn))

    def ended() -> bool:
        seen.update(listening_sockets(test_token))
        return finished(redis_conn, job_id)
    wait_for(ended, 180, "the 2-node job", explain=explain_job(redis_conn, job_id, spawn))
    assert not {s for s in seen if s[0] not in ("127.0.0.1", "::1")}, f"listening beyond WORKER_ADDR: {seen}"
    st = api.job_status(redis_conn, job_id)
    assert st["state"] == "finished", explain_job(redis_conn, job_id, spawn)()
    report = json.loads(api.read_artifact(job_id, "report"))
    assert report["world_size"] == 2 and st["world_size"] == "2"
    assert sorted(st["gang"]) == ["node-a", "node-b"]
    wait_for(lambda: [(n["node_rank"], n["state"]) for n in api.job_status(redis_conn, job_id)["nodes"]]
             == [(0, "finished"), (1, "finished")], 30, "node 1 to record its end (node 0 records the job's)",
             explain=lambda: f"nodes: {api.job_status(redis_conn, job_id)['nodes']}\n"
                             + explain_job(redis_conn, job_id, spawn)())
    assert {n["worker"] for n in api.job_status(redis_conn, job_id)["nodes"]} == {"node-a", "node-b"}
    lines = [e["line"] for e in api.logs_tail(redis_conn, job_id, 2000)]
    assert any(line.startswith("[node 0] ") for line in lines) and any(line.startswith("[node 1] ") for line in lines)
    assert any("--nnodes=2" in line or "rendezvous at 127.0.0.1:" in line for line in lines)
    status_json = json.loads(run_cli(["worker", "status", job_id, "--json"], env).stdout)
    assert len(status_json["nodes"]) == 2
    assert rank_processes(test_token) == []


def listening_sockets(token: str) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket a process of this test listens on (workers, torchrun, ranks)."""
    out = set()
    for proc in processes_with_token(token):
        try:
            out |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return out


def _node_worker(spawn: Any, name: str) -> subprocess.Popen[bytes]:
    return next(p for p in spawn.procs if p.args[-1] == name)


def _step_in_epoch(conn: Any, job_id: str, epoch: int) -> bool:
    return any(e["type"] == "step" and e["data"].get("epoch") == epoch for e in api.events_since(conn, job_id, "0"))


def test_lost_node_requeues_the_gang_which_resumes_on_a_new_one(redis_conn: Any, job_env: dict[str, str],
                                                                 spawn: Any, test_token: str) -> None:
    """SIGKILL of node 0's whole tree (its worker, guard, torchrun, rank) mid-epoch: the other node
    stops within 60 s, the job is re-queued as a whole and finishes on a new gang (the survivor and a third worker),
    resuming from its checkpoint; every epoch appears once."""
    env = mn_env(job_env)
    for name in ("node-a", "node-b"):
        start_worker(spawn, env, name)
    wait_workers(redis_conn, 2)
    job_id = submit_job(DIGITS, ["train.epochs=3", "train.batch_size=8", *FAST], connection=redis_conn,
                        allow_local_paths=True, nodes=2).job_id
    explain = explain_job(redis_conn, job_id, spawn)
    wait_for(lambda: _step_in_epoch(redis_conn, job_id, 2), 180, "a step of epoch 2", explain=explain)
    st = api.job_status(redis_conn, job_id)
    victim, survivor = st["gang"][0], st["gang"][1]
    tree = process_tree(_node_worker(spawn, victim).pid)
    survivors = [p for p in rank_processes(test_token) if p.pid not in {t.pid for t in tree}]
    assert survivors, "the surviving node runs no training process"
    for proc in tree:  # the machine of node 0 is lost: its worker, guard, torchrun and rank at once
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    killed_at = time.monotonic()
    start_worker(spawn, env, "node-c")
    left = psutil.wait_procs(survivors, timeout=60)[1]
    assert left == [], f"the surviving node's training processes still run 60 s after the loss: {left}"
    assert time.monotonic() - killed_at < 60
    wait_for(lambda: finished(redis_conn, job_id), 240, "the job to finish on a new gang", explain=explain)
    st = api.job_status(redis_conn, job_id)
    assert st["state"] == "finished", explain()
    assert st["recoveries"] == 1 and st["resumed_from"] is not None and sorted(st["gang"]) == sorted(
        [survivor, "node-c"]), st
    assert [e["epoch"] for e in api.epoch_events(redis_conn, job_id)] == [1, 2, 3]
    lines = [e["line"] for e in api.logs_tail(redis_conn, job_id, 5000)]
    assert any("re-queued as attempt 1" in line for line in lines), lines[-40:]
    assert rank_processes(test_token) == []


@pytest.mark.slow
def test_two_gangs_and_a_single_node_job_on_two_workers(redis_conn: Any, job_env: dict[str, str],
                                                       spawn: Any) -> None:
    """Two 2-node jobs on two workers run one after the other (no deadlock); a 1-node job submitted
    meanwhile also finishes. Slow (three jobs in a row, ~1 min); the order rule itself is tested above without
    processes. Run it with  python -m pytest -m slow tests/test_multinode.py"""
    env = mn_env(job_env)
    for name in ("node-a", "node-b"):
        start_worker(spawn, env, name)
    wait_workers(redis_conn, 2)
    args = ["train.epochs=1", *FAST]
    first = submit_job(DIGITS, args, connection=redis_conn, allow_local_paths=True, nodes=2).job_id
    second = submit_job(DIGITS, args, connection=redis_conn, allow_local_paths=True, nodes=2).job_id
    single = submit_job(DIGITS, args, connection=redis_conn, allow_local_paths=True).job_id
    for job_id in (first, second, single):
        wait_for(lambda j=job_id: finished(redis_conn, j), 240, f"job {job_id}",
                 explain=explain_job(redis_conn, job_id, spawn))
    sts = {j: api.job_status(redis_conn, j) for j in (first, second, single)}
    assert all(st["state"] == "finished" for st in sts.values()), sts
    assert sts[first]["ended_at"] <= sts[second]["started_at"] + 1.0  # one after the other, the earlier first
    assert sorted(sts[second]["gang"]) == ["node-a", "node-b"]
    assert gang.reservations(redis_conn) == {}


def test_cancel_stops_every_rank_on_every_node(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                               test_token: str) -> None:
    """Cancel a running 2-node job: no training process left on either node within 10 s."""
    env = mn_env(job_env)
    for name in ("node-a", "node-b"):
        start_worker(spawn, env, name)
    wait_workers(redis_conn, 2)
    job_id = submit_job(DIGITS, ["train.epochs=20", *FAST], connection=redis_conn, allow_local_paths=True,
                        nodes=2).job_id
    explain = explain_job(redis_conn, job_id, spawn)
    wait_for(lambda: _step_in_epoch(redis_conn, job_id, 1), 180, "training on both nodes", explain=explain)
    assert len(rank_processes(test_token)) >= 4  # torchrun + one rank on each node
    asked = time.monotonic()
    assert api.cancel_job(redis_conn, job_id, wait=10) == "cancelled", explain()
    left = psutil.wait_procs(rank_processes(test_token), timeout=max(0.0, 10 - (time.monotonic() - asked)))[1]
    assert left == [] and time.monotonic() - asked <= 10.5, left
    assert api.job_status(redis_conn, job_id)["state"] == "cancelled"
    wait_for(lambda: {n["state"] for n in api.job_status(redis_conn, job_id)["nodes"]} == {"cancelled"}, 10,
             "both nodes to record the cancel", explain=explain)


# ==================================================================================================== dashboard
def test_dashboard_nodes_field_waiting_gang_nodes_table_and_reservations(redis_conn: Any, job_env: dict[str, str],
                                                                         tmp_path: Path, monkeypatch: Any) -> None:
    """New job: a Nodes field (refused at the field when too few workers could host it); Job page: what the gang
    waits for and its nodes; Workers page: which worker is reserved for which job."""
    from tests.fixtures_app import open_page, texts
    from tests.test_app import buttons, widget

    monkeypatch.setenv("DATA_CACHE_DIR", str(tmp_path / "data-cache"))
    fake_worker(redis_conn, "w-a")
    fake_worker(redis_conn, "w-b")
    at = open_page("new")
    widget(at, "number_input", "Nodes").set_value(3)
    buttons(at)["Submit job"].click().run()
    assert not at.exception and api.list_jobs(redis_conn) == []
    assert any(e.value.startswith("nodes: 3 nodes") for e in at.error), [e.value for e in at.error]
    widget(at, "number_input", "Nodes").set_value(2)
    buttons(at)["Submit job"].click().run()
    assert not at.exception, [e.value for e in at.exception]
    job_id = api.list_jobs(redis_conn)[0]["id"]
    assert api.job_status(redis_conn, job_id)["num_nodes"] == 2

    assert gang.try_reserve(redis_conn, "w-a", 1) == job_id
    advertise(redis_conn, "w-a", {"name": "w-a", "kind": "cpu", "slots": 1, "state": "reserved",
                                  "reserved_for": job_id, "addr": "10.0.0.5"}, 30)
    at = open_page("job", {"job": job_id})
    assert not at.exception and "1 of 2 workers reserved" in texts(at) and "2 nodes × 1 CPU rank" in texts(at)
    nodes = at.dataframe[0].value
    assert list(nodes["worker"]) == ["w-a"] and list(nodes["state"]) == ["reserved"]
    at = open_page("workers")
    rows = at.dataframe[0].value.set_index("name")
    assert rows.loc["w-a", "reserved for"] == job_id and rows.loc["w-a", "address"] == "10.0.0.5"
    assert rows.loc["w-b", "reserved for"] == ""

    assert gang.try_reserve(redis_conn, "w-b", 1) == job_id  # the gang is complete: running, nodes 0 and 1
    at = open_page("job", {"job": job_id})
    nodes = at.dataframe[0].value
    assert not at.exception and list(nodes["node"]) == ["0", "1"] and list(nodes["worker"]) == ["w-a", "w-b"]


def test_bound_static_rendezvous_listens_on_the_rendezvous_address_only() -> None:
    """worker/torchrun.py's `bound-static` is torchrun's static rendezvous whose store listens on its address only
    (torch's own listens on `::`); this pins the shape of the torch class it builds on (`_store`, the fields, the
    creator's parsing) so a torch upgrade that changes it fails here, not in a 2-node job."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from worker.multinode import free_port
    from worker.torchrun import BOUND_STATIC, create_bound_handler

    port = free_port("127.0.0.1")
    params = RendezvousParameters(BOUND_STATIC, f"127.0.0.1:{port}", "run-1", 1, 1, rank="0", timeout="30")
    handler = create_bound_handler(params)
    assert (handler.get_backend(), handler.rank, handler.world_size, handler.master_port) == (BOUND_STATIC, 0, 1, port)
    info = handler.next_rendezvous()
    info.store.set("k", "v")
    assert info.store.get("k") == b"v" and (info.rank, info.world_size) == (0, 1)
    mine = {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}
    assert ("127.0.0.1", port) in mine and not {a for a, p in mine if p == port} - {"127.0.0.1"}

    # one machine, several ranks (worker/launcher.py): port 0, the kernel's pick is what the ranks are told
    local = create_bound_handler(RendezvousParameters(BOUND_STATIC, "127.0.0.1:0", "local", 1, 1, rank="0"))
    picked = local.next_rendezvous().bootstrap_store_info.master_port
    mine = {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}
    assert picked > 0 and ("127.0.0.1", picked) in mine and not {a for a, p in mine if p == picked} - {"127.0.0.1"}
