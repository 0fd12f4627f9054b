"""`inspect_dataset`: the health report that submission and the dashboard show before anything is trained.

It runs the same scan as build_datasets (imagefolder.scan_imagefolder), so a dataset it accepts trains and one it
refuses fails with the same DataError message. Thumbnails are PNG bytes (small, picklable, JSON-able after base64,
and accepted by st.image).
"""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from core.config import DataConfig
from core.data.defaults import FEW_IMAGES_WARNING, IMBALANCE_WARNING_RATIO, THUMBNAIL_SIDE
from core.data.imagefolder import scan_imagefolder
from core.data.transforms import to_color_mode

_DEFAULT_MAX_PIXELS: int = DataConfig.model_fields["max_image_pixels"].default


def _thumbnail_png(path: str, color_mode: str) -> bytes:
    with Image.open(path) as img:
        img.draft(img.mode, (THUMBNAIL_SIDE, THUMBNAIL_SIDE))  # JPEG: decode at a reduced scale, others ignore it
        img.load()
        thumb = to_color_mode(img, color_mode).copy()
        thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BILINEAR)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    return buf.getvalue()


def inspect_dataset(path: str | Path, *, color_mode: str = "RGB", max_image_pixels: int = _DEFAULT_MAX_PIXELS,
                    thumbnails_per_class: int = 4) -> dict[str, Any]:
    """Classes, counts, image sizes, skipped files, imbalance and warnings for an imagefolder folder or zip.

    Raises DataError exactly where build_datasets would (missing path, unsafe zip, < 2 classes, empty class).
    """
    if color_mode not in ("RGB", "L"):
        raise ValueError(f"unknown color_mode {color_mode!r}; choose from RGB, L")
    scan = scan_imagefolder(path, max_image_pixels=max_image_pixels, color_mode=color_mode)
    per_class = Counter(r.label for r in scan.records)
    counts = {name: per_class.get(i, 0) for i, name in enumerate(scan.classes)}
    by_split = {split: {name: 0 for name in scan.classes} for split in scan.splits_found}
    for r in scan.records:
        if r.split is not None:
            by_split[r.split][scan.classes[r.label]] += 1
    sizes = Counter(r.size for r in scan.records)
    widths, heights = [r.size[0] for r in scan.records], [r.size[1] for r in scan.records]
    image_sizes = {"min": [min(widths), min(heights)], "max": [max(widths), max(heights)],
                   "common": [[list(size), n] for size, n in sizes.most_common(5)]}
    smallest, largest = min(counts.values()), max(counts.values())
    imbalance = round(largest / max(smallest, 1), 2)

    warnings: list[str] = []
    if imbalance > IMBALANCE_WARNING_RATIO:
        warnings.append(f"classes are imbalanced: the largest has {imbalance}x the images of the smallest")
    few = [name for name, n in counts.items() if n < FEW_IMAGES_WARNING]
    if few:
        warnings.append(f"{len(few)} class(es) have fewer than {FEW_IMAGES_WARNING} images: {', '.join(few[:10])}"
                        + (" ..." if len(few) > 10 else ""))
    if scan.skipped:
        warnings.append(f"{len(scan.skipped)} image file(s) could not be used and will be skipped (see skipped_files)")
    if scan.ignored_files:
        warnings.append(f"{scan.ignored_files} non-image file(s) inside class folders are ignored")
    if scan.loose_files:
        warnings.append(f"{scan.loose_files} file(s) outside class folders are ignored")
    if min(min(widths), min(heights)) < 16:
        warnings.append(f"some images are very small (smallest {min(widths)}x{min(heights)} px)")

    thumbnails: dict[str, list[bytes]] = {name: [] for name in scan.classes}
    for r in scan.records:
        bucket = thumbnails[scan.classes[r.label]]
        if len(bucket) < thumbnails_per_class:
            bucket.append(_thumbnail_png(r.path, color_mode))
    return {"path": str(path), "classes": scan.classes, "counts": counts, "counts_by_split": by_split,
            "num_images": len(scan.records), "image_sizes": image_sizes, "skipped_files": scan.skipped,
            "imbalance_ratio": imbalance, "warnings": warnings, "splits_found": scan.splits_found,
            "thumbnails": thumbnails}
