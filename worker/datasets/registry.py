"""The dataset registry in Redis: a NAME has versions 1..N; a version is written once and never changed (its data
is identified by its content hash). Keys: worker/keys.py, documented in docs/redis.md ("Datasets").

Decisions (README "Datasets"):
- Registering the same content from the same source under the same name again makes no new version: the existing
  one is returned (`Registered.created` is False).
- Version numbers are never reused, also after `remove` (a job that trained on `flowers:2` can never silently
  resolve to other data); `NAME` alone means the highest existing version.
- A version in use by a queued, running or recovering job cannot be removed. Removing a version deletes the
  uploaded zip from the artifact store once no version of any dataset refers to it; in-place sources are the
  user's and are never touched.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import redis

from worker import audit, keys, users
from worker.artifacts import DATASET_REF_PREFIX, ArtifactStore
from worker.datasets.sources import (
    UPLOAD,
    Scanned,
    is_url,
    job_data_path,
    scan_in_place,
    scan_stored,
    scan_upload,
)
from worker.defaults import PREPARED_PREFIX
from worker.errors import DatasetError, NoSuchDatasetError
from worker.hashcodec import decode_reply
from worker.states import ACTIVE_STATES

_DEFAULT_COLOR_MODE = "RGB"


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    """`NAME` (the latest version) or `NAME:VERSION`, as users write it (config `data.dataset`, the CLI)."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text_: str) -> DatasetRef:
        """DatasetError when the name breaks the naming rule or the version is not a whole number from 1."""
        name, sep, version = str(text_).strip().partition(":")
        keys.check_dataset_name(name)
        if not sep:
            return cls(name)
        if not version.isdigit() or int(version) < 1:
            raise DatasetError(f"invalid dataset version {version!r} in {text_!r}: write NAME or NAME:VERSION with "
                               "VERSION a whole number from 1")
        return cls(name, int(version))

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"


@dataclasses.dataclass(frozen=True)
class DatasetVersion:
    """One registered version: immutable facts about its data (the JSON in `trainer:dataset:<name>`)."""

    name: str
    version: int
    source: str
    """`artifact:datasets/<sha256>.zip` (uploaded) or the URL read in place (`s3://...`, `file:///...`, ...)."""
    kind: str
    """UPLOAD or IN_PLACE (worker/datasets/sources.py)."""
    hash: str
    """sha256 of the uploaded zip, or of an in-place source's listing (paths, sizes, etags or mtimes)."""
    classes: list[str]
    counts: dict[str, int]
    counts_by_split: dict[str, dict[str, int]]
    num_images: int
    bytes: int
    report: dict[str, Any]
    """The health report at registration (core.data.inspect_dataset's keys; `sampled` for in-place sources)."""
    created_at: float
    origin: str
    """What was given to `dataset add` (the local path of an upload)."""
    owner: str = users.OPERATOR
    """Who registered it (versions registered before users: the operator)."""

    @property
    def ref(self) -> str:
        """`NAME:VERSION`: what a job records."""
        return f"{self.name}:{self.version}"

    @property
    def data_path(self) -> str:
        """The `data.path` a job on this version trains from (worker/datasets/sources.py, `job_data_path`)."""
        return job_data_path(self.source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> DatasetVersion:
        data = json.loads(decode_reply(raw))
        values = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "owner": values["owner"] or users.OPERATOR})


@dataclasses.dataclass(frozen=True)
class Registered:
    """What `register` did: the version, and whether it is new (False: the same content was registered before)."""

    version: DatasetVersion
    created: bool


@dataclasses.dataclass(frozen=True)
class JobUse:
    """A job that was submitted on a version (`trainer:dataset:<name>:<version>:jobs`), with its state now."""

    id: str
    submitted_at: float
    state: str | None
    """None once the job was deleted."""


# ------------------------------------------------------------------------------------------------------- reading
def _versions(conn: redis.Redis, name: str) -> dict[int, DatasetVersion]:
    raw = conn.hgetall(keys.dataset_versions(name))
    return dict(sorted((int(decode_reply(k)), DatasetVersion.from_json(v)) for k, v in raw.items()))


def list_datasets(conn: redis.Redis, owner: str | None = None) -> list[str]:
    """Names of every registered dataset, oldest first; with `owner`, those with a version `owner` registered."""
    names = [decode_reply(n) for n in conn.zrange(keys.datasets_index(), 0, -1)]
    if owner is None:
        return names
    return [n for n in names if any(v.owner == owner for v in _versions(conn, n).values())]


def dataset_versions(conn: redis.Redis, name: str) -> list[DatasetVersion]:
    """Every version of `name`, oldest first; NoSuchDatasetError (listing the names that exist) when there is none."""
    versions = _versions(conn, keys.check_dataset_name(name))
    if not versions:
        names = list_datasets(conn)
        raise NoSuchDatasetError(f"no dataset {name!r}; registered: {', '.join(names) if names else 'none'} "
                                 "(python -m worker dataset add NAME SOURCE)")
    return list(versions.values())


def get_version(conn: redis.Redis, ref: str | DatasetRef) -> DatasetVersion:
    """The version `ref` names (NAME: the latest); NoSuchDatasetError naming the versions that exist."""
    ref = ref if isinstance(ref, DatasetRef) else DatasetRef.parse(ref)
    versions = {v.version: v for v in dataset_versions(conn, ref.name)}
    if ref.version is None:
        return versions[max(versions)]
    if ref.version not in versions:
        raise NoSuchDatasetError(f"dataset {ref.name!r} has no version {ref.version}; versions: "
                                 f"{', '.join(str(v) for v in versions)}")
    return versions[ref.version]


def version_jobs(conn: redis.Redis, name: str, version: int) -> list[JobUse]:
    """The jobs submitted on one version, oldest first, with their state now."""
    from worker.record import JobRecord

    entries = [(decode_reply(j), float(t)) for j, t in conn.zrange(keys.dataset_jobs(name, version), 0, -1, withscores=True)]
    records = JobRecord.fetch_many(conn, [j for j, _ in entries]) if entries else {}
    out = []
    for job_id, t in entries:
        record = records.get(job_id)
        out.append(JobUse(job_id, t, None if record is None else str(record.state)))
    return out


def prepared_forms(conn: redis.Redis, name: str, version: int) -> list[dict[str, Any]]:
    """The version's prepared forms (shards), as their preparer recorded them; [] until one is prepared."""
    raw = conn.hgetall(keys.dataset_prepared(name, version))
    return [json.loads(decode_reply(raw[k])) for k in sorted(raw)]


def add_prepared_form(conn: redis.Redis, name: str, version: int, form_key: str, form: dict[str, Any]) -> None:
    """Record a prepared form of a version (the preparer's JSON under its own key, e.g. `raw-224`)."""
    get_version(conn, DatasetRef(name, version))
    conn.hset(keys.dataset_prepared(name, version), form_key, json.dumps(form))


def describe(conn: redis.Redis, version: DatasetVersion) -> dict[str, Any]:
    """A version as `dataset show --json` prints it: its fields, `ref`, `data_path`, prepared forms and jobs."""
    return {**version.to_dict(), "ref": version.ref, "prepared": prepared_forms(conn, version.name, version.version),
            "jobs": [dataclasses.asdict(j) for j in version_jobs(conn, version.name, version.version)]}


def summary(conn: redis.Redis, name: str) -> dict[str, Any]:
    """One line of `dataset list`: the latest version's facts and how many versions there are."""
    versions = dataset_versions(conn, name)
    latest = versions[-1]
    return {"name": name, "versions": [v.version for v in versions], "latest": latest.version,
            "source": latest.source, "kind": latest.kind, "hash": latest.hash, "classes": len(latest.classes),
            "images": latest.num_images, "bytes": latest.bytes, "created_at": latest.created_at,
            "owner": latest.owner, "owners": sorted({v.owner for v in versions})}


# ------------------------------------------------------------------------------------------------------- writing
def scan_source(source: str, store: ArtifactStore, *, color_mode: str = _DEFAULT_COLOR_MODE,
                max_image_pixels: int | None = None) -> Scanned:
    """Check a source the way submission checks a dataset (nothing written on a refusal); upload it when local."""
    from core.config import DataConfig

    pixels = max_image_pixels or DataConfig.model_fields["max_image_pixels"].default
    source = str(source).strip()
    if not source:
        raise DatasetError("no source given: a folder, a .zip, or a URL (s3://bucket/prefix, file:///path, ...)")
    if source.startswith(DATASET_REF_PREFIX):
        return scan_stored(source, store, color_mode=color_mode, max_image_pixels=pixels)
    if is_url(source):
        return scan_in_place(source, color_mode=color_mode, max_image_pixels=pixels)
    return scan_upload(Path(source).expanduser(), store, color_mode=color_mode, max_image_pixels=pixels)


def register(conn: redis.Redis, name: str, source: str, *, store: ArtifactStore | None = None,
             color_mode: str = _DEFAULT_COLOR_MODE, max_image_pixels: int | None = None,
             actor: users.Actor | None = None) -> Registered:
    """Register a new version of `name` from `source` (sources.py says which kinds); DatasetError on a refusal, with
    nothing registered. The same content from the same source again returns the existing version. `actor`: who
    registers (a submitter or admin; PermissionDeniedError for a viewer), the new version's `owner`."""
    actor = audit.authorize(conn, actor, users.Action.SUBMIT, "register datasets")
    keys.check_dataset_name(name)
    scanned = scan_source(source, store or ArtifactStore(), color_mode=color_mode, max_image_pixels=max_image_pixels)
    report = scanned.report
    result: dict[str, Registered] = {}

    def commit(pipe: Any) -> None:
        for raw in pipe.hvals(keys.dataset_versions(name)):
            old = DatasetVersion.from_json(raw)
            if old.hash == scanned.hash and old.source == scanned.source:
                result["r"] = Registered(old, created=False)
                return
        number = int(pipe.get(keys.dataset_seq(name)) or 0) + 1
        version = DatasetVersion(
            name=name, version=number, source=scanned.source, kind=scanned.kind, hash=scanned.hash,
            classes=list(report["classes"]), counts=dict(report["counts"]),
            counts_by_split=dict(report.get("counts_by_split") or {}), num_images=int(report["num_images"]),
            bytes=scanned.bytes, report=report, created_at=time.time(), origin=scanned.origin, owner=actor.name)
        pipe.multi()
        pipe.hset(keys.dataset_versions(name), str(number), json.dumps(version.to_dict()))
        pipe.set(keys.dataset_seq(name), number)
        pipe.zadd(keys.datasets_index(), {name: version.created_at}, nx=True)
        result["r"] = Registered(version, created=True)

    conn.transaction(commit, keys.dataset_versions(name), keys.dataset_seq(name))
    done = result["r"]
    if done.created:
        audit.record(conn, actor, audit.AuditAction.DATASET_REGISTER, done.version.ref, source=done.version.source,
                     images=done.version.num_images)
    return done


def remove(conn: redis.Redis, ref: str | DatasetRef, *, store: ArtifactStore | None = None,
           actor: users.Actor | None = None) -> list[DatasetVersion]:
    """Remove one version (NAME:VERSION) or every version (NAME); returns what was removed. DatasetError while a
    queued, running or recovering job uses one of them (nothing removed). Uploaded zips no version refers to any
    more are deleted from the artifact store. `actor`: the owner of every version removed, or an admin."""
    ref = ref if isinstance(ref, DatasetRef) else DatasetRef.parse(ref)
    targets = [get_version(conn, ref)] if ref.version is not None else dataset_versions(conn, ref.name)
    for t in targets:
        actor = audit.authorize(conn, actor, users.Action.MANAGE, f"remove dataset {t.ref}", owner=t.owner)
    uses = {t.version: version_jobs(conn, t.name, t.version) for t in targets}
    busy = [f"{t.ref} by job {j.id} ({j.state})" for t in targets for j in uses[t.version]
            if j.state in {str(s) for s in ACTIVE_STATES}]
    if busy:
        raise DatasetError(f"dataset {ref} is in use: {'; '.join(busy)}; cancel those jobs or wait until they end")
    watched = [keys.dataset_versions(ref.name), *(keys.dataset_jobs(t.name, t.version) for t in targets)]

    def commit(pipe: Any) -> None:
        if any(pipe.zcard(keys.dataset_jobs(t.name, t.version)) != len(uses[t.version]) for t in targets):
            raise DatasetError(f"a job was just submitted on dataset {ref}; nothing removed (try again)")
        pipe.multi()
        pipe.hdel(keys.dataset_versions(ref.name), *(str(t.version) for t in targets))
        for t in targets:
            pipe.delete(keys.dataset_jobs(t.name, t.version), keys.dataset_prepared(t.name, t.version))

    conn.transaction(commit, *watched)
    if not conn.exists(keys.dataset_versions(ref.name)):
        conn.zrem(keys.datasets_index(), ref.name)
    store = store or ArtifactStore()
    _delete_unreferenced(conn, [t.source for t in targets if t.kind == UPLOAD], store)
    _delete_unreferenced_forms(conn, [t.hash for t in targets], store)
    audit.record(conn, actor, audit.AuditAction.DATASET_REMOVE, str(ref), versions=[t.version for t in targets],
                 owners=sorted({t.owner for t in targets}))
    return targets


def _delete_unreferenced(conn: redis.Redis, sources: list[str], store: ArtifactStore) -> None:
    """Delete the uploaded zips among `sources` that no remaining version of any dataset refers to."""
    if not sources:
        return
    still = {v.source for name in list_datasets(conn) for v in _versions(conn, name).values()}
    for source in set(sources) - still:
        store.remove(source.removeprefix(DATASET_REF_PREFIX))


def _delete_unreferenced_forms(conn: redis.Redis, hashes: list[str], store: ArtifactStore) -> None:
    """Delete the prepared shards of content hashes that no remaining version of any dataset has (`dataset rm`)."""
    still = {v.hash for name in list_datasets(conn) for v in _versions(conn, name).values()}
    for digest in set(hashes) - still:
        store.remove_folder(f"{PREPARED_PREFIX}/{digest}")


# -------------------------------------------------------------------------------------------------- submission
def resolve_for_job(conn: redis.Redis, cfg: dict[str, Any]) -> DatasetVersion:
    """Pin a job config's `data.dataset` to its exact version, in place: `data.dataset` becomes NAME:VERSION,
    `data.name` imagefolder, `data.path` the version's data path, and the MLflow tags name the version and hash.
    SubmissionError naming the versions that exist when it is missing; a data.path that disagrees is refused."""
    from worker.errors import SubmissionError

    data = cfg["data"]
    given = data.get("dataset")
    try:
        version = get_version(conn, str(given))
    except DatasetError as err:
        raise SubmissionError.on("data.dataset", given, str(err)) from None
    if data.get("path") and str(data["path"]) != version.data_path:
        raise SubmissionError.on("data.path", data["path"], f"leave data.path empty with data.dataset: the registry "
                                 f"says where {version.ref} is ({version.data_path})")
    data.update(name="imagefolder", path=version.data_path, dataset=version.ref)
    track = cfg.setdefault("track", {})
    track["tags"] = {**dict(track.get("tags") or {}), "dataset": version.ref, "dataset_hash": version.hash}
    return version


def job_field(version: DatasetVersion) -> dict[str, Any]:
    """The job status hash's `dataset` field for a job on a registered version (what `status --json` shows)."""
    return {"name": version.name, "version": version.version, "hash": version.hash, "ref": version.ref,
            "source": version.source, "kind": version.kind, "classes": version.classes, "counts": version.counts}


def record_job(pipe: Any, version: DatasetVersion, job_id: str, submitted_at: float) -> None:
    """Add the job to the version's jobs (queued on the submission's own MULTI pipeline, so both land together)."""
    pipe.zadd(keys.dataset_jobs(version.name, version.version), {job_id: submitted_at})


