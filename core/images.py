"""Decoding an uploaded image for inference, once for every place that classifies uploads (the dashboard's Try it,
the inference server's classify route): the pixel count is checked before decoding (a decompression bomb is refused,
not decoded), and a large JPEG decodes at a reduced scale when the model's preprocessing allows it."""
from __future__ import annotations

import io
from typing import Any

from PIL import Image

from core.predict_template import draft_for


class ImageRejected(ValueError):
    """An image that cannot be classified (unreadable, too many pixels); the message says why."""


def open_image(data: bytes, *, max_pixels: int | None = None, preprocess: dict[str, Any] | None = None
               ) -> Image.Image:
    """Decode uploaded bytes (size checked before decoding: a decompression bomb is refused, not decoded); with the
    model's `preprocess`, a large JPEG decodes at a reduced scale (draft_for: only what the model's input needs)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if max_pixels and w * h > max_pixels:
                raise ImageRejected(f"{w}×{h} pixels is more than the limit of {max_pixels:,}")
            if preprocess is not None:
                draft_for(img, preprocess)
            img.load()
            return img
    except ImageRejected:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for bad files; the user needs the reason
        raise ImageRejected(f"not a readable image ({type(err).__name__}: {err})") from None
