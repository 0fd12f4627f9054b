"""Prepared forms of registered datasets (README "Datasets", docs/redis.md): which form a job uses, and preparing one
once for all workers.

Decisions:
- A job on a registered dataset (`data.dataset`) reads a prepared form when the tensor cache would not hold its data
  (`data.cache: off`, or N × C × size² bytes per process over `data.cache_max_mb`) and the augmentation is not
  `strong` (whose RandomResizedCrop wants the original image: it keeps the PIL DataLoader). Otherwise the tensor
  cache stays: for data that fits it is the fastest path, and nothing needs preparing.
- The form for the job's input size and colour mode (`<size>-<mode>`, e.g. `224-RGB`) is used when recorded;
  else this worker prepares it, under a Redis lock per (version, form) so only one worker prepares while the others
  wait for it, and records it with `add_prepared_form`. The shards go to the artifact store beside the datasets,
  `prepared/<content hash>/<form key>/`: the same content registered twice shares them; `dataset rm` deletes
  them once no version with that hash is left (registry.remove).
- Preparing shows progress as the feature cache's embedding pass does: `phase: prepare`, then `prepare` events
  {done, total, images_per_sec} in the job's event stream, and lines in its log.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from worker import keys
from worker.artifacts import ArtifactStore
from worker.datasets.registry import DatasetRef, DatasetVersion, add_prepared_form, get_version, prepared_forms
from worker.defaults import PREPARE_LOCK_SECONDS, PREPARED_PREFIX
from worker.errors import ArtifactError, DatasetError


def input_size(data: dict[str, Any], version: DatasetVersion) -> int:
    """The side the job's images will have: data.image_size, else core's imagefolder rule on the registered sizes."""
    from core.data.defaults import IMAGEFOLDER_DEFAULT_SIZE, SMALL_IMAGE_SIDE

    if data.get("image_size"):
        return int(data["image_size"])
    common = (version.report.get("image_sizes") or {}).get("common") or []
    if common and min(common[0][0]) <= SMALL_IMAGE_SIDE:
        return max(int(min(common[0][0])), 4)
    return IMAGEFOLDER_DEFAULT_SIZE


def wants_shards(data: dict[str, Any], version: DatasetVersion, size: int, processes: int = 1) -> bool:
    """The rule of the module docstring: shards when the tensor cache would not be used and augment is not strong."""
    from core.config import DataConfig
    from core.data.fast import cache_bytes

    defaults = DataConfig()
    cache = str(data.get("cache", defaults.cache))
    if data.get("augment", defaults.augment) == "strong" or cache in ("on", "True", "true"):
        return False
    if cache in ("off", "False", "false"):
        return True
    channels = 1 if data.get("color_mode", defaults.color_mode) == "L" else 3
    max_mb = int(data.get("cache_max_mb") or defaults.cache_max_mb)
    return cache_bytes(version.num_images, channels, (size, size)) / max(processes, 1) > max_mb * 2**20


def form_url(store: ArtifactStore, version: DatasetVersion, key: str) -> str:
    return store.uri(f"{PREPARED_PREFIX}/{version.hash}/{key}")


def ensure_prepared(conn: redis.Redis, store: ArtifactStore, version: DatasetVersion, *, size: int,
                    color_mode: str, local_source: Callable[[], Path], note: Callable[[str], None] = print,
                    progress: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """The version's form for (size, color_mode), prepared now under the lock when no worker has done so yet."""
    from core.data.prepare import prepare
    from core.data.shards import form_key

    key = form_key(size, color_mode)
    found = _form(conn, version, key)
    if found is not None:
        return found
    lock = conn.lock(keys.dataset_prepare_lock(version.name, version.version, key), timeout=PREPARE_LOCK_SECONDS,
                     sleep=0.5)
    if not lock.acquire(blocking=False):
        note(f"waiting for another worker to prepare {version.ref} ({key})")
        lock.acquire(blocking=True)
    try:
        found = _form(conn, version, key)  # prepared while this worker waited
        if found is not None:
            return found
        url = form_url(store, version, key)
        source = local_source()
        note(f"preparing {version.ref} ({key}) from {source} into {url}")

        def report(done: int, total: int, rate: float) -> None:
            lock.reacquire()  # still alive: keep the lock
            if progress is not None:
                progress(done, total, rate)

        index = prepare(str(source), url, size=size, color_mode=color_mode, progress=report)
        form = {"key": key, "url": url, "encoding": index.encoding, "input_size": index.input_size,
                "stored_size": index.stored_size, "color_mode": index.color_mode,
                "shards": sum(len(s.shards) for s in index.splits.values()),
                "counts": {s: len(v) for s, v in index.splits.items()}, "prepared_at": time.time(), **index.stats}
        add_prepared_form(conn, version.name, version.version, key, form)
        note(f"prepared {version.ref} ({key}): {form['images']} images, {form['shards']} shards, "
             f"{form['bytes_per_image']:.0f} bytes/image ({index.encoding}), {form['images_per_sec']:.0f} images/s")
        return form
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:  # expired while preparing: another worker may have taken it
            pass


def local_copy(store: ArtifactStore, version: DatasetVersion, note: Callable[[str], None] = print) -> Path:
    """A local path of the version's data to prepare from: fetched through the store (an upload) or synced down once
    (an in-place URL) into this machine's dataset cache; a shared path (file://) as it is."""
    from worker.datasets.sources import fetch, needs_fetch

    path = version.data_path
    if not needs_fetch(path):
        return Path(path)
    note(f"fetching dataset {version.ref} ({path}) to prepare it")
    return fetch(store, path, version.hash, what=version.ref)


def _form(conn: redis.Redis, version: DatasetVersion, key: str) -> dict[str, Any] | None:
    for form in prepared_forms(conn, version.name, version.version):
        if form.get("key") == key:
            return form
    return None


def use_prepared(conn: redis.Redis, store: ArtifactStore, data: dict[str, Any], record: Any, *,
                 note: Callable[[str], None]) -> dict[str, Any]:
    """A job's `data` section reading its form (`prepared` set, `path` dropped: nothing else is fetched) when the rule
    says shards (module docstring); else `data` unchanged. `record` is the job's JobRecord."""
    if not data.get("dataset") or data.get("prepared"):
        return data
    from core.errors import DataError

    try:
        return _use_prepared(conn, store, data, record, note=note)
    except (DataError, DatasetError) as err:  # the attempt fails the job with this message (its ArtifactError path)
        raise ArtifactError(f"dataset {data['dataset']}: cannot read it as shards: {err}") from None


def _use_prepared(conn: redis.Redis, store: ArtifactStore, data: dict[str, Any], record: Any, *,
                  note: Callable[[str], None]) -> dict[str, Any]:
    version = get_version(conn, DatasetRef.parse(str(data["dataset"])))
    size = input_size(data, version)
    if not wants_shards(data, version, size, record.gpus):
        return data

    from worker.streaming import RedisEventSink

    sink = RedisEventSink(conn, record.id)
    try:
        sink.emit("phase", {"phase": "prepare"})
        form = ensure_prepared(conn, store, version, size=size, color_mode=str(data.get("color_mode") or "RGB"),
                               local_source=lambda: local_copy(store, version, note), note=note,
                               progress=lambda d, t, r: sink.emit("prepare", {"done": d, "total": t,
                                                                             "images_per_sec": r}))
    finally:
        sink.close()
    note(f"reading the prepared form {form['key']} of {version.ref}: {form['url']}")
    return {**data, "prepared": form["url"], "image_size": size, "path": None}
