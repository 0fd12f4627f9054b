"""Safe extraction of dataset zips into a content-addressed cache.

Why extract rather than read from the zip: training opens each image once per epoch from several DataLoader workers
(and several ranks); plain files need no per-worker zip handles and decode as fast as the disk allows.

Where: ``$DATA_CACHE_DIR/<sha256 of the zip, 16 hex>/`` (default: defaults.EXTRACTION_CACHE under the repository's
``var/``).
Nothing else is written. The same zip is extracted once: a finished extraction is marked by a ``.complete`` file
(holding its byte count) and reused; extraction happens in a temporary sibling folder renamed into place, so
concurrent ranks never see half a tree. The cache keeps to EXTRACT_CACHE_GB (core/data/cache_budget.py): before a
zip is extracted, the least recently used extractions are removed to make room, except those a running training
process holds (`extract_zip(..., hold=True)`: a shared lock for the process's life).

What is refused (DataError naming the entry): absolute paths, drive letters, ``..`` components, symlinks, encrypted
entries, more than ZIP_MAX_FILES entries, more than ZIP_MAX_TOTAL_BYTES uncompressed (declared sizes are checked
before extracting and actual bytes while extracting). Entries that are hidden, under ``__MACOSX/`` or not images are
simply not extracted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from core.data import cache_budget
from core.data.defaults import (
    CACHE_DIR_ENV,
    EXTRACT_CACHE_GB_DEFAULT,
    EXTRACT_CACHE_GB_ENV,
    EXTRACTION_CACHE,
    IMAGE_EXTENSIONS,
    REPO_ROOT,
    VAR_DIR,
    ZIP_MAX_FILES,
    ZIP_MAX_TOTAL_BYTES,
)
from core.errors import DataError

_COMPLETE_MARKER = ".complete"
ZIP_ERRORS_FILE = ".zip-errors.json"
"""Hidden file in an extraction folder listing entries that could not be decompressed."""
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The folder zips are extracted into: $DATA_CACHE_DIR, else EXTRACTION_CACHE under the repository's var/."""
    return Path(os.environ.get(CACHE_DIR_ENV) or REPO_ROOT / VAR_DIR / EXTRACTION_CACHE)


def is_ignored_part(name: str) -> bool:
    """Hidden files and folders (".x", including AppleDouble "._x") and macOS's __MACOSX folder are never data."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_entry(info: zipfile.ZipInfo, zip_path: Path) -> None:
    """Refuse entries that could write outside the extraction folder or are not plain files/folders."""
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"zip {str(zip_path)!r}: entry {name!r} has an absolute path; refusing to extract this zip")
    if ".." in parts:
        raise DataError(f"zip {str(zip_path)!r}: entry {name!r} contains '..'; refusing to extract this zip")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataError(f"zip {str(zip_path)!r}: entry {name!r} is a symbolic link; refusing to extract this zip")
    if info.flag_bits & 0x1:
        raise DataError(f"zip {str(zip_path)!r}: entry {name!r} is encrypted; re-create the zip without a password")


def _wanted(name: str) -> bool:
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    return bool(parts) and not name.endswith("/") and not any(is_ignored_part(p) for p in parts) \
        and is_image_name(parts[-1])


def extraction_folder(zip_path: Path) -> Path:
    """Where `extract_zip` puts (or has put) this zip's content: one folder per content hash in the cache."""
    return cache_dir() / _sha256(zip_path)[:16]


def remove_extraction(zip_path: Path) -> None:
    """Delete this zip's extraction from the cache (a refused upload leaves nothing behind); missing is fine."""
    try:
        shutil.rmtree(extraction_folder(zip_path), ignore_errors=True)
    except OSError:
        pass


def extraction_bytes(folder: Path) -> int:
    """Bytes of an extraction: the count its marker holds, else (an older or unfinished one) a walk."""
    try:
        return int((folder / _COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return cache_budget.folder_bytes(folder)


def extraction_entries() -> list[cache_budget.CacheEntry]:
    """The extraction cache's entries (for its budget and `python -m worker storage`)."""
    return cache_budget.entries(cache_dir(), extraction_bytes)


def extraction_budget() -> int:
    """EXTRACT_CACHE_GB in bytes (DataError when it is not a positive number)."""
    return cache_budget.budget_bytes(EXTRACT_CACHE_GB_ENV, EXTRACT_CACHE_GB_DEFAULT)


def extract_zip(zip_path: Path, *, hold: bool = False) -> Path:
    """Extract the image entries of `zip_path` into the cache (once per content) and return that folder. With `hold`
    this process holds it until it ends (a training process: no eviction removes it under the job)."""
    for _ in range(3):  # an eviction may remove the folder between its extraction and our hold: extract it again
        target = _extract_zip(zip_path)
        if not hold or cache_budget.hold(target):
            return target
    raise DataError(f"zip {str(zip_path)!r}: its extraction in {str(cache_dir())!r} keeps being removed (is "
                    f"{EXTRACT_CACHE_GB_ENV} smaller than the jobs running at once need?)")


def _extract_zip(zip_path: Path) -> Path:
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"data.path {str(zip_path)!r} is not a readable zip file: {err}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > ZIP_MAX_FILES:
            raise DataError(f"zip {str(zip_path)!r} has {len(infos)} entries, more than the limit of {ZIP_MAX_FILES}")
        for info in infos:
            _check_entry(info, zip_path)
        declared = sum(info.file_size for info in infos)
        if declared > ZIP_MAX_TOTAL_BYTES:
            raise DataError(f"zip {str(zip_path)!r} expands to {declared} bytes, more than the limit of "
                            f"{ZIP_MAX_TOTAL_BYTES} bytes")
        target = extraction_folder(zip_path)
        if (target / _COMPLETE_MARKER).is_file() and cache_budget.touch(target):  # the LRU clock
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        wanted = [i for i in infos if _wanted(i.filename)]
        cache_budget.make_room(extraction_entries(), budget=extraction_budget(),
                               need=sum(i.file_size for i in wanted), keep=target)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            written = _extract_members(zf, wanted, tmp, zip_path)
            _make_folders(infos, tmp)
            (tmp / _COMPLETE_MARKER).write_text(f"{written}\n", encoding="utf-8")
            if target.exists():  # a stale half-extraction, or another process finished first
                if (target / _COMPLETE_MARKER).is_file():
                    return target
                shutil.rmtree(target, ignore_errors=True)
            try:
                tmp.rename(target)
            except OSError:
                if not (target / _COMPLETE_MARKER).is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _make_folders(infos: list[zipfile.ZipInfo], dest: Path) -> None:
    """Create every visible folder of the zip, also those left without an image (an empty class folder, one holding
    only non-image files): the scan then refuses such a class by name, as it does for an unzipped folder, instead of
    the class silently vanishing."""
    root = dest.resolve()
    for info in infos:
        parts = [p for p in info.filename.replace("\\", "/").split("/") if p]
        folder = parts if info.filename.endswith("/") else parts[:-1]
        if not folder or any(is_ignored_part(p) for p in folder):
            continue
        out = (dest / "/".join(folder)).resolve()
        if root in out.parents:  # entries were checked already; belt and braces
            out.mkdir(parents=True, exist_ok=True)


def _extract_members(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], dest: Path, zip_path: Path) -> int:
    """Copy entries by hand (not ZipFile.extract) so names are checked by us and actual bytes are counted.

    A damaged entry (bad CRC, broken deflate stream) is not extracted; it is recorded in ZIP_ERRORS_FILE so the image
    scan lists it in skipped_files like any other unreadable image. Returns the bytes written.
    """
    dest.mkdir(parents=True)
    root = dest.resolve()
    written = 0
    damaged: list[dict[str, str]] = []
    for info in infos:
        out = (dest / info.filename.replace("\\", "/")).resolve()
        if root not in out.parents:  # belt and braces after _check_entry
            raise DataError(f"zip {str(zip_path)!r}: entry {info.filename!r} would land outside the extraction folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with zf.open(info) as src, out.open("wb") as dst:
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    if written > ZIP_MAX_TOTAL_BYTES:
                        raise DataError(f"zip {str(zip_path)!r} expands to more than {ZIP_MAX_TOTAL_BYTES} bytes "
                                        f"(at entry {info.filename!r})")
                    dst.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
            out.unlink(missing_ok=True)
            damaged.append({"file": info.filename, "reason": f"damaged zip entry: {err}"})
        except OSError as err:
            raise DataError(f"could not extract {info.filename!r} from zip {str(zip_path)!r} into {str(dest)!r}: "
                            f"{err}") from None
    (dest / ZIP_ERRORS_FILE).write_text(json.dumps(damaged), encoding="utf-8")
    return written


def zip_errors(extracted: Path) -> list[dict[str, str]]:
    """The damaged entries recorded when `extracted` was made (file names relative to the zip's root)."""
    path = extracted / ZIP_ERRORS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
