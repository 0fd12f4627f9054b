"""What one request to the inference server may carry (each refusal is a 4xx naming the bound)."""
from __future__ import annotations

import dataclasses

from core.config import DataConfig

MAX_BODY_BYTES = 64 * 2**20
"""Largest request body (64 MiB: an infer request of ~40 RGB images at 224 px in JSON, or a few large photos)."""

MAX_IMAGES = 64
"""Most image files in one classify request."""

MAX_ROWS = 256
"""Most samples (the first dimension) in one infer request."""

MAX_PIXELS = DataConfig.model_fields["max_image_pixels"].default
"""Largest image (width × height) classify decodes, as training's `data.max_image_pixels` default; a bigger one is
refused before decoding (a decompression bomb)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = MAX_BODY_BYTES
    max_images: int = MAX_IMAGES
    max_rows: int = MAX_ROWS
    max_pixels: int = MAX_PIXELS
