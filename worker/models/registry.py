"""The model registry: immutable versions of a named model, made from finished jobs, and movable aliases.

A version copies what serving needs out of the job's run folder into the artifact store, under
`models/<name>/<version>/` (the ONNX files, labels.json, preprocess.json, model_card.md, report.json), so deleting
the job later breaks nothing. Its record (JSON in `trainer:model:<name>`) names the job and the dataset version it
came from, the file the export recommends deploying, the test metrics, sizes and latency. Aliases (`production`,
`staging`, any name) point at a version and move; a reference is `NAME` (the latest version), `NAME:VERSION` or
`NAME@ALIAS` (`parse_ref`).
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

import redis

from core import runfolder as runfiles
from worker import audit, keys, notify, users
from worker.artifacts import ArtifactStore
from worker.errors import ArtifactError, ModelError, NoSuchModelError
from worker.hashcodec import decode_reply
from worker.models import mlflow_mirror
from worker.record import JobRecord
from worker.states import JobState

MODELS_PREFIX = "models"
"""Artifact-store folder of registered versions: models/<name>/<version>/<file>."""

VERSION_FILES = (runfiles.ONNX, runfiles.INT8_ONNX, runfiles.LABELS, runfiles.PREPROCESS, runfiles.MODEL_CARD)
"""Files of a job's export/ a version copies (those that exist; model.onnx, labels.json and preprocess.json must)."""

REQUIRED_FILES = (runfiles.ONNX, runfiles.LABELS, runfiles.PREPROCESS)

_REF_RE = re.compile(r"^(?P<name>[^:@]+)(?::(?P<version>\d+)|@(?P<alias>[^:@]+))?\Z")


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """What a user typed: NAME, NAME:VERSION or NAME@ALIAS."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return self.name + (f":{self.version}" if self.version else f"@{self.alias}" if self.alias else "")


def parse_ref(ref: str) -> ModelRef:
    m = _REF_RE.match(str(ref).strip())
    if not m:
        raise ModelError(f"invalid model reference {ref!r}: use NAME, NAME:VERSION or NAME@ALIAS")
    name = keys.check_model_name(m["name"])
    alias = keys.check_model_name(m["alias"], "alias") if m["alias"] else None
    return ModelRef(name, int(m["version"]) if m["version"] else None, alias)


@dataclasses.dataclass
class ModelVersion:
    """One registered version (the JSON in `trainer:model:<name>`)."""

    name: str
    version: int
    job_id: str
    job_name: str
    dataset: str | None
    """`NAME:VERSION` of the registered dataset the job trained on (None for a built-in or an unregistered upload)."""
    dataset_hash: str | None
    deploy: str
    """The file to serve (report.json export.deploy: model.onnx or model.int8.onnx) and why (`deploy_reason`)."""
    deploy_reason: str
    files: dict[str, int]
    """File name → bytes, under models/<name>/<version>/."""
    labels: list[str]
    preprocess: dict[str, Any]
    metrics: dict[str, Any]
    """Test accuracy, macro F1, top-5 when present, the ONNX latency at batch 1 (ms) on the exporting machine."""
    created_at: float
    mlflow: dict[str, Any] | None = None
    """{"name", "version", "uri"} of the mirrored MLflow registry version, when MLflow tracking was on."""
    owner: str = users.OPERATOR
    """Who registered it (versions registered before users: the operator)."""

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def folder(self) -> str:
        return f"{MODELS_PREFIX}/{self.name}/{self.version}"

    def key(self, file: str) -> str:
        return f"{self.folder}/{file}"

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelVersion:
        data = json.loads(decode_reply(raw))
        values = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "owner": values["owner"] or users.OPERATOR})


def _versions(conn: redis.Redis, name: str) -> dict[int, ModelVersion]:
    raw = conn.hgetall(keys.model_versions(name))
    return {int(k): ModelVersion.from_json(v) for k, v in raw.items()}


def list_models(conn: redis.Redis, owner: str | None = None) -> list[str]:
    """Names of every registered model, oldest first; with `owner`, those with a version `owner` registered."""
    names = [decode_reply(n) for n in conn.zrange(keys.models_index(), 0, -1)]
    if owner is None:
        return names
    return [n for n in names if any(v.owner == owner for v in _versions(conn, n).values())]


def model_versions(conn: redis.Redis, name: str) -> list[ModelVersion]:
    return [v for _, v in sorted(_versions(conn, name).items())]


def aliases(conn: redis.Redis, name: str) -> dict[str, int]:
    return {decode_reply(k): int(v) for k, v in conn.hgetall(keys.model_aliases(name)).items()}


def resolve(conn: redis.Redis, ref: str | ModelRef) -> ModelVersion:
    """The version a reference means now; NoSuchModelError naming what exists."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    versions = _versions(conn, ref.name)
    if not versions:
        known = ", ".join(list_models(conn)) or "none yet"
        raise NoSuchModelError(f"no model named {ref.name!r} (registered: {known})")
    if ref.alias:
        table = aliases(conn, ref.name)
        if ref.alias not in table:
            raise NoSuchModelError(f"model {ref.name!r} has no alias {ref.alias!r} (aliases: "
                                   f"{', '.join(f'{a}→{v}' for a, v in sorted(table.items())) or 'none'})")
        number = table[ref.alias]
    else:
        number = ref.version or max(versions)
    if number not in versions:
        raise NoSuchModelError(f"model {ref.name!r} has no version {number} (versions: "
                               f"{', '.join(map(str, sorted(versions)))})")
    return versions[number]


def _read_json(store: ArtifactStore, job_id: str, name: str) -> Any:
    try:
        return json.loads(store.read_bytes(job_id, name))
    except ArtifactError:
        raise ModelError(f"job {job_id} has no {name}; a model is registered from a job that finished and "
                         "exported (export.enabled: true)") from None


def register(conn: redis.Redis, job_id: str, name: str, *, store: ArtifactStore | None = None,
             actor: users.Actor | None = None) -> ModelVersion:
    """Version N+1 of `name` from a finished, exported job: its files copied into the store, then the record.
    `actor`: a submitter or admin (any finished job may be registered: everyone sees every job), the version's owner."""
    actor = audit.authorize(conn, actor, users.Action.SUBMIT, "register models")
    keys.check_model_name(name)
    store = store or ArtifactStore()
    record = JobRecord.find(conn, keys.check_job_id(job_id))
    if record is None:
        raise ModelError(f"no job {job_id}")
    if record.state != JobState.FINISHED:
        raise ModelError(f"job {job_id} is {record.state}; only a finished job can be registered")
    present = set(store.list_files(job_id))
    missing = [f for f in REQUIRED_FILES if runfiles.exported(f) not in present]
    if missing:
        raise ModelError(f"job {job_id} has no exported {', '.join(missing)}; export it first "
                         f"(python -m core.export RUN_DIR) or train with export.enabled: true")
    report = _read_json(store, job_id, runfiles.REPORT)
    export = report.get("export") or {}
    deploy = (export.get("deploy") or {}).get("file") or runfiles.ONNX
    if runfiles.exported(deploy) not in present:
        deploy = runfiles.ONNX
    test = report.get("test") or {}
    dataset = record.get("dataset") or {}
    number = int(conn.incr(keys.model_seq(name)))
    version = ModelVersion(
        name=name, version=number, job_id=job_id, job_name=str(record.get("name") or ""),
        dataset=(f"{dataset['name']}:{dataset['version']}" if dataset.get("name") else None),
        dataset_hash=dataset.get("hash"), deploy=deploy,
        deploy_reason=str((export.get("deploy") or {}).get("reason") or "the FP32 ONNX model"),
        files={}, labels=_read_json(store, job_id, runfiles.exported(runfiles.LABELS)),
        preprocess=_read_json(store, job_id, runfiles.exported(runfiles.PREPROCESS)),
        metrics={k: test[k] for k in ("accuracy", "macro_f1", "top5_accuracy") if k in test}
        | {"latency_ms_batch1": (export.get("onnx") or {}).get("latency_ms_batch1")},
        created_at=time.time(), owner=actor.name)
    try:
        for file in VERSION_FILES:
            if runfiles.exported(file) in present:
                store.copy(f"{store.run_key(job_id)}/{runfiles.exported(file)}", version.key(file))
                version.files[file] = store.size(version.key(file))
        store.copy(f"{store.run_key(job_id)}/{runfiles.REPORT}", version.key(runfiles.REPORT))
        version.files[runfiles.REPORT] = store.size(version.key(runfiles.REPORT))
    except (OSError, ArtifactError) as err:
        store.remove_folder(version.folder)
        raise ModelError(f"cannot copy job {job_id}'s files into the artifact store {store.url}: {err}") from None
    target = mlflow_mirror.target_for(store, job_id)
    if target is not None:
        mirrored = mlflow_mirror.mirror_version(version, store, target)
        version.mlflow = dataclasses.asdict(mirrored) if mirrored else None
    with conn.pipeline() as pipe:
        pipe.hset(keys.model_versions(name), str(number), json.dumps(dataclasses.asdict(version)))
        pipe.zadd(keys.models_index(), {name: version.created_at}, nx=True)
        pipe.execute()
    audit.record(conn, actor, audit.AuditAction.MODEL_REGISTER, version.ref, job=job_id)
    notify.emit(conn, "model.registered", {"model": name, "version": number, "id": job_id,
                                           "name": version.job_name, "metrics": version.metrics,
                                           "url": notify.dashboard_link("models", model=name)})
    return version


def _authorize_alias(conn: redis.Redis, actor: users.Actor | None, name: str, alias: str,
                     versions: list[ModelVersion]) -> users.Actor:
    """An alias is moved or removed by the owner of each version it leaves or reaches, or by an admin."""
    for v in versions:
        actor = audit.authorize(conn, actor, users.Action.MANAGE, f"move alias {name}@{alias} (version {v.version})",
                                owner=v.owner)
    return users.acting(conn, actor)


def set_alias(conn: redis.Redis, name: str, alias: str, version: int, *,
              actor: users.Actor | None = None) -> int | None:
    """Point `alias` at `version` of `name` (and in MLflow, when the version was mirrored there); returns the version
    it pointed at before (None when new). `actor`: the owner of the version it points at and of the one it left,
    or an admin."""
    keys.check_model_name(alias, "alias")
    target = resolve(conn, ModelRef(name, int(version)))
    before = conn.hget(keys.model_aliases(name), alias)
    left = _versions(conn, name).get(int(before)) if before is not None else None
    actor = _authorize_alias(conn, actor, name, alias, [target] + ([left] if left and left != target else []))
    conn.hset(keys.model_aliases(name), alias, target.version)
    mirrored = mlflow_mirror.MlflowRecord.from_dict(target.mlflow)
    if mirrored:
        mlflow_mirror.mirror_alias(mirrored, alias)
    previous = int(before) if before is not None else None
    audit.record(conn, actor, audit.AuditAction.MODEL_ALIAS, f"{name}@{alias}", version=target.version,
                 previous=previous)
    if previous != target.version:
        notify.emit(conn, "alias.moved", {"model": name, "alias": alias, "version": target.version,
                                          "previous": previous, "url": notify.dashboard_link("models", model=name)})
    return previous


def remove_alias(conn: redis.Redis, name: str, alias: str, *, actor: users.Actor | None = None) -> None:
    target = resolve(conn, ModelRef(name, alias=alias))
    actor = _authorize_alias(conn, actor, name, alias, [target])
    conn.hdel(keys.model_aliases(name), alias)
    audit.record(conn, actor, audit.AuditAction.MODEL_ALIAS, f"{name}@{alias}", version=None, previous=target.version)
    mirrored = mlflow_mirror.MlflowRecord.from_dict(target.mlflow)
    if mirrored:
        mlflow_mirror.delete_alias(mirrored, alias)


def remove(conn: redis.Redis, ref: str, *, store: ArtifactStore | None = None,
           in_use: dict[str, str] | None = None, actor: users.Actor | None = None) -> list[ModelVersion]:
    """Remove one version (NAME:VERSION) or every version (NAME), with their files and the aliases pointing at them.
    `in_use`: version ref → what serves it (a deployment id); such a version is refused. `actor`: the owner of every
    version removed, or an admin."""
    parsed = parse_ref(ref)
    if parsed.alias:
        raise ModelError(f"{ref}: remove a version (NAME:VERSION) or a whole model (NAME), not an alias "
                         f"(python -m worker model alias {parsed.name} {parsed.alias} --delete)")
    versions = _versions(conn, parsed.name)
    if not versions:
        raise NoSuchModelError(f"no model named {parsed.name!r}")
    targets = [resolve(conn, parsed)] if parsed.version else list(versions.values())
    for t in targets:
        actor = audit.authorize(conn, actor, users.Action.MANAGE, f"remove model {t.ref}", owner=t.owner)
    busy = {t.ref: (in_use or {})[t.ref] for t in targets if t.ref in (in_use or {})}
    if busy:
        raise ModelError("refused: " + "; ".join(f"{r} is served by deployment {d}" for r, d in busy.items())
                         + " (undeploy it first)")
    store = store or ArtifactStore()
    table = aliases(conn, parsed.name)
    with conn.pipeline() as pipe:
        for t in targets:
            pipe.hdel(keys.model_versions(parsed.name), str(t.version))
            for alias, number in table.items():
                if number == t.version:
                    pipe.hdel(keys.model_aliases(parsed.name), alias)
        if len(targets) == len(versions):
            pipe.zrem(keys.models_index(), parsed.name)
        pipe.execute()
    for t in targets:
        store.remove_folder(t.folder)
    audit.record(conn, actor, audit.AuditAction.MODEL_REMOVE, ref, versions=[t.version for t in targets],
                 owners=sorted({t.owner for t in targets}))
    return targets


def describe(conn: redis.Redis, version: ModelVersion) -> dict[str, Any]:
    """A version as `model show --json` prints it: its record, `ref` and the aliases pointing at it."""
    return {**dataclasses.asdict(version), "ref": version.ref,
            "aliases": sorted(a for a, v in aliases(conn, version.name).items() if v == version.version)}


def summary(conn: redis.Redis, name: str) -> dict[str, Any]:
    """One model for `model list`: its versions, aliases and the latest version's metrics."""
    versions = model_versions(conn, name)
    latest = versions[-1] if versions else None
    return {"name": name, "versions": [v.version for v in versions], "latest": latest.version if latest else None,
            "aliases": aliases(conn, name), "metrics": latest.metrics if latest else {},
            "job_id": latest.job_id if latest else None, "created_at": versions[0].created_at if versions else None,
            "owner": latest.owner if latest else None, "owners": sorted({v.owner for v in versions})}
