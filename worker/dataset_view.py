"""What the dashboard shows of a registered dataset besides its record: a few images per class, read without copying
the dataset, and a valid dataset name suggested from a file name.

Thumbnails are read where the data lives and stay bounded whatever the dataset's size:
- an upload (`artifact:datasets/<sha>.zip`): the zip's central directory, then only the chosen entries (on a remote
  store through fsspec's ranged reads; the zip is never downloaded whole);
- an in-place `.zip` URL: the same, over fsspec;
- an in-place folder: a breadth-first walk of at most THUMB_MAX_LISTINGS directory listings to find the class folders
  (below wrapping and split folders), then one listing per class shown. Nothing lists the whole bucket.
A file that does not decode is passed over (the health report names corrupt files); a file bigger than
THUMB_MAX_FILE_BYTES is not read.
"""
from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from worker.artifacts import DATASET_REF_PREFIX, ArtifactStore
from worker.datasets import DatasetVersion
from worker.defaults import DATASET_SAMPLE_THREADS
from worker.errors import DatasetError
from worker.keys import check_dataset_name

THUMB_MAX_LISTINGS = 64
"""Directory listings a folder source's walk may make to find its class folders (wrapping and split folders)."""

THUMB_MAX_DEPTH = 3
"""Folder levels below the source's root searched for class folders."""

THUMB_MAX_FILE_BYTES = 20_000_000
"""Files bigger than this (bytes) are not read for a thumbnail."""

THUMB_CANDIDATES = 2
"""Files tried per thumbnail wanted (a corrupt one is replaced by the next)."""


# ----------------------------------------------------------------------------------------------------- names
def suggest_dataset_name(text: str) -> str:
    """A valid dataset name (worker.keys.check_dataset_name) made from a file name: `My Photos (2).zip` →
    `my-photos-2`; `dataset` when nothing usable is left."""
    stem = re.sub(r"\.zip$", "", text.strip().rsplit("/", 1)[-1], flags=re.IGNORECASE)
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("._-")[:64].rstrip("._-")
    try:
        return check_dataset_name(name)
    except DatasetError:
        return "dataset"


# ------------------------------------------------------------------------------------------------ thumbnails
def thumbnails(version: DatasetVersion, *, store: ArtifactStore | None = None, per_class: int = 4,
               max_classes: int = 24) -> dict[str, list[bytes]]:
    """PNG thumbnails (core's THUMBNAIL_SIDE) of up to `per_class` images of each of the first `max_classes`
    classes, by class; DatasetError naming the source when it cannot be read."""
    classes = list(version.classes)[:max_classes]
    want = per_class * THUMB_CANDIDATES
    try:
        if version.source.startswith(DATASET_REF_PREFIX):
            store = store or ArtifactStore()
            key = version.source.removeprefix(DATASET_REF_PREFIX)
            opener = (lambda: open(store.path(key), "rb")) if store.is_local else \
                (lambda: store.fs.open(store.path(key), "rb"))
            return _from_zip(opener, classes, want, per_class)
        fs, root = _connect(version.source)
        if root.rstrip("/").lower().endswith(".zip"):
            return _from_zip(lambda: fs.open(root, "rb"), classes, want, per_class)
        return _from_folder(fs, root.rstrip("/"), classes, want, per_class)
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 — the store's and fsspec back-ends' own errors (botocore, OSError, ...)
        raise DatasetError(f"cannot read images of {version.ref} from {version.source}: {type(err).__name__}: "
                           f"{err}") from None


def _connect(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url, skip_instance_cache=True)  # fresh: endpoints come from the environment


def _usable(parts: list[str]) -> bool:
    from core.data.archive import is_ignored_part, is_image_name

    return bool(parts) and not any(is_ignored_part(p) for p in parts) and is_image_name(parts[-1])


def _from_zip(opener: Callable[[], Any], classes: list[str], want: int, per_class: int) -> dict[str, list[bytes]]:
    """Pick entries by the first folder of their path that is a class name; read only those entries."""
    wanted = set(classes)
    picked: dict[str, list[str]] = {c: [] for c in classes}
    with opener() as fh, zipfile.ZipFile(fh) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            parts = info.filename.split("/")
            if info.is_dir() or info.file_size > THUMB_MAX_FILE_BYTES or not _usable(parts):
                continue
            cls = next((p for p in parts[:-1] if p in wanted), None)
            if cls is not None and len(picked[cls]) < want:
                picked[cls].append(info.filename)
        return {c: _thumbs([lambda n=n: zf.read(n) for n in names], per_class, threads=1)
                for c, names in picked.items()}


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _class_dirs(fs: Any, root: str, classes: list[str]) -> dict[str, str]:
    """Class name → its folder, found breadth-first below `root` within THUMB_MAX_LISTINGS listings."""
    from core.data.archive import is_ignored_part

    wanted, found = set(classes), {}
    queue, listings = [(root, 0)], 0
    while queue and listings < THUMB_MAX_LISTINGS and len(found) < len(wanted):
        path, depth = queue.pop(0)
        listings += 1
        for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
            name = _name(entry["name"])
            if entry.get("type") != "directory" or is_ignored_part(name):
                continue
            if name in wanted:
                found.setdefault(name, entry["name"])
            elif depth + 1 < THUMB_MAX_DEPTH:
                queue.append((entry["name"], depth + 1))
    return found


def _from_folder(fs: Any, root: str, classes: list[str], want: int, per_class: int) -> dict[str, list[bytes]]:
    folders = _class_dirs(fs, root, classes)
    out: dict[str, list[bytes]] = {}
    for cls in classes:
        if cls not in folders:
            out[cls] = []
            continue
        entries = fs.ls(folders[cls], detail=True)
        files = sorted(e["name"] for e in entries if e.get("type") != "directory"
                       and int(e.get("size") or 0) <= THUMB_MAX_FILE_BYTES and _usable([_name(e["name"])]))
        if not files:  # images below a sub-folder of the class folder (core's scan accepts any depth)
            found = fs.find(folders[cls], maxdepth=2, detail=True)
            files = sorted(p for p, e in found.items() if int(e.get("size") or 0) <= THUMB_MAX_FILE_BYTES
                           and _usable(p.split("/")))
        out[cls] = _thumbs([lambda p=p: fs.cat_file(p) for p in files[:want]], per_class,
                           threads=DATASET_SAMPLE_THREADS)
    return out


def _thumbs(readers: list[Callable[[], bytes]], per_class: int, *, threads: int) -> list[bytes]:
    """The first `per_class` readers' images that decode, as PNG thumbnails: read `per_class` at a time (`threads`
    at once), the next ones only for those that did not decode."""
    def one(read: Callable[[], bytes]) -> bytes | None:
        try:
            return _thumbnail_png(read())
        except Exception:  # noqa: BLE001 — a corrupt or unreadable file: the health report names those
            return None

    made: list[bytes] = []
    start = 0
    with ThreadPoolExecutor(max(1, threads)) as pool:
        while len(made) < per_class and start < len(readers):
            batch = readers[start:start + per_class - len(made)]
            start += len(batch)
            made += [t for t in pool.map(one, batch) if t is not None]
    return made


def _thumbnail_png(data: bytes) -> bytes:
    """RGB, as registration checks the data (worker.datasets.register's colour mode)."""
    from PIL import Image

    from core.data.defaults import THUMBNAIL_SIDE
    from core.data.transforms import to_color_mode

    with Image.open(io.BytesIO(data)) as img:
        img.draft(img.mode, (THUMBNAIL_SIDE, THUMBNAIL_SIDE))  # JPEG: decode at a reduced scale
        img.load()
        thumb = to_color_mode(img, "RGB").copy()
    thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BILINEAR)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    return buf.getvalue()
