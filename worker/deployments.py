"""Managed deployments: a registered model served by `python -m worker serve` children of the workers.

`create` records a deployment (its model reference, replicas, batching, a bearer token) and returns at once; the
workers do the rest (worker/deploy_host.py `Host.tend`, every second): a worker with room claims a replica that
has no live host, starts the server as a child process on its advertised address and a free port, and publishes the
replica's URL once the server answers ready. A replica whose worker died (its advertisement expired) is claimed by
another worker; a server that exits is restarted, and after MAX_RESTARTS failures in a row the replica is failed and
`deployment.failed` is announced. `stop` (undeploy) marks the deployment stopped; its hosts end their servers. A
deployment on `NAME@ALIAS` follows the alias (the server reloads without failing a request: worker/serving/server.py).

Only live deployments are tended: a stopped one leaves the workers' set at once, a failed one after FAILED_GRACE
seconds (time to read its error, and for a replica to recover on another worker), and either's records expire
RETENTION seconds later (`deployments` shows them until then).

Tokens: Redis keeps the SHA-256 of the users' bearer token (shown once by `deploy` and `deploy-token --rotate`) and an
internal token of the dashboard's (Try it), in a key of their own; the servers read them live
(worker/serving/tokens.py), so a rotation or revocation needs no restart.

States (of a deployment and of each replica): starting, ready, failed, stopped. A deployment is ready when one of its
replicas is, failed when all are, stopped once undeployed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import redis

from worker import audit, keys, notify, users
from worker.defaults import MAX_GPUS_PER_JOB
from worker.errors import ModelError
from worker.hashcodec import decode_reply
from worker.models import resolve
from worker.presence import list_workers
from worker.serving.tokens import digest

STARTING, READY, FAILED, STOPPED = "starting", "ready", "failed", "stopped"
STATES = (STARTING, READY, FAILED, STOPPED)

RETENTION_ENV = "DEPLOYMENT_RETENTION_S"
"""Environment variable: seconds a stopped (or retired failed) deployment's records are kept (default RETENTION)."""

RETENTION = 3 * 24 * 3600.0
"""Seconds `deployments` still shows a stopped deployment (its records then expire)."""

FAILED_GRACE_ENV = "DEPLOYMENT_FAILED_GRACE_S"
"""Environment variable: seconds a failed deployment stays tended before it is retired (default FAILED_GRACE)."""

FAILED_GRACE = 600.0
"""Seconds a failed deployment is still tended (a replica may recover on another worker) before it is retired."""


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "").strip()
    return float(raw) if raw else default


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
    state: str
    created_at: float
    error: str = ""
    owner: str = users.OPERATOR
    """Who deployed it (deployments made before users: the operator)."""
    ended_at: float = 0.0
    """When it stopped or failed (0: it has not)."""

    def public(self, hosts: dict[int, dict[str, Any]], waiting: str = "") -> dict[str, Any]:
        """What `deployments --json` prints, with each replica's worker and URL (no token: Redis has none to show)
        and, while a replica has no host, why (`waiting`)."""
        urls = [h["url"] for _, h in sorted(hosts.items()) if h.get("url")]
        return {**dataclasses.asdict(self), "waiting": waiting,
                "url": urls[0] if urls else "", "worker": next((h["worker"] for h in hosts.values()), ""),
                "replica_hosts": [{"replica": i, **h} for i, h in sorted(hosts.items())]}


def _decode(conn: redis.Redis, raw: bytes | str) -> Deployment:
    fields = json.loads(decode_reply(raw))
    legacy = fields.pop("token", None)  # a record from before hashed tokens: keep its token working, hashed
    if legacy and not conn.exists(keys.deployment_tokens(fields["id"])):
        conn.hset(keys.deployment_tokens(fields["id"]), mapping={"user": digest(legacy), "internal": legacy})
    return Deployment(**fields)


def load(conn: redis.Redis, dep_id: str) -> Deployment | None:
    raw = conn.get(keys.deployment(dep_id))
    return _decode(conn, raw) if raw else None


def _update(conn: redis.Redis, dep_id: str, change: Callable[[Deployment], bool]) -> Deployment | None:
    """Apply `change` to the stored record (it returns whether it changed anything) as one transaction, so an
    undeploy and a worker's state change never overwrite each other. None when the record is gone."""
    key = keys.deployment(dep_id)
    while True:
        with conn.pipeline() as pipe:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                if not raw:
                    return None
                dep = _decode(conn, raw)
                if change(dep):
                    pipe.multi()
                    pipe.set(key, json.dumps(dataclasses.asdict(dep)), keepttl=True)
                    pipe.execute()
                return dep
            except redis.exceptions.WatchError:
                continue


def _retire(conn: redis.Redis, dep_id: str) -> None:
    """Out of the workers' set; its records expire after the retention."""
    ttl = max(1, int(_seconds(RETENTION_ENV, RETENTION)))
    with conn.pipeline() as pipe:
        pipe.srem(keys.deployments_active(), dep_id)
        for key in (keys.deployment(dep_id), keys.deployment_hosts(dep_id), keys.deployment_tokens(dep_id)):
            pipe.expire(key, ttl)
        pipe.execute()


def follow_record_ttl(conn: redis.Redis, dep_id: str) -> None:
    """After a write to the deployment's hosts hash: the hash lives as long as the deployment's record. A host that
    wrote just after an undeploy (`_retire` found no hash to give a TTL, or the write made a new one) would otherwise
    leave a hash that never expires; the record already gone, the hash goes too."""
    hkey = keys.deployment_hosts(dep_id)
    left = conn.pttl(keys.deployment(dep_id))
    if left == -2:  # no record
        conn.delete(hkey)
    elif left > 0 and conn.pttl(hkey) < 0:
        conn.pexpire(hkey, left)


def set_error(conn: redis.Redis, dep_id: str, error: str) -> None:
    """Record why the deployment's replicas fail (shown by `deployments`)."""
    def changed(dep: Deployment) -> bool:
        before, dep.error = dep.error, error
        return before != error
    _update(conn, dep_id, changed)


def hosts(conn: redis.Redis, dep_id: str) -> dict[int, dict[str, Any]]:
    return {int(k): json.loads(decode_reply(v)) for k, v in conn.hgetall(keys.deployment_hosts(dep_id)).items()}


def get(conn: redis.Redis, dep_id: str) -> Deployment:
    dep = load(conn, dep_id)
    if dep is None:
        known = ", ".join(decode_reply(i) for i in conn.zrange(keys.deployments(), 0, -1)) or "none"
        raise DeploymentError(f"no deployment {dep_id!r} (deployments: {known})")
    return dep


def listing(conn: redis.Redis, owner: str | None = None) -> list[dict[str, Any]]:
    """Every deployment whose records have not expired (only `owner`'s if given), oldest first (expired ones leave the
    index here)."""
    out, workers = [], None
    for dep_id in (decode_reply(i) for i in conn.zrange(keys.deployments(), 0, -1)):
        dep = load(conn, dep_id)
        if dep is None:
            conn.zrem(keys.deployments(), dep_id)
            continue
        if owner is not None and dep.owner != owner:
            continue
        placed = hosts(conn, dep_id)
        unplaced = dep.state == STARTING and sum(1 for h in placed.values() if h.get("worker")) < dep.replicas
        if unplaced and workers is None:
            workers = list_workers(conn)
        out.append(dep.public(placed, waiting_reason(dep, workers or []) if unplaced else ""))
    return out


def waiting_reason(dep: Deployment, workers: list[dict[str, Any]]) -> str:
    """Why a replica of `dep` has no host yet, from the live workers' advertisements."""
    if not workers:
        return "no worker is running (python -m worker run)"
    if dep.gpus:
        have = ", ".join(f"{w['name']}: {len(w.get('gpus') or [])}" for w in workers)
        if not any(len(w.get("gpus") or []) >= dep.gpus for w in workers):
            return f"needs a worker with {dep.gpus} free GPU(s); no live worker has {dep.gpus} GPU(s) (GPUs: {have})"
        return (f"needs {dep.gpus} GPU(s) on one worker free of its training job and other replicas; none is free "
                f"now (GPUs: {have})")
    return f"needs a worker with a free serving slot ({len(workers)} worker(s) alive; WORKER_SERVE_SLOTS per worker)"


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
           max_delay_ms: float = 0.0, actor: users.Actor | None = None) -> tuple[Deployment, str]:
    """(the deployment, its bearer token): the token is not kept anywhere, so show it to the user now."""
    actor = audit.authorize(conn, actor, users.Action.SUBMIT, "deploy models")  # the deployment's owner
    resolve(conn, ref)  # refuses an unknown model, version or alias now, not on a worker
    if not 1 <= replicas <= 16:
        raise DeploymentError(f"replicas: must be 1 to 16, got {replicas}")
    if not 0 <= gpus <= MAX_GPUS_PER_JOB:
        raise DeploymentError(f"gpus: must be 0 to {MAX_GPUS_PER_JOB} per replica, got {gpus}")
    if not 1 <= max_batch <= 1024:
        raise DeploymentError(f"max-batch: must be 1 to 1024, got {max_batch}")
    dep = Deployment(id="d-" + secrets.token_hex(4), ref=ref, replicas=replicas, gpus=gpus,
                     max_batch=max_batch, max_delay_ms=max(0.0, max_delay_ms), state=STARTING,
                     created_at=time.time(), owner=actor.name)
    token = _issue(conn, dep.id)
    with conn.pipeline() as pipe:
        pipe.set(keys.deployment(dep.id), json.dumps(dataclasses.asdict(dep)))
        pipe.zadd(keys.deployments(), {dep.id: dep.created_at})
        pipe.sadd(keys.deployments_active(), dep.id)
        pipe.execute()
    audit.record(conn, actor, audit.AuditAction.DEPLOY, dep.id, ref=ref, replicas=replicas)
    return dep, token


def stop(conn: redis.Redis, dep_id: str, *, actor: users.Actor | None = None) -> Deployment:
    """Undeploy: stopped at once for the hosts (they end their servers within a second); records kept RETENTION."""
    owner = get(conn, dep_id).owner
    actor = audit.authorize(conn, actor, users.Action.MANAGE, f"stop deployment {dep_id}", owner=owner)

    def stopped(dep: Deployment) -> bool:
        if dep.state == STOPPED:
            return False
        dep.state, dep.ended_at = STOPPED, time.time()
        return True
    dep = _update(conn, dep_id, stopped) or get(conn, dep_id)
    _retire(conn, dep_id)
    audit.record(conn, actor, audit.AuditAction.UNDEPLOY, dep_id, owner=owner)
    return dep


# ---------------------------------------------------------------------------------------------------------- tokens
def _issue(conn: redis.Redis, dep_id: str) -> str:
    """New users' and internal tokens (the old ones stop working); the users' token, which only the caller sees."""
    token = secrets.token_urlsafe(24)
    conn.hset(keys.deployment_tokens(dep_id), mapping={"user": digest(token), "internal": secrets.token_urlsafe(24)})
    return token


def rotate_token(conn: redis.Redis, dep_id: str, *, actor: users.Actor | None = None) -> str:
    """`deploy-token ID --rotate`: a new token (returned, shown once); the old one stops working within a second."""
    dep = get(conn, dep_id)
    actor = audit.authorize(conn, actor, users.Action.MANAGE, f"rotate the token of deployment {dep_id}",
                            owner=dep.owner)
    if dep.state == STOPPED:
        raise DeploymentError(f"deployment {dep_id} is stopped; deploy the model again for a new endpoint")
    token = _issue(conn, dep_id)
    audit.record(conn, actor, audit.AuditAction.DEPLOY_TOKEN, dep_id, how="rotate")
    return token


def revoke_token(conn: redis.Redis, dep_id: str, *, actor: users.Actor | None = None) -> None:
    """`deploy-token ID --revoke`: no token works (the dashboard's neither) until the next rotation."""
    dep = get(conn, dep_id)
    actor = audit.authorize(conn, actor, users.Action.MANAGE, f"revoke the tokens of deployment {dep_id}",
                            owner=dep.owner)
    conn.hset(keys.deployment_tokens(dep_id), mapping={"user": "", "internal": ""})
    audit.record(conn, actor, audit.AuditAction.DEPLOY_TOKEN, dep_id, how="revoke")


def accepted_digests(conn: redis.Redis, dep_id: str) -> frozenset[str]:
    """The SHA-256 digests a deployment's servers accept (empty: revoked, or the deployment is gone)."""
    got = {decode_reply(k): decode_reply(v) for k, v in conn.hgetall(keys.deployment_tokens(dep_id)).items()}
    return frozenset(d for d in (got.get("user"), got.get("internal") and digest(got["internal"])) if d)


def _internal_token(conn: redis.Redis, dep_id: str) -> str:
    token = decode_reply(conn.hget(keys.deployment_tokens(dep_id), "internal") or b"")
    if not token:
        raise DeploymentError(f"deployment {dep_id}: its tokens are revoked (python -m worker deploy-token "
                              f"{dep_id} --rotate issues a new one)")
    return token


def settle(conn: redis.Redis, dep: Deployment) -> None:
    """The deployment's state from its replicas' (stopped stays stopped); a failed one is retired after the grace."""
    if dep.state == STOPPED:
        return
    states = [h.get("state") for h in hosts(conn, dep.id).values()]
    new = READY if READY in states else FAILED if states and all(s == FAILED for s in states) and \
        len(states) >= dep.replicas else STARTING

    changed = []

    def settled(d: Deployment) -> bool:
        changed.clear()  # (called again when the transaction is retried)
        if d.state in (STOPPED, new):
            return False
        d.state, d.ended_at = new, time.time() if new == FAILED else 0.0
        changed.append(new)
        return True
    now = _update(conn, dep.id, settled) if new != dep.state else dep  # (a transaction only for a change)
    if now is None:
        return
    if changed == [FAILED]:  # this worker's transaction failed it: announced once
        notify.emit(conn, "deployment.failed", {"id": now.id, "model": now.ref, "state": FAILED,
                                                "error": now.error, "url": notify.dashboard_link("models")})
    if now.state == FAILED and time.time() - now.ended_at > _seconds(FAILED_GRACE_ENV, FAILED_GRACE):
        _retire(conn, now.id)


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
    token = _internal_token(conn, dep_id)
    name = resolve(conn, dep.ref).name
    boundary = "----" + secrets.token_hex(8)
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{fname}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for fname, data in files)
    body += f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n{top_k}\r\n--{boundary}--\r\n'.encode()
    req = urllib.request.Request(f"{urls[0]}/v2/models/{name}/classify", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise DeploymentError(f"deployment {dep_id}: {json.loads(err.read() or b'{}').get('error', err)}") from None
    except OSError as err:
        raise DeploymentError(f"deployment {dep_id} at {urls[0]}: {err}") from None
