"""Classification metrics and the evaluation pass.

`predict` runs a model over a loader and returns numpy arrays (so DDP ranks can gather them); `compute_metrics` turns
labels + predictions into the report's metric block; `evaluate_split` does both for a run's val or test split on every
rank. Used on val every epoch and on test at the end.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core import distributed
from core.data.loaders import EvalSplit, Loaders
from core.distributed import DistInfo
from core.runtime import Runtime

CONFUSION_MATRIX_MAX_CLASSES = 1000
"""Classes up to which a metric block holds the dense confusion matrix (1,000² counts: ~4 MB of JSON); above it
`confusion_matrix` is null and `top_confusions` says what is confused with what."""

TOP_CONFUSIONS = 50
"""Most (true, predicted) pairs listed in `top_confusions`, the commonest first."""


def top_confusions(labels: np.ndarray, preds: np.ndarray, classes: list[str], k: int = TOP_CONFUSIONS
                   ) -> list[dict[str, Any]]:
    """The k commonest mistakes as [{"true", "predicted", "count"}], in memory proportional to the samples (not to
    the classes squared)."""
    wrong = labels != preds
    if not wrong.any():
        return []
    pairs, counts = np.unique(np.stack([labels[wrong], preds[wrong]], axis=1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:k]
    return [{"true": classes[int(pairs[i, 0])], "predicted": classes[int(pairs[i, 1])], "count": int(counts[i])}
            for i in order]


def per_class_scores(labels: np.ndarray, preds: np.ndarray, n_classes: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per class: precision, recall, F1 and support (true count), a score whose denominator is 0 being 0 (scikit-learn's
    `precision_recall_fscore_support(..., labels=range(n_classes), zero_division=0)`; F1 = 2·TP / (predicted + true)).

    From three bincounts, in memory proportional to samples + classes. Not scikit-learn's own: importing
    `sklearn.metrics` costs a training process ~1.5 s (scipy), at start-up or at its first evaluation, for four sums.
    tests/test_class_bounds.py checks these against scikit-learn's."""
    tp = np.bincount(labels[labels == preds], minlength=n_classes).astype(np.float64)
    predicted = np.bincount(preds, minlength=n_classes)
    support = np.bincount(labels, minlength=n_classes)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros(n_classes), where=den > 0)

    return ratio(tp, predicted), ratio(tp, support), ratio(2 * tp, predicted + support), support


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: Any,
    device: torch.device,
    *,
    autocast: Any = None,
    channels_last: bool = False,
) -> dict[str, np.ndarray]:
    """Logits → (loss_sum, labels, preds, probs) over a loader. Does not change the model's train/eval mode for good."""
    was_training = model.training
    model.eval()
    losses, labels, probs = [], [], []
    ctx = autocast if autocast is not None else nullcontext()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with ctx:
            logits = model(x)
        logits = logits.float()
        # kept on the device: one host copy at the end instead of three sync points per batch
        losses.append(F.cross_entropy(logits, y, reduction="sum"))
        labels.append(y)
        probs.append(torch.softmax(logits, dim=1))
    model.train(was_training)
    if not labels:
        return {"loss_sum": np.zeros(()), "labels": np.zeros(0, dtype=np.int64), "probs": np.zeros((0, 0))}
    return {
        "loss_sum": torch.stack(losses).sum().cpu().numpy(),
        "labels": torch.cat(labels).cpu().numpy().astype(np.int64),
        "probs": torch.cat(probs).cpu().numpy().astype(np.float32),
    }


def compute_metrics(
    labels: np.ndarray, probs: np.ndarray, classes: list[str], *, loss_sum: float | None = None
) -> dict[str, Any]:
    """Accuracy, top-5 (≥ 5 classes), macro/weighted F1, per-class precision/recall/F1/support, confusion matrix."""
    n_classes = len(classes)
    labels = np.asarray(labels, dtype=np.int64)
    preds = probs.argmax(axis=1) if len(labels) else np.zeros(0, dtype=np.int64)
    out: dict[str, Any] = {"n": len(labels)}
    if len(labels) == 0:
        out.update(accuracy=0.0, macro_f1=0.0, weighted_f1=0.0, per_class=[], confusion_matrix=[], top_confusions=[])
        return out
    out["accuracy"] = float((preds == labels).mean())
    if n_classes >= 5:
        top5 = np.argsort(-probs, axis=1)[:, :5]
        out["top5_accuracy"] = float((top5 == labels[:, None]).any(axis=1).mean())
    precision, recall, f1, support = per_class_scores(labels, preds, n_classes)
    out["macro_f1"] = float(f1.mean())
    out["weighted_f1"] = float((f1 * support).sum() / support.sum())
    out["per_class"] = [
        {
            "class": classes[i],
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i in range(n_classes)
    ]
    # dense n×n only while it is small: 20,000 classes would be 3.2 GB here and again in every reader
    out["confusion_matrix"] = (np.bincount(labels * n_classes + preds, minlength=n_classes ** 2)
                               .reshape(n_classes, n_classes).tolist()
                               if n_classes <= CONFUSION_MATRIX_MAX_CLASSES else None)
    out["top_confusions"] = top_confusions(labels, preds, classes)
    if loss_sum is not None:
        out["loss"] = float(loss_sum) / len(labels)
    return out


def gather_predictions(out: dict[str, np.ndarray], idx: list[int], info: DistInfo) -> dict[str, np.ndarray]:
    """Each rank evaluated a disjoint shard; put the whole split back together in dataset order."""
    parts = distributed.all_gather_objects({"idx": idx, **out}, info)
    if len(parts) == 1:
        return out
    order = np.concatenate([np.asarray(p["idx"], dtype=np.int64) for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    probs = np.concatenate([p["probs"] for p in parts if len(p["probs"])], axis=0)
    perm = np.argsort(order)
    return {"loss_sum": np.asarray(sum(float(p["loss_sum"]) for p in parts)), "labels": labels[perm],
            "probs": probs[perm]}


def evaluate_split(rt: Runtime, model: torch.nn.Module, loaders: Loaders, split: EvalSplit,
                   classes: list[str], *, fp32: bool = False) -> tuple[dict[str, Any], dict]:
    """Metrics of `model` on a split (each rank predicts its shard; every rank gets the whole split's metrics).
    fp32: without the run's autocast."""
    loader, idx = loaders.eval_split(split)
    out = predict(model, loader, rt.device, autocast=nullcontext() if fp32 else rt.autocast,
                  channels_last=rt.channels_last)
    out = gather_predictions(out, idx, rt.info)
    return compute_metrics(out["labels"], out["probs"], classes, loss_sum=float(out["loss_sum"])), out
