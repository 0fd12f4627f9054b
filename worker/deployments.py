"""Managed deployments: a registered model served by `python -m worker serve` children of the workers.

`create` records a deployment (its model reference, replicas, batching, a bearer token) and returns at once; the
workers do the rest in their housekeeping (`Host.tend`, every heartbeat): a worker with room claims a replica that
has no live host, starts the server as a child process on its advertised address and a free port, and publishes the
replica's URL once the server answers ready. A replica whose worker died (its advertisement expired) is claimed by
another worker; a server that exits is restarted, and after MAX_RESTARTS failures in a row the replica is failed and
`deployment.failed` is announced. `stop` (undeploy) marks the deployment stopped; its hosts end their servers. A
deployment on `NAME@ALIAS` follows the alias (the server reloads without failing a request: worker/serving/server.py).

States (of a deployment and of each replica): starting, ready, failed, stopped. A deployment is ready when one of its
replicas is, failed when all are, stopped once undeployed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
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

from worker import audit, keys, notify, users
from worker.defaults import REPO_ROOT
from worker.errors import ModelError
from worker.hashcodec import decode_reply
from worker.models import resolve
from worker.multinode import free_port
from worker.paths import var_dir
from worker.presence import is_alive
from worker.procutil import own_session_preexec

log = logging.getLogger(__name__)

STARTING, READY, FAILED, STOPPED = "starting", "ready", "failed", "stopped"
STATES = (STARTING, READY, FAILED, STOPPED)

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


class DeploymentError(ModelError):
    """A deployment was refused (no such model version, bad replica count, no such deployment); CLI exit 2."""


@dataclasses.dataclass
class Deployment:
    id: str
    ref: str
    replicas: int
    gpus: int
    max_batch: int
    max_delay_ms: float
    token: str
    state: str
    created_at: float
    error: str = ""
    owner: str = users.OPERATOR
    """Who deployed it (deployments made before users: the operator)."""

    def public(self, hosts: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """What `deployments --json` prints: everything but the token, with each replica's worker and URL."""
        urls = [h["url"] for _, h in sorted(hosts.items()) if h.get("url")]
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "token"},
                "url": urls[0] if urls else "", "worker": next((h["worker"] for h in hosts.values()), ""),
                "replica_hosts": [{"replica": i, **h} for i, h in sorted(hosts.items())]}


def _load(conn: redis.Redis, dep_id: str) -> Deployment | None:
    raw = conn.get(keys.deployment(dep_id))
    return Deployment(**json.loads(decode_reply(raw))) if raw else None


def _save(conn: redis.Redis, dep: Deployment) -> None:
    conn.set(keys.deployment(dep.id), json.dumps(dataclasses.asdict(dep)))


def hosts(conn: redis.Redis, dep_id: str) -> dict[int, dict[str, Any]]:
    return {int(k): json.loads(decode_reply(v)) for k, v in conn.hgetall(keys.deployment_hosts(dep_id)).items()}


def get(conn: redis.Redis, dep_id: str) -> Deployment:
    dep = _load(conn, dep_id)
    if dep is None:
        known = ", ".join(decode_reply(i) for i in conn.zrange(keys.deployments(), 0, -1)) or "none"
        raise DeploymentError(f"no deployment {dep_id!r} (deployments: {known})")
    return dep


def listing(conn: redis.Redis, owner: str | None = None) -> list[dict[str, Any]]:
    """Every deployment (only `owner`'s if given), oldest first, as `deployments --json` prints them."""
    out = []
    for dep_id in (decode_reply(i) for i in conn.zrange(keys.deployments(), 0, -1)):
        dep = _load(conn, dep_id)
        if dep is not None and (owner is None or dep.owner == owner):
            out.append(dep.public(hosts(conn, dep_id)))
    return out


def in_use(conn: redis.Redis) -> dict[str, str]:
    """Model version ref (`NAME:VERSION`) → id of a live deployment serving it (what `model rm` must refuse)."""
    out = {}
    for d in listing(conn):
        if d["state"] != STOPPED:
            for h in d["replica_hosts"]:
                if h.get("version_ref"):
                    out[h["version_ref"]] = d["id"]
            try:
                out.setdefault(resolve(conn, d["ref"]).ref, d["id"])
            except ModelError:
                pass
    return out


def create(conn: redis.Redis, ref: str, *, replicas: int = 1, gpus: int = 0, max_batch: int = 32,
           max_delay_ms: float = 0.0, actor: users.Actor | None = None) -> Deployment:
    actor = audit.authorize(conn, actor, users.Action.SUBMIT, "deploy models")  # the deployment's owner
    resolve(conn, ref)  # refuses an unknown model, version or alias now, not on a worker
    if not 1 <= replicas <= 16:
        raise DeploymentError(f"replicas: must be 1 to 16, got {replicas}")
    if not 1 <= max_batch <= 1024:
        raise DeploymentError(f"max-batch: must be 1 to 1024, got {max_batch}")
    dep = Deployment(id="d-" + secrets.token_hex(4), ref=ref, replicas=replicas, gpus=max(0, gpus),
                     max_batch=max_batch, max_delay_ms=max(0.0, max_delay_ms), token=secrets.token_urlsafe(24),
                     state=STARTING, created_at=time.time(), owner=actor.name)
    _save(conn, dep)
    conn.zadd(keys.deployments(), {dep.id: dep.created_at})
    audit.record(conn, actor, audit.AuditAction.DEPLOY, dep.id, ref=ref, replicas=replicas)
    return dep


def stop(conn: redis.Redis, dep_id: str, *, actor: users.Actor | None = None) -> Deployment:
    dep = get(conn, dep_id)
    actor = audit.authorize(conn, actor, users.Action.MANAGE, f"stop deployment {dep_id}", owner=dep.owner)
    dep.state = STOPPED
    _save(conn, dep)
    audit.record(conn, actor, audit.AuditAction.UNDEPLOY, dep_id, owner=dep.owner)
    return dep


def _settle(conn: redis.Redis, dep: Deployment) -> None:
    """The deployment's state from its replicas' (stopped stays stopped)."""
    if dep.state == STOPPED:
        return
    states = [h.get("state") for h in hosts(conn, dep.id).values()]
    new = READY if READY in states else FAILED if states and all(s == FAILED for s in states) and \
        len(states) >= dep.replicas else STARTING
    if new != dep.state:
        dep.state = new
        _save(conn, dep)
        if new == FAILED:
            notify.emit(conn, "deployment.failed", {"id": dep.id, "model": dep.ref, "state": FAILED,
                                                    "error": dep.error, "url": notify.dashboard_link("models")})


@dataclasses.dataclass
class _Server:
    proc: subprocess.Popen[bytes]
    url: str
    started: float
    log: Path
    ready: bool = False


class Host:
    """One worker's side of the deployments: the servers it runs (`tend` is called from its housekeeping)."""

    def __init__(self, conn: redis.Redis, worker: str, addr: str) -> None:
        self.conn, self.worker, self.addr = conn, worker, addr
        self.servers: dict[tuple[str, int], _Server] = {}
        self.failures: dict[tuple[str, int], int] = {}
        self.slots = int(os.environ.get(SERVE_SLOTS_ENV, "").strip() or SERVE_SLOTS)

    def tend(self) -> None:
        for dep_id in (decode_reply(i) for i in self.conn.zrange(keys.deployments(), 0, -1)):
            dep = _load(self.conn, dep_id)
            if dep is None:
                continue
            for replica in range(dep.replicas):
                self._tend_replica(dep, replica)
            _settle(self.conn, dep)

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
        if self._claim(dep, replica, host):
            self._start(dep, replica)

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
                return True
            except redis.exceptions.WatchError:
                return False

    def _start(self, dep: Deployment, replica: int) -> None:
        port = free_port(self.addr)
        cmd = [sys.executable, "-m", "worker", "serve", dep.ref, "--host", self.addr, "--port", str(port),
               "--max-batch", str(dep.max_batch), "--max-delay-ms", str(dep.max_delay_ms)]
        if dep.gpus:
            cmd.append("--gpu")
        env = {**os.environ, "SERVE_TOKEN": dep.token}
        log_path = var_dir() / "deployments" / f"{dep.id}-{replica}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=own_session_preexec)  # noqa: PLW1509 - a fresh child, no threads
        self.servers[(dep.id, replica)] = _Server(proc, f"http://{self.addr}:{port}", time.time(), log_path)
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

    def _watch(self, dep: Deployment, replica: int, server: _Server) -> None:
        key = (dep.id, replica)
        if server.proc.poll() is not None:
            err = server.log.read_text(errors="replace")[-500:] if server.log.is_file() else ""
            del self.servers[key]
            self.failures[key] = self.failures.get(key, 0) + 1
            if self.failures[key] >= MAX_RESTARTS:
                dep.error = f"replica {replica} exited {self.failures[key]} times: {err.strip()[-300:]}"
                _save(self.conn, dep)
                self._record(dep, replica, state=FAILED, url="", error=dep.error)
            else:
                self._record(dep, replica, state=STARTING, url="", error=err.strip()[-300:])
                self._start(dep, replica)
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


def ready_for_job(conn: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    """Ready deployments whose served version was registered from `job_id` (what Try it can send that job's images
    to)."""
    out = []
    for d in listing(conn):
        if d["state"] != READY:
            continue
        try:
            if resolve(conn, d["ref"]).job_id == job_id:
                out.append(d)
        except ModelError:
            continue
    return out


def classify(conn: redis.Redis, dep_id: str, files: list[tuple[str, bytes]], top_k: int) -> list[dict[str, Any]]:
    """Send images to a ready replica's classify route (with the deployment's token); its JSON answer."""
    dep = get(conn, dep_id)
    urls = [h["url"] for h in hosts(conn, dep_id).values() if h.get("state") == READY and h.get("url")]
    if not urls:
        raise DeploymentError(f"deployment {dep_id} has no ready replica")
    name = resolve(conn, dep.ref).name
    boundary = "----" + secrets.token_hex(8)
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{fname}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for fname, data in files)
    body += f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n{top_k}\r\n--{boundary}--\r\n'.encode()
    req = urllib.request.Request(f"{urls[0]}/v2/models/{name}/classify", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {dep.token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise DeploymentError(f"deployment {dep_id}: {json.loads(err.read() or b'{}').get('error', err)}") from None
    except OSError as err:
        raise DeploymentError(f"deployment {dep_id} at {urls[0]}: {err}") from None


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
