"""Top-k predictions for "Try it": ONNX Runtime on a job's exported `model.onnx` (the file its download button
serves), with the preprocessing of the exported `predict.py` (core/predict_template.py, imported, not copied).
"""
from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import numpy as np
from PIL import Image

from core import runfolder as rf
from core.predict_template import classify, draft_for, preprocess_image


@dataclasses.dataclass
class Classifier:
    session: Any
    labels: list[str]
    preprocess: dict[str, Any]
    input_name: str


def load_classifier(job_id: str, *, store: Any = None) -> Classifier:
    """The job's export/model.onnx with its labels.json and preprocess.json, read through the artifact functions."""
    import onnxruntime as ort

    from worker import api

    model = api.read_artifact(job_id, rf.exported(rf.ONNX), store=store)
    labels = json.loads(api.read_artifact(job_id, rf.exported(rf.LABELS), store=store))
    pp = json.loads(api.read_artifact(job_id, rf.exported(rf.PREPROCESS), store=store))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return Classifier(session=session, labels=labels, preprocess=pp,
                      input_name=pp.get("input_name") or session.get_inputs()[0].name)


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


def top_k(clf: Classifier, images: list[Image.Image], k: int = 5) -> list[list[dict[str, Any]]]:
    """[{"label", "prob"}, ...] (k best, most likely first) per image."""
    if not images:
        return []
    batch = np.stack([preprocess_image(img, clf.preprocess) for img in images])
    return classify(clf.session, batch, clf.labels, k, clf.input_name)


__all__ = ["Classifier", "ImageRejected", "load_classifier", "open_image", "top_k"]
