"""Top-k predictions for "Try it": ONNX Runtime on a job's exported `model.onnx` (the file its download button
serves), with the preprocessing of the exported `predict.py` (core/predict_template.py, imported, not copied).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from PIL import Image

from core import runfolder as rf
from core.images import ImageRejected, open_image
from core.predict_template import classify, preprocess_image


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


def top_k(clf: Classifier, images: list[Image.Image], k: int = 5) -> list[list[dict[str, Any]]]:
    """[{"label", "prob"}, ...] (k best, most likely first) per image."""
    if not images:
        return []
    batch = np.stack([preprocess_image(img, clf.preprocess) for img in images])
    return classify(clf.session, batch, clf.labels, k, clf.input_name)


__all__ = ["Classifier", "ImageRejected", "load_classifier", "open_image", "top_k"]
