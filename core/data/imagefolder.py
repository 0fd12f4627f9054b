"""Scanning an imagefolder dataset (a folder or .zip of one folder per class): the one place that decides which
files are images, which classes exist and which files are skipped. build_datasets and inspect_dataset both call
`scan_imagefolder`, so they accept and refuse exactly the same datasets with the same messages.

Layout rules:
- A single wrapping folder (one visible sub-folder that itself holds folders) is descended into, repeatedly.
- Top-level folders named train / val (valid, validation) / test mark a pre-split tree: each holds class folders.
  Mixing split folders with other folders is an error; so is val/ or test/ without train/.
- Images are found recursively inside each class folder. Hidden files and folders (".x"), ``__MACOSX/`` and files
  whose suffix (any letter case) is not png, jpg, jpeg, bmp, gif, webp, tif or tiff are ignored; symlinked folders
  are not followed.
- Each image is opened, verified and fully decoded once here (JPEGs at reduced DCT scale, which still reads every
  byte); empty, truncated, corrupt and oversized (> max_image_pixels) files go to `skipped` with a reason.
- Fewer than two classes, or a class without a readable image (in train/ for a pre-split tree), is a DataError.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from core.data import cache_budget
from core.data.archive import extract_zip, is_ignored_part, is_image_name, zip_errors
from core.data.defaults import MAX_CLASSES, SCAN_THREADS, SPLIT_FOLDER_NAMES
from core.data.transforms import to_color_mode
from core.errors import DataError


@dataclass(frozen=True)
class ImageRecord:
    """One readable image: `rel` is its path relative to the dataset path the user gave (or the zip's root)."""

    rel: str
    path: str
    label: int
    split: str | None
    size: tuple[int, int]
    mode: str


@dataclass
class FolderScan:
    """The outcome of a scan: classes in label order, readable images, skipped files and what was ignored."""

    source: str
    classes: list[str]
    records: list[ImageRecord]
    skipped: list[dict[str, str]]
    splits_found: list[str]
    ignored_files: int = 0
    """Visible non-image files inside class folders."""
    loose_files: int = 0
    """Files next to the class (or split) folders rather than inside one."""


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not is_ignored_part(e.name)), key=lambda e: e.name)
    except OSError as err:
        raise DataError(f"cannot list folder {str(folder)!r}: {err}") from None


def _is_dir(entry: os.DirEntry) -> bool:
    return entry.is_dir(follow_symlinks=False)


def _find_root(base: Path) -> Path:
    """Descend through single wrapping folders (a folder whose only visible child is a folder of folders)."""
    current = base
    for _ in range(32):
        entries = _visible_entries(current)
        dirs = [e for e in entries if _is_dir(e)]
        has_images = any(e.is_file() and is_image_name(e.name) for e in entries)
        if len(dirs) != 1 or has_images or dirs[0].name.lower() in SPLIT_FOLDER_NAMES:
            return current
        if not any(_is_dir(e) for e in _visible_entries(Path(dirs[0].path))):
            return current  # the only child is a class folder: a one-class dataset, reported below
        current = Path(dirs[0].path)
    return current


def _walk_images(folder: Path) -> tuple[list[Path], int]:
    """Image files under `folder` (recursive, sorted) and the number of other visible files ignored."""
    images: list[Path] = []
    ignored = 0
    stack = [folder]
    while stack:
        for entry in _visible_entries(stack.pop()):
            if _is_dir(entry):
                stack.append(Path(entry.path))
            elif entry.is_file():
                if is_image_name(entry.name):
                    images.append(Path(entry.path))
                else:
                    ignored += 1
    return sorted(images), ignored


def probe_image(path: str, max_image_pixels: int, color_mode: str) -> tuple[tuple[int, int], str] | str:
    """(size, mode) when the file is a readable image convertible to `color_mode`, else why it is skipped.

    Never raises: one bad file must not stop a scan of thousands.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            size, mode = img.size, img.mode
            pixels = size[0] * size[1]
            if pixels > max_image_pixels:
                return (f"image is {size[0]}x{size[1]} = {pixels} pixels, more than data.max_image_pixels="
                        f"{max_image_pixels} (decompression-bomb guard)")
            img.verify()
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft(img.mode, (1, 1))  # decode at 1/8 scale: every byte is still read
                img.load()
                if img.width == 0 or img.height == 0:
                    return "image has zero width or height"
                to_color_mode(img, color_mode)
        return size, mode
    except Image.DecompressionBombError as err:
        return f"decompression-bomb guard: {err}"
    except Exception as err:  # noqa: BLE001 — Pillow raises OSError, SyntaxError, struct.error, ... for broken files
        return f"unreadable image ({type(err).__name__}: {err})"


def _resolve(path: str | Path, hold: bool = False) -> tuple[Path, list[dict[str, str]]]:
    """The folder to scan (extracting a zip into the cache) and entries already known to be damaged. With `hold`
    this process holds what it reads (the extraction, or the folder, which may be an entry of a worker's download
    cache) until it ends, so no cache eviction removes it meanwhile (core/data/cache_budget.py)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path {str(path)!r} does not exist; imagefolder needs a folder or a .zip of class folders")
    if p.is_dir():
        if hold:
            cache_budget.hold(p)
        return p, []
    if p.suffix.lower() != ".zip":
        raise DataError(f"data.path {str(path)!r} is a file but not a .zip; imagefolder needs a folder or a .zip "
                        "of class folders")
    if hold:
        cache_budget.hold(p)  # a downloaded zip stays until its extraction is held too
    extracted = extract_zip(p, hold=hold)
    return extracted, zip_errors(extracted)


def _class_folders(root: Path, source: str) -> tuple[dict[str | None, dict[str, Path]], int]:
    """{split or None: {class name: folder}} and the number of loose files (not inside a class folder)."""
    entries = _visible_entries(root)
    dirs = [e for e in entries if _is_dir(e)]
    loose = sum(1 for e in entries if e.is_file())
    split_dirs = [e for e in dirs if e.name.lower() in SPLIT_FOLDER_NAMES]
    if not split_dirs:
        return {None: {e.name: Path(e.path) for e in dirs}}, loose
    others = [e.name for e in dirs if e.name.lower() not in SPLIT_FOLDER_NAMES]
    if others:
        raise DataError(f"imagefolder {source!r}: mixes split folders ({', '.join(e.name for e in split_dirs)}) "
                        f"with other folders ({', '.join(others)}); use either class folders or train/ val/ test/ "
                        "folders each holding class folders")
    layout: dict[str | None, dict[str, Path]] = {}
    names: dict[str, str] = {}
    for e in split_dirs:
        split = SPLIT_FOLDER_NAMES[e.name.lower()]
        if split in layout:
            raise DataError(f"imagefolder {source!r}: both {names[split]!r} and {e.name!r} are {split} folders; "
                            "keep one")
        names[split] = e.name
        sub = _visible_entries(Path(e.path))
        loose += sum(1 for s in sub if s.is_file())
        layout[split] = {s.name: Path(s.path) for s in sub if _is_dir(s)}
    if "train" not in layout:
        raise DataError(f"imagefolder {source!r}: has {', '.join(names.values())} folder(s) but no train/ folder; "
                        "add train/ (with one folder per class) or use plain class folders")
    return layout, loose


def too_many_classes(n: int, source: str) -> str | None:
    """Why a dataset of `n` classes is refused (over MAX_CLASSES), or None."""
    if n <= MAX_CLASSES:
        return None
    return (f"imagefolder {source!r}: {n:,} class folders; at most {MAX_CLASSES:,} classes can be trained "
            "(core.data.defaults.MAX_CLASSES)")


def scan_imagefolder(path: str | Path, *, max_image_pixels: int, color_mode: str = "RGB",
                     hold: bool = False) -> FolderScan:
    """Find classes and validate every image once; raises DataError for datasets that cannot be trained on. `hold`:
    a training process keeps what it reads from the caches' evictions (see `_resolve`)."""
    source = str(path)
    base, skipped = _resolve(path, hold)
    root = _find_root(base)
    layout, loose = _class_folders(root, source)
    classes = sorted({name for folders in layout.values() for name in folders})
    if len(classes) < 2:
        found = f"{len(classes)} class folder" + ("" if len(classes) == 1 else "s")
        listed = f" ({', '.join(classes)})" if classes else ""
        raise DataError(f"imagefolder {source!r}: found {found}{listed}; need at least two folders of images, "
                        "one per class")
    refusal = too_many_classes(len(classes), source)
    if refusal:
        raise DataError(refusal)
    label_of = {name: i for i, name in enumerate(classes)}
    candidates: list[tuple[str, str, int, str | None]] = []
    ignored = 0
    for split, folders in layout.items():
        for name, folder in folders.items():
            files, n_ignored = _walk_images(folder)
            ignored += n_ignored
            candidates += [(f.relative_to(base).as_posix(), str(f), label_of[name], split) for f in files]
    threads = max(1, min(SCAN_THREADS, (os.cpu_count() or 1) * 2, len(candidates)))
    with warnings.catch_warnings(), ThreadPoolExecutor(threads) as pool:
        # Our own max_image_pixels check replaces Pillow's warning (the filter is set here, not in the threads).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = list(pool.map(lambda c: probe_image(c[1], max_image_pixels, color_mode), candidates))
    records: list[ImageRecord] = []
    train_split = "train" if "train" in layout else None
    skipped_in_train: dict[int, list[dict[str, str]]] = {}
    for (rel, abs_path, label, split), result in zip(candidates, results):
        if isinstance(result, str):
            skipped.append({"file": rel, "reason": result})
            if split == train_split:
                skipped_in_train.setdefault(label, []).append(skipped[-1])
        else:
            records.append(ImageRecord(rel, abs_path, label, split, result[0], result[1]))
    skipped.sort(key=lambda s: s["file"])
    readable = {r.label for r in records if r.split == train_split}
    for label, name in enumerate(classes):
        if label not in readable:
            where = " in train/" if train_split else ""
            bad = skipped_in_train.get(label, [])
            if name not in layout[train_split]:
                detail = f"no {name}/ folder in train/"
            elif bad:
                detail = f"{len(bad)} image file(s) skipped, e.g. {bad[0]['file']}: {bad[0]['reason']}"
            else:
                detail = "its folder holds no image files"
            raise DataError(f"imagefolder {source!r}: class {name!r} has no readable image{where} ({detail})")
    splits_found = [s for s in ("train", "val", "test") if s in layout]
    return FolderScan(source=source, classes=classes, records=records, skipped=skipped, splits_found=splits_found,
                      ignored_files=ignored, loose_files=loose)
