"""A worker's side of the managed deployments (worker/deployments.py): the inference servers it hosts.

`Host.tend` runs every TEND_INTERVAL in the worker's deployment thread. It looks at the live deployments (and at its
own servers, so a stopped deployment's end here): a replica with no live host is claimed (a transaction, so two
workers never both take it) when this worker has a free serving slot and, for a replica asking for G GPUs (`deploy
--gpus G`), G of its GPUs used neither by its training job nor by its other replicas (worker/devices.py: the
replicas take the last free ones, a job the first ones, and the worker takes no job its replicas leave too few GPUs
for); its server started as a child process
(`python -m worker serve REF --deployment ID`), watched until it answers ready, restarted when it exits, failed after
MAX_RESTARTS exits in a row, and ended when the deployment is stopped or the worker leaves.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import redis

from worker import keys
from worker.defaults import REPO_ROOT
from worker.deployments import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    Deployment,
    follow_record_ttl,
    hosts,
    load,
    set_error,
    settle,
)
from worker.devices import DeviceLedger
from worker.errors import ModelError
from worker.hashcodec import decode_reply
from worker.models import resolve
from worker.multinode import free_port
from worker.paths import var_dir
from worker.presence import is_alive
from worker.procutil import own_session_preexec
from worker.serving.tokens import TOKEN_ENV

log = logging.getLogger(__name__)

MAX_RESTARTS = 3
"""A replica's server may exit this many times in a row before the replica is failed."""

READY_TIMEOUT = 120.0
"""Seconds a starting server may take to answer /v2/health/ready before it counts as failed."""

SERVE_SLOTS_ENV = "WORKER_SERVE_SLOTS"
"""Environment variable: how many deployment replicas one worker hosts at most (default SERVE_SLOTS)."""

SERVE_SLOTS = 1
"""Replicas a worker hosts by default (beside its training job: a server is one process with its own thread)."""

TEND_INTERVAL = 1.0
"""Seconds between a worker's looks at the deployments (claims, restarts, readiness, undeploys)."""


SERVE_ADDR_ENV = "DEPLOY_ADDR"
"""Environment variable: the address a worker's deployment servers listen on. Unset: 127.0.0.1 (this machine only);
`advertised`: the worker's advertised address (WORKER_ADDR), for clients on other machines; or an address."""


def serve_address(advertised: str) -> str:
    raw = os.environ.get(SERVE_ADDR_ENV, "").strip()
    if raw == "advertised":
        return advertised or "127.0.0.1"
    return raw or "127.0.0.1"


@dataclasses.dataclass
class _Server:
    proc: subprocess.Popen[bytes]
    url: str
    started: float
    log: Path
    gpus: list[int] = dataclasses.field(default_factory=list)
    """The GPUs it was given (CUDA_VISIBLE_DEVICES)."""
    ready: bool = False


class Host:
    """One worker's side of the deployments: the servers it runs (`tend` is called from its housekeeping)."""

    def __init__(self, conn: redis.Redis, worker: str, addr: str, *, ledger: DeviceLedger | None = None) -> None:
        """`ledger`: the worker's GPUs and who holds them, shared with its running job (None: a CPU worker)."""
        self.conn, self.worker, self.addr = conn, worker, addr
        self.ledger = ledger or DeviceLedger(None)
        self.servers: dict[tuple[str, int], _Server] = {}
        self.failures: dict[tuple[str, int], int] = {}
        self.slots = int(os.environ.get(SERVE_SLOTS_ENV, "").strip() or SERVE_SLOTS)
        self._adopt_legacy()

    def _adopt_legacy(self) -> None:
        """Live deployments made before the workers' set existed join it (once per worker start; cheap)."""
        for dep_id in (decode_reply(i) for i in self.conn.zrange(keys.deployments(), 0, -1)):
            dep = load(self.conn, dep_id)
            if dep is not None and dep.state in (STARTING, READY):
                self.conn.sadd(keys.deployments_active(), dep_id)

    def tend(self) -> None:
        """One look at the live deployments and at this worker's own servers (a stopped deployment's included)."""
        tended = {decode_reply(i) for i in self.conn.smembers(keys.deployments_active())}
        for dep_id in sorted(tended | {d for d, _ in self.servers}):
            dep = load(self.conn, dep_id)
            if dep is None:
                for key in [k for k in self.servers if k[0] == dep_id]:
                    self._end(key)  # its records expired or were removed: nothing to serve
                continue
            for replica in range(dep.replicas):
                self._tend_replica(dep, replica)
            settle(self.conn, dep)

    def _tend_replica(self, dep: Deployment, replica: int) -> None:
        key = (dep.id, replica)
        mine = self.servers.get(key)
        if dep.state == STOPPED:
            if mine:
                self._end(key)
            self.conn.hdel(keys.deployment_hosts(dep.id), str(replica))
            return
        if mine is not None:
            self._watch(dep, replica, mine)
            return
        host = hosts(self.conn, dep.id).get(replica)
        if host and host.get("state") == FAILED and host.get("worker") == self.worker:
            return  # failed here: wait for undeploy
        if host and host.get("worker") and host["worker"] != self.worker and is_alive(self.conn, host["worker"]):
            return
        if len(self.servers) >= self.slots:
            return
        devices = self.ledger.take(key, dep.gpus)  # free of the running job and of the other replicas
        if devices is None:
            return  # `deployments` says why it waits (worker/deployments.py `waiting_reason`)
        if self._claim(dep, replica, host):
            self._start(dep, replica, devices)
        else:
            self.ledger.give_back(key)

    def _claim(self, dep: Deployment, replica: int, seen: dict[str, Any] | None) -> bool:
        """Take the replica if its record is still what we saw (two workers never both take it)."""
        field, hkey = str(replica), keys.deployment_hosts(dep.id)
        with self.conn.pipeline() as pipe:
            try:
                pipe.watch(hkey)
                now = pipe.hget(hkey, field)
                if (json.loads(decode_reply(now)) if now else None) != seen:
                    return False
                pipe.multi()
                pipe.hset(hkey, field, json.dumps({"worker": self.worker, "state": STARTING, "url": "",
                                                   "since": time.time()}))
                pipe.execute()
            except redis.exceptions.WatchError:
                return False
        follow_record_ttl(self.conn, dep.id)
        return True

    def _start(self, dep: Deployment, replica: int, gpus: list[int]) -> None:
        port = free_port(self.addr)
        cmd = [sys.executable, "-m", "worker", "serve", dep.ref, "--host", self.addr, "--port", str(port),
               "--max-batch", str(dep.max_batch), "--max-delay-ms", str(dep.max_delay_ms), "--deployment", dep.id]
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}  # the deployment's tokens, not the worker's
        if gpus:
            cmd.append("--gpu")  # ONNX Runtime's TensorRT and CUDA providers where present (worker/serving/model.py)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        log_path = var_dir() / "deployments" / f"{dep.id}-{replica}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=own_session_preexec)  # noqa: PLW1509 - a fresh child, no threads
        self.servers[(dep.id, replica)] = _Server(proc, f"http://{self.addr}:{port}", time.time(), log_path, gpus)
        log.info("worker %s: starting deployment %s replica %d (%s) at %s", self.worker, dep.id, replica, dep.ref,
                 self.servers[(dep.id, replica)].url)

    def _record(self, dep: Deployment, replica: int, **fields: Any) -> None:
        hkey, field = keys.deployment_hosts(dep.id), str(replica)
        now = self.conn.hget(hkey, field)
        record = json.loads(decode_reply(now)) if now else {"worker": self.worker}
        if record.get("worker") != self.worker:
            return  # another worker took it over (we were thought dead): leave its record alone
        if all(record.get(k) == v for k, v in fields.items()):
            return
        self.conn.hset(hkey, field, json.dumps({**record, **fields, "since": time.time()}))
        follow_record_ttl(self.conn, dep.id)

    def _watch(self, dep: Deployment, replica: int, server: _Server) -> None:
        key = (dep.id, replica)
        if server.proc.poll() is not None:
            err = server.log.read_text(errors="replace")[-500:] if server.log.is_file() else ""
            del self.servers[key]
            self.failures[key] = self.failures.get(key, 0) + 1
            if self.failures[key] >= MAX_RESTARTS:
                dep.error = f"replica {replica} exited {self.failures[key]} times: {err.strip()[-300:]}"
                set_error(self.conn, dep.id, dep.error)
                self._record(dep, replica, state=FAILED, url="", error=dep.error)
            else:
                self._record(dep, replica, state=STARTING, url="", error=err.strip()[-300:])
                self._start(dep, replica, server.gpus)  # the ledger still holds its GPUs for it
                return
            self.ledger.give_back(key)
            return
        if not server.ready:
            if _answers(server.url):
                server.ready = True
                self.failures.pop(key, None)
                self._record(dep, replica, state=READY, url=server.url, pid=server.proc.pid,
                             version_ref=_served_ref(self.conn, dep.ref))
            elif time.time() - server.started > READY_TIMEOUT:
                self._end(key)
                self._record(dep, replica, state=FAILED, url="", error="not ready in time")
            return
        ref = _served_ref(self.conn, dep.ref)
        if ref:
            self._record(dep, replica, state=READY, url=server.url, pid=server.proc.pid, version_ref=ref)

    def _end(self, key: tuple[str, int]) -> None:
        server = self.servers.pop(key, None)
        self.ledger.give_back(key)
        if server is None:
            return
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()

    def close(self) -> None:
        """The worker is leaving: end its servers (another worker takes the replicas over)."""
        for key in list(self.servers):
            self._end(key)

    def loop(self, halt: threading.Event, interval: float = TEND_INTERVAL) -> None:
        """`tend` until `halt` is set, then end the servers (the worker's deployment thread)."""
        while not halt.wait(interval):
            try:
                self.tend()
            except Exception as err:  # noqa: BLE001 - Redis away, a bad record: keep serving, try again
                log.warning("worker %s: deployments: %s: %s", self.worker, type(err).__name__, err)
        self.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _served_ref(conn: redis.Redis, ref: str) -> str:
    try:
        return resolve(conn, ref).ref
    except ModelError:
        return ""
