"""Where a registered dataset's files live, and how they are checked and read without copying them first.

A source is one of:
- an upload: a local folder or .zip, zipped and put into the artifact store (`artifact:datasets/<sha256>.zip`,
  content-addressed, capped by UPLOAD_MAX_BYTES), checked in full with core's `inspect_dataset`;
- in place: any fsspec URL of a folder of class folders or of a .zip (`s3://bucket/prefix`, `gs://...`,
  `https://host/data.zip`, `file:///shared/data`). Registration lists it (sizes and etags or mtimes: the content hash
  is a hash of that listing, so nothing is downloaded to compute it), counts images per class and split from the
  listing, and downloads only DATASET_SAMPLE_PER_CLASS images per class into a temporary folder, where core's
  `inspect_dataset` checks that they decode (the report says it was sampled and names the corrupt files it found).

Workers read a `file://` source in place; other URLs are synced once per worker into its dataset cache
(`worker.paths.dataset_cache_dir()/<hash>/`, or `<hash>.zip` for a zip), after checking that the listing still has
the registered hash. Credentials and endpoints come from the environment, as fsspec and botocore read them
(`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, ...).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from core.data.cache_budget import touch
from core.data.defaults import FEW_IMAGES_WARNING, IMBALANCE_WARNING_RATIO, SPLIT_FOLDER_NAMES
from worker.artifacts import DATASET_REF_PREFIX, ArtifactStore
from worker.caches import make_download_room
from worker.defaults import DATASET_SAMPLE_PER_CLASS, DATASET_SAMPLE_THREADS
from worker.diskspace import low_disk
from worker.errors import ArtifactError, DatasetError
from worker.paths import dataset_cache_dir

UPLOAD = "upload"
IN_PLACE = "in_place"
SOURCE_KINDS = (UPLOAD, IN_PLACE)
"""How a version's files are kept: uploaded into the artifact store, or read where they are."""

_TAG_FIELDS = ("ETag", "etag", "md5", "mtime", "LastModified", "last_modified", "CRC", "created")
"""Listing fields that change when a file's content does (the first present one is used)."""


@dataclasses.dataclass(frozen=True)
class Scanned:
    """What registration learnt about a source: the fields a version records besides its name and number."""

    source: str
    kind: str
    hash: str
    bytes: int
    report: dict[str, Any]
    """The health report (core.data.inspect_dataset's keys, without thumbnails; `sampled` for in-place sources)."""
    origin: str
    """What the user gave (a local path for an upload, the URL itself otherwise)."""


def is_url(text: str) -> bool:
    return "://" in text


def normalized_url(url: str) -> str:
    """The URL as recorded: no trailing slash (s3://b/p/ and s3://b/p are one source)."""
    return url.rstrip("/") if not url.endswith(":///") else url


def local_path_of(url: str) -> Path | None:
    """The path of a `file://` URL (read in place by workers on the same shared file system), else None."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    return Path(unquote(parts.path))


def job_data_path(source: str) -> str:
    """What a job's `data.path` holds for a version of this source: the `artifact:` ref, the local path of a
    `file://` URL (core reads it as any path), or the URL (the worker syncs it down: `fetch`)."""
    local = local_path_of(source)
    return str(local) if local is not None else source


def needs_fetch(data_path: str) -> bool:
    """Whether a job's data.path must be turned into a local path by the worker (`fetch`) before training."""
    return str(data_path).startswith(DATASET_REF_PREFIX) or is_url(str(data_path))


# ----------------------------------------------------------------------------------------------------- listing
@dataclasses.dataclass(frozen=True)
class _Listing:
    """Files under an in-place source: relative POSIX path → (size, change tag), and how to read them."""

    fs: Any
    root: str
    files: dict[str, tuple[int, str]]
    zip_info: tuple[int, str] | None = None
    """A .zip source: the zip's own (size, tag), which its hash covers."""

    def remote(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.zip_info is None else rel


def _tag(info: dict[str, Any]) -> str:
    for field in _TAG_FIELDS:
        if info.get(field) not in (None, ""):
            return str(info[field])
    return ""


def _connect(url: str) -> tuple[Any, str]:
    import fsspec

    try:  # a fresh instance: fsspec's cache ignores the environment, where endpoints and credentials come from
        return fsspec.core.url_to_fs(url, skip_instance_cache=True)
    except (ImportError, ValueError) as err:
        raise DatasetError(f"cannot read {url}: {err}") from None
    except Exception as err:  # noqa: BLE001 — a back-end that connects when made (ftp, sftp, ...) raises its own
        raise _unreachable(url, err) from None


def _unreachable(url: str, err: BaseException) -> DatasetError:
    return DatasetError(f"cannot list {url}: {type(err).__name__}: {err} (is the URL right, the endpoint reachable, "
                        "and are the credentials in the environment?)")


def list_source(url: str) -> _Listing:
    """List an in-place source (one request per page of a bucket listing; no file is opened except a zip's
    directory). DatasetError when it cannot be reached or holds no files."""
    fs, root = _connect(url)
    root = root.rstrip("/")
    scheme = urlsplit(url).scheme
    try:
        if root.lower().endswith(".zip"):
            info = fs.info(root)
            if info.get("type") == "directory":
                raise DatasetError(f"{url} is a folder whose name ends in .zip; rename it or give a .zip file")
            import fsspec

            zfs = fsspec.filesystem("zip", fo=fs.open(root, "rb"))
            files = {name: (int(i.get("size") or 0), _tag(i))
                     for name, i in zfs.find("", detail=True).items() if i.get("type") != "directory"}
            listing = _Listing(zfs, "", files, zip_info=(int(info.get("size") or 0), _tag(info)))
        else:
            if scheme in ("http", "https"):
                raise DatasetError(f"{url}: an http(s) source must be a .zip (HTTP has no folder listing)")
            found = fs.find(root, detail=True)
            if not found and fs.isfile(root):
                raise DatasetError(f"{url} is a file, not a folder of class folders or a .zip")
            if not found and not fs.exists(root):
                raise FileNotFoundError(root)
            files = {}
            for path, i in found.items():
                if i.get("type") == "directory":
                    continue
                rel = path[len(root):].lstrip("/") if path.startswith(root) else PurePosixPath(path).name
                files[rel] = (int(i.get("size") or 0), _tag(i))
            listing = _Listing(fs, root, files)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{url}: nothing there (no such bucket, prefix, folder or file)") from None
    except Exception as err:  # noqa: BLE001 — fsspec back-ends raise their own (botocore, aiohttp, OSError, ...)
        raise _unreachable(url, err) from None
    if not listing.files:
        raise DatasetError(f"{url} holds no files (an empty prefix or folder); point at the folder of class folders")
    return listing


def listing_hash(listing: _Listing) -> str:
    """sha256 over the sorted (relative path, size, change tag) lines: equal when no file was added, removed or
    rewritten (an etag or mtime changes with the content), computed without reading any file."""
    h = hashlib.sha256()
    if listing.zip_info is not None:
        h.update(f"zip\t{listing.zip_info[0]}\t{listing.zip_info[1]}\n".encode())
    else:
        for rel in sorted(listing.files):
            size, tag = listing.files[rel]
            h.update(f"{rel}\t{size}\t{tag}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ layout
def _ignored(rel: str) -> bool:
    from core.data.archive import is_ignored_part

    return any(is_ignored_part(part) for part in rel.split("/"))


def _is_image(rel: str) -> bool:
    from core.data.archive import is_image_name

    return is_image_name(rel)


@dataclasses.dataclass
class _Layout:
    """Images by (split or None, class), as core's scan would group them (its rules: core/data/imagefolder.py)."""

    images: dict[tuple[str | None, str], list[str]]
    loose: int
    ignored: int


def _layout(files: list[str]) -> _Layout:
    """Group listed files the way core's imagefolder scan does: descend single wrapping folders, then split folders
    (train/val/test) or class folders; images anywhere below a class folder. Refusals are left to core's scan of
    the sample, so they read exactly as submission's."""
    visible = [f for f in files if not _ignored(f)]
    prefix: list[str] = []
    for _ in range(32):
        depth = len(prefix)
        below = [f.split("/") for f in visible if f.split("/")[:depth] == prefix]
        dirs = {p[depth] for p in below if len(p) > depth + 1}
        here_images = any(len(p) == depth + 1 and _is_image(p[-1]) for p in below)
        if len(dirs) != 1 or here_images:
            break
        (only,) = dirs
        if only.lower() in SPLIT_FOLDER_NAMES or not any(len(p) > depth + 2 for p in below if p[depth] == only):
            break
        prefix.append(only)
    depth = len(prefix)
    rows = [f.split("/")[depth:] for f in visible if f.split("/")[:depth] == prefix]
    split_mode = any(len(r) > 1 and r[0].lower() in SPLIT_FOLDER_NAMES for r in rows)
    images: dict[tuple[str | None, str], list[str]] = {}
    loose = ignored = 0
    for rel, parts in zip(["/".join(prefix + r) for r in rows], rows):
        if split_mode and len(parts) > 1 and parts[0].lower() in SPLIT_FOLDER_NAMES:
            split: str | None = SPLIT_FOLDER_NAMES[parts[0].lower()]
            parts = parts[1:]
        else:
            split = None
        if len(parts) < 2:
            loose += 1
        elif not _is_image(parts[-1]):
            ignored += 1
        else:
            images.setdefault((split, parts[0]), []).append(rel)
    return _Layout(images, loose, ignored)


def _spread(items: list[str], n: int) -> list[str]:
    """n items spread evenly over the sorted list, first and last included (a corrupt stretch anywhere, or a
    truncated last upload, has a chance to be seen)."""
    items = sorted(items)
    if len(items) <= n:
        return items
    if n == 1:
        return items[:1]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


# ------------------------------------------------------------------------------------------------------ checks
def _inspect(path: Path | str, shown_as: str | None = None, *, color_mode: str, max_image_pixels: int
             ) -> dict[str, Any]:
    """core's health report without thumbnails; DataError → DatasetError, naming `shown_as` instead of a temp path."""
    from core.data import inspect_dataset
    from core.errors import DataError

    try:
        report = inspect_dataset(path, color_mode=color_mode, max_image_pixels=max_image_pixels,
                                 thumbnails_per_class=0)
    except DataError as err:
        message = str(err) if shown_as is None else str(err).replace(str(path), shown_as)
        raise DatasetError(message) from None
    report.pop("thumbnails", None)
    if shown_as is not None:
        report["path"] = shown_as
    return report


def scan_upload(path: Path, store: ArtifactStore, *, color_mode: str, max_image_pixels: int) -> Scanned:
    """Check a local folder or zip in full, then upload it (nothing is uploaded when the check refuses)."""
    if not path.exists():
        raise DatasetError(f"{str(path)!r} does not exist; give a folder or .zip of class folders, or a URL "
                           "(s3://..., file:///...)")
    full = low_disk(store)  # checked before the zip is extracted for its check or uploaded
    if full:
        raise DatasetError(full)
    try:
        report = _inspect(path, color_mode=color_mode, max_image_pixels=max_image_pixels)
    except DatasetError:
        if path.is_file():  # a refused zip leaves no extraction behind
            from core.data.archive import remove_extraction

            remove_extraction(path)
        raise
    try:
        stored = store.upload_dataset(path)
    except ArtifactError as err:
        raise DatasetError(str(err)) from None
    return Scanned(source=stored["ref"], kind=UPLOAD, hash=stored["sha256"], bytes=int(stored["bytes"]),
                   report=report, origin=str(path))


def scan_stored(ref: str, store: ArtifactStore, *, color_mode: str, max_image_pixels: int) -> Scanned:
    """Register a dataset already in the artifact store (`artifact:datasets/<sha>.zip`, e.g. a job's upload)."""
    try:
        local = store.fetch_dataset(ref)
    except ArtifactError as err:
        raise DatasetError(str(err)) from None
    report = _inspect(local, ref, color_mode=color_mode, max_image_pixels=max_image_pixels)
    sha = ref.rsplit("/", 1)[-1].removesuffix(".zip")
    return Scanned(source=ref, kind=UPLOAD, hash=sha, bytes=local.stat().st_size, report=report, origin=ref)


def scan_in_place(url: str, *, color_mode: str, max_image_pixels: int,
                  per_class: int = DATASET_SAMPLE_PER_CLASS) -> Scanned:
    """List the source, download a bounded sample per class into a temporary folder, check it with core's scan."""
    url = normalized_url(url)
    listing = list_source(url)
    layout = _layout(list(listing.files))
    if not layout.images:
        raise DatasetError(f"{url}: no class folders with images found ({len(listing.files)} file(s) listed, "
                           f"{layout.loose} outside any folder); put the images in one folder per class")
    from core.data.imagefolder import too_many_classes  # (imports torchvision: only when a URL is scanned)

    refusal = too_many_classes(len({name for _, name in layout.images}), url)  # before sampling every class
    if refusal:
        raise DatasetError(refusal)
    sample = [rel for rels in layout.images.values() for rel in _spread(rels, per_class)]
    with tempfile.TemporaryDirectory(prefix="dataset-sample-") as tmp:
        _download(listing, sample, Path(tmp), url)
        report = _inspect(Path(tmp), url, color_mode=color_mode, max_image_pixels=max_image_pixels)
    return Scanned(source=url, kind=IN_PLACE, hash=listing_hash(listing),
                   bytes=listing.zip_info[0] if listing.zip_info else sum(s for s, _ in listing.files.values()),
                   report=_full_counts(report, layout, len(sample)), origin=url)


def _download(listing: _Listing, rels: list[str], dest: Path, url: str) -> None:
    """Copy the listed files `rels` into `dest` (same relative paths), a few at a time."""
    def one(rel: str) -> None:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        listing.fs.get_file(listing.remote(rel), str(target))

    try:
        with ThreadPoolExecutor(DATASET_SAMPLE_THREADS) as pool:
            list(pool.map(one, rels))
    except Exception as err:  # noqa: BLE001 — as in list_source: each back-end has its own errors
        raise DatasetError(f"cannot download from {url}: {type(err).__name__}: {err}") from None


def _full_counts(report: dict[str, Any], layout: _Layout, sampled: int) -> dict[str, Any]:
    """The sample's report with the listing's counts (every image, not only those sampled) and the warnings that
    depend on them recomputed; `sampled` says how much was decoded."""
    classes = list(report["classes"])
    counts = Counter({c: 0 for c in classes})
    by_split: dict[str, dict[str, int]] = {s: {c: 0 for c in classes} for s in report.get("splits_found") or []}
    for (split, cls), rels in layout.images.items():
        counts[cls] += len(rels)
        if split is not None and split in by_split:
            by_split[split][cls] = by_split[split].get(cls, 0) + len(rels)
    counts_out = {c: counts[c] for c in classes}
    smallest, largest = min(counts_out.values()), max(counts_out.values())
    imbalance = round(largest / max(smallest, 1), 2)
    warnings = [w for w in report.get("warnings") or []
                if "imbalanced" not in w and "fewer than" not in w and "are ignored" not in w]
    if imbalance > IMBALANCE_WARNING_RATIO:
        warnings.append(f"classes are imbalanced: the largest has {imbalance}x the images of the smallest")
    few = [c for c, n in counts_out.items() if n < FEW_IMAGES_WARNING]
    if few:
        warnings.append(f"{len(few)} class(es) have fewer than {FEW_IMAGES_WARNING} images: {', '.join(few[:10])}"
                        + (" ..." if len(few) > 10 else ""))
    if layout.ignored:
        warnings.append(f"{layout.ignored} non-image file(s) inside class folders are ignored")
    if layout.loose:
        warnings.append(f"{layout.loose} file(s) outside class folders are ignored")
    total = sum(counts_out.values())
    warnings.append(f"sampled: {sampled} of {total} images were decoded at registration; the rest are checked when "
                    "the dataset is read in full")
    return {**report, "counts": counts_out, "counts_by_split": by_split, "num_images": total,
            "imbalance_ratio": imbalance, "warnings": warnings,
            "sampled": {"images": sampled, "of": total, "per_class": DATASET_SAMPLE_PER_CLASS}}


# ------------------------------------------------------------------------------------------------ worker side
def fetch(store: ArtifactStore, data_path: str, expected_hash: str | None, *, what: str = "") -> Path:
    """The local path a training process reads for a job's data.path (`needs_fetch`): an `artifact:` ref through
    the artifact store; another URL synced once into this machine's dataset cache, keyed by the version's hash,
    after checking that the source still lists with that hash. ArtifactError when it cannot be read or changed."""
    if data_path.startswith(DATASET_REF_PREFIX):
        return store.fetch_dataset(data_path)
    local = local_path_of(data_path)
    if local is not None:
        return local
    label = what or data_path
    try:
        listing = list_source(data_path)
    except DatasetError as err:
        raise ArtifactError(f"dataset {label}: {err}") from None
    digest = listing_hash(listing)
    if expected_hash and digest != expected_hash:
        raise ArtifactError(f"dataset {label}: {data_path} changed since it was registered (its listing no longer "
                            "matches the recorded hash); register it again as a new version")
    cache = dataset_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / (f"{digest}.zip" if listing.zip_info else digest)
    if target.exists() and touch(target):  # the LRU clock of the download cache
        return target
    tmp = cache / f"{target.name}.part{os.getpid()}"
    _remove(tmp)  # left by a process of this pid that died mid-sync
    need = listing.zip_info[0] if listing.zip_info else sum(size for size, _tag in listing.files.values())
    make_download_room(need, keep=target)  # DOWNLOAD_CACHE_GB
    try:
        if listing.zip_info:
            fs, root = _connect(data_path)
            fs.get_file(root, str(tmp))
        else:
            wanted = [rel for rel in listing.files if not _ignored(rel)]
            _download(listing, wanted, tmp, data_path)
        os.rename(tmp, target)  # atomic; another worker of this machine may have won the race
    except OSError:
        if not target.exists():
            raise
    except DatasetError as err:
        raise ArtifactError(f"dataset {label}: {err}") from None
    finally:
        _remove(tmp)
    return target


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
