"""A 2-node job across two "hosts": two Linux network namespaces joined by a veth pair.

Namespace A holds Redis (bound to A's veth address) and one worker, namespace B the other worker; both reach Redis
over the veth link, node 0 publishes its veth address for the rendezvous and the ranks talk over the veth pair, never
127.0.0.1. Addresses exist only inside the namespaces this test creates, so no traffic leaves them (or loopback).
The namespaces, the link and every process are removed at the end, passed or failed.

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2: skipped with the reason elsewhere, a failure in CI (CI=true).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.fixtures_worker import DIGITS, wait_for
from tests.test_worker_jobs import rank_processes

FAST = ["train.epochs=1", "export.enabled=false", "train.log_every=2", "data.image_size=8"]
ADDR_A, ADDR_B = "10.250.0.1", "10.250.0.2"
"""The veth addresses (a /24 that exists only inside the two test namespaces)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _unavailable(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"network namespaces are required in CI: {why}")
    pytest.skip(f"network namespaces are not permitted here: {why}")


@pytest.fixture
def two_hosts(spawn: Any) -> Iterator[tuple[str, str]]:
    """(namespace A, namespace B), joined by veth-a (ADDR_A) ↔ veth-b (ADDR_B), each with loopback up."""
    if shutil.which("ip") is None:
        _unavailable("the `ip` command (iproute2) is missing")
    tag = secrets.token_hex(4)
    ns_a, ns_b = f"trn-{tag}-a", f"trn-{tag}-b"
    made: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            res = _ip("netns", "add", ns, check=False)
            if res.returncode != 0:
                _unavailable(f"`ip netns add` failed: {res.stderr.strip()}")
            made.append(ns)
        _ip("-n", ns_a, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b", "netns", ns_b)
        for ns, dev, addr in ((ns_a, "veth-a", ADDR_A), (ns_b, "veth-b", ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b
    finally:
        spawn.cleanup()  # every process inside first, then the namespaces (their veth pair goes with them)
        for ns in made:
            _ip("netns", "del", ns, check=False)
        assert not {ns_a, ns_b} & set(_ip("netns", "list").stdout.split()), "a test namespace was left behind"


def _in(ns: str, module_args: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", *module_args]


def _cli(ns: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_in(ns, args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def _listening(ns: str) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening in namespace `ns` (psutil reads only its own namespace's
    tables, so this reads the kernel's, from inside `ns`)."""
    import ipaddress

    res = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/tcp", "/proc/net/tcp6"], capture_output=True,
                         text=True, timeout=30, check=True)
    out = set()
    for line in res.stdout.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A":  # 0A: LISTEN (the header line has "st" there)
            continue
        addr_hex, port_hex = fields[1].split(":")
        raw = bytes.fromhex(addr_hex)
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # the kernel prints 32-bit words host-order
        out.add((str(ipaddress.ip_address(raw)), int(port_hex, 16)))
    return out


def _rx_bytes(ns: str, dev: str) -> int:
    stats = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", dev).stdout)
    return int(stats[0]["stats64"]["rx"]["bytes"])


def test_two_node_job_across_two_network_namespaces(two_hosts: tuple[str, str], job_env: dict[str, str],
                                                    spawn: Any, tmp_path: Path, test_token: str) -> None:
    from worker.server import server_binary, write_config

    ns_a, ns_b = two_hosts
    password = "t-" + secrets.token_urlsafe(12)
    conf = write_config(tmp_path / "redis-a", 6390, password, bind=ADDR_A)
    spawn(["ip", "netns", "exec", ns_a, server_binary(), str(conf)], job_env, name="redis-a")
    url = f"redis://:{password}@{ADDR_A}:6390/0"
    env = {**job_env, "REDIS_URL": url}
    for k in ("WORKER_ADDR", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.pop(k, None)
    # node A: --advertise-addr (its interface is found from the address); node B: WORKER_ADDR and an explicit
    # GLOO_SOCKET_IFNAME, passed through to its ranks
    spawn(_in(ns_a, ["worker", "run", "--cpu", "--slots", "1", "--no-prewarm", "--name", "host-a", "--wait", "30",
                     "--advertise-addr", ADDR_A]), env, name="worker-a")
    spawn(_in(ns_b, ["worker", "run", "--cpu", "--slots", "1", "--no-prewarm", "--name", "host-b", "--wait", "30"]),
          {**env, "WORKER_ADDR": ADDR_B, "GLOO_SOCKET_IFNAME": "veth-b"}, name="worker-b")

    def workers() -> list[dict[str, Any]]:
        res = _cli(ns_b, ["worker", "workers", "--json"], env)
        return json.loads(res.stdout) if res.returncode == 0 else []

    def explain() -> str:
        return "\n".join(f"--- {p.args}\n{spawn.output(p)[-3000:]}" for p in spawn.procs)

    live = wait_for(lambda: len(workers()) == 2 and workers(), 90, "both workers, through the veth link",
                    interval=1.0, explain=explain)
    assert {w["addr"] for w in live} == {ADDR_A, ADDR_B}
    rx_before = _rx_bytes(ns_b, "veth-b")

    res = _cli(ns_b, ["worker", "submit", str(DIGITS), "--nodes", "2", *[a for s in FAST for a in ("--set", s)]],
               env)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.split()[-1]

    def status() -> dict[str, Any]:
        out = _cli(ns_a, ["worker", "status", job_id, "--json"], env)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    seen: set[tuple[str, int]] = set()  # every listening socket in either namespace (Redis, the job's processes)

    def ended() -> dict[str, Any] | None:
        seen.update(_listening(ns_a) | _listening(ns_b))
        return (s := status()).get("final") and s

    st = wait_for(ended, 240, "the job to end", interval=2.0,
                  explain=lambda: explain() + "\n" + _cli(ns_a, ["worker", "logs", job_id], env).stdout[-4000:])
    rdzv = st["rendezvous"]
    assert (rdzv["addr"], rdzv["port"]) in seen, seen  # node 0's store, seen while it ran ...
    wildcard = {s for s in seen if s[0] in ("0.0.0.0", "::")}
    assert not wildcard, f"listening on every interface: {wildcard}"  # ... on its veth address only
    assert st["state"] == "finished", st.get("error")
    assert st["world_size"] == "2" and sorted(st["gang"]) == ["host-a", "host-b"]
    assert st["rendezvous"]["addr"] in (ADDR_A, ADDR_B) and st["rendezvous"]["addr"] != "127.0.0.1"
    assert {n["addr"] for n in st["nodes"]} == {ADDR_A, ADDR_B}
    logs = _cli(ns_a, ["worker", "logs", job_id, "-n", "2000"], env).stdout
    assert f"--master-addr={st['rendezvous']['addr']}" in logs or f"rendezvous at {st['rendezvous']['addr']}" in logs
    # the gradients of every step crossed the veth pair (far more than Redis' few kilobytes)
    assert _rx_bytes(ns_b, "veth-b") - rx_before > 200_000
    wait_for(lambda: rank_processes(test_token) == [], 10, "no training process left")
