"""Uploaded dataset zips: size cap, saving under a name the program chooses, and core's health report.

`check_upload(data, ...)` is the dashboard's upload/validation function: it refuses a bad upload with the reason
(too big, not a zip, unsafe entries, one class, an empty class, unreadable images: core.data's DataError messages)
and otherwise returns the saved path and the health report shown before submitting. The browser's file name is
never used for anything but display: the file is saved as `<var>/uploads/<sha256>.zip`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import zipfile
from pathlib import Path
from typing import Any

from app.defaults import UPLOAD_MAX_MB, UPLOAD_MAX_MB_ENV, UPLOADS_KEEP_SECONDS


class UploadError(ValueError):
    """An upload that cannot be used; the message says why, for the user."""


@dataclasses.dataclass
class CheckedUpload:
    sha256: str
    path: Path
    bytes: int
    report: dict[str, Any]


def max_upload_mb() -> int:
    """The dataset upload cap in MB: env DASHBOARD_MAX_UPLOAD_MB, else UPLOAD_MAX_MB."""
    raw = os.environ.get(UPLOAD_MAX_MB_ENV, "").strip()
    try:
        value = int(float(raw)) if raw else UPLOAD_MAX_MB
    except ValueError:
        return UPLOAD_MAX_MB
    return value if value > 0 else UPLOAD_MAX_MB


def uploads_dir() -> Path:
    from worker.api import var_dir

    return var_dir() / "uploads"


def save_upload(data: bytes, *, max_bytes: int | None = None) -> tuple[str, Path]:
    """Write the bytes as uploads/<sha256>.zip (once per content); (sha, path). UploadError when too big / not a zip."""
    limit = max_bytes if max_bytes is not None else max_upload_mb() * 1_000_000
    if len(data) > limit:
        raise UploadError(f"the file is {len(data) / 1e6:.1f} MB; the limit is {limit / 1e6:.0f} MB "
                          f"(set {UPLOAD_MAX_MB_ENV}, or submit big datasets with `python -m worker submit`)")
    if not data:
        raise UploadError("the file is empty")
    sha = hashlib.sha256(data).hexdigest()
    folder = uploads_dir()
    folder.mkdir(parents=True, exist_ok=True)
    _prune(folder)
    path = folder / f"{sha}.zip"
    if not path.is_file():
        tmp = folder / f".{sha}.{os.getpid()}.part"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    if not zipfile.is_zipfile(path):
        path.unlink(missing_ok=True)
        raise UploadError("the file is not a .zip archive (zip a folder holding one sub-folder per class)")
    return sha, path


def _prune(folder: Path) -> None:
    cutoff = time.time() - UPLOADS_KEEP_SECONDS
    for old in folder.glob("*.zip"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            continue


def inspect_upload(path: Path, *, color_mode: str = "RGB", max_image_pixels: int | None = None,
                   thumbnails_per_class: int = 4, display_name: str = "the upload") -> dict[str, Any]:
    """core's dataset health report for a saved upload; UploadError with core's reason when it is unusable (the
    server-side path in core's message is replaced by `display_name`)."""
    from core.data import inspect_dataset
    from core.errors import DataError

    kwargs: dict[str, Any] = {"color_mode": color_mode, "thumbnails_per_class": thumbnails_per_class}
    if max_image_pixels:
        kwargs["max_image_pixels"] = max_image_pixels
    try:
        return inspect_dataset(path, **kwargs)
    except DataError as err:
        raise UploadError(str(err).replace(str(path), display_name)) from None


def check_upload(data: bytes, *, color_mode: str = "RGB", max_image_pixels: int | None = None,
                 max_bytes: int | None = None, thumbnails_per_class: int = 4,
                 display_name: str = "the upload") -> CheckedUpload:
    """Save and inspect an uploaded dataset zip; UploadError with the reason when it cannot be trained on."""
    sha, path = save_upload(data, max_bytes=max_bytes)
    try:
        report = inspect_upload(path, color_mode=color_mode, max_image_pixels=max_image_pixels,
                                thumbnails_per_class=thumbnails_per_class, display_name=display_name)
    except UploadError:
        from core.data.archive import remove_extraction

        remove_extraction(path)  # nothing will be submitted from it: neither the zip nor its extraction stays
        path.unlink(missing_ok=True)
        raise
    return CheckedUpload(sha256=sha, path=path, bytes=len(data), report=report)
