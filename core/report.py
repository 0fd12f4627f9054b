"""The end of a run: test the best checkpoint and write report.json, predictions.jsonl and the PNGs the dashboard
shows. One report builder for every run (core.train and core.prune); what a variant adds is a hook.

The report's keys are a contract (CONTRACTS.md: `test`, `val`, `data`, `skipped_files`, `epochs_completed`,
`world_size`, `seconds`, later `export`); the others (`device`, `amp`, `data_path`, `feature_cache`, `model`,
`versions`, `misclassified`, `samples`, core.prune's `pruning`) say how the numbers were made.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core import distributed, runfolder
from core.data.loaders import LoaderKind, Loaders
from core.evaluate import evaluate_split
from core.runtime import Runtime, TrainState

MISCLASSIFIED_MAX = 48
"""How many misclassified test images are saved as PNGs for the dashboard's gallery."""
SAMPLES_PER_CLASS = 3
"""Test images per class saved under samples/ (the dashboard's "Try it" page offers them)."""

OnBest = Callable[[nn.Module, dict[str, Any]], None]
"""Runs once the best checkpoint's weights are in the model, before the test: (model, the best.pt dict)."""
ExtendReport = Callable[[dict[str, Any], nn.Module], None]
"""Adds a variant's sections to the report (rank 0) before it is written: (report, the tested model)."""


def test_and_report(rt: Runtime, state: TrainState, loaders: Loaders, bundle: Any, out: Path, *,
                    on_best: OnBest | None = None, extend: ExtendReport | None = None) -> dict[str, Any]:
    """Test the best checkpoint (last.pt when no epoch improved); rank 0 writes predictions, samples and
    report.json, sends the `report` event and returns the report (other ranks: {})."""
    distributed.barrier(rt.info)
    model = state.model
    best: dict[str, Any] = {}
    if rt.info.is_primary:  # only rank 0 writes the run folder: a rank on another machine has no checkpoint to read
        best_path = out / runfolder.BEST_CHECKPOINT
        best = runfolder.load_checkpoint(best_path if best_path.exists() else out / runfolder.LAST_CHECKPOINT)
        model.load_state_dict(best["model"])
    distributed.broadcast_module(model, rt.info)
    best = {**best, **distributed.broadcast_object({k: v for k, v in best.items() if k != "model"}, rt.info)}
    if on_best is not None:
        on_best(model, best)
    classes = list(bundle.classes)
    # with the feature cache (maybe bf16 features) the test split goes through the whole model in fp32, as exported
    fp32 = loaders.kind is LoaderKind.FEATURE_CACHE
    test_metrics, test_out = evaluate_split(rt, model, loaders, "test", classes, fp32=fp32)
    if not rt.info.is_primary:
        return {}
    cfg = rt.cfg
    report: dict[str, Any] = {
        "test": test_metrics,
        "val": {**(best.get("val_metrics") or {}), "epoch": int(best.get("epoch", state.epoch))},
        "data": {"name": cfg.data.name, "dataset": cfg.data.dataset, "classes": classes, "counts": bundle.counts,
                 "class_counts": bundle.class_counts, "preprocess": bundle.preprocess},
        "skipped_files": bundle.skipped_files,
        "epochs_completed": state.epoch,
        "world_size": rt.info.world_size,
        "device": str(rt.device),
        "amp": rt.amp,
        "channels_last": rt.channels_last,
        "data_path": loaders.kind.value,
        "seconds": time.time() - rt.started,
        "model": {"name": cfg.model.name, "parameters": sum(p.numel() for p in model.parameters())},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    if loaders.feature_cache is not None:
        report["feature_cache"] = loaders.feature_cache.as_report()
    if extend is not None:
        extend(report, model)
    report["misclassified"] = write_predictions(out, bundle, test_out, classes)
    report["samples"] = write_samples(out, bundle, classes)
    runfolder.write_json(out / runfolder.REPORT, report)
    rt.sink.emit("report", {k: v for k, v in report.items() if k not in ("misclassified",)})
    return report


def write_predictions(out: Path, bundle: Any, test_out: dict[str, np.ndarray], classes: list[str]) -> list[dict]:
    """predictions.jsonl (every test sample) and PNGs of the first misclassified ones for the gallery."""
    probs, labels = test_out["probs"], test_out["labels"]
    if len(labels) == 0:
        return []
    preds, conf = probs.argmax(1), probs.max(1)
    (out / runfolder.MISCLASSIFIED).mkdir(exist_ok=True)
    misclassified = []
    with (out / runfolder.PREDICTIONS).open("w", encoding="utf-8") as fh:
        for i, (t, p, c) in enumerate(zip(labels, preds, conf)):
            sample_id = bundle.test_ids[i]
            fh.write(json.dumps({"index": i, "id": sample_id, "true": int(t), "pred": int(p),
                                 "confidence": float(c)}) + "\n")
            if t != p and len(misclassified) < MISCLASSIFIED_MAX:
                name = f"{runfolder.MISCLASSIFIED}/{len(misclassified):04d}.png"
                bundle.eval_image("test", i).save(out / name)
                misclassified.append({"index": i, "id": sample_id, "true": classes[t], "pred": classes[p],
                                      "confidence": float(c), "image": name})
    return misclassified


def write_samples(out: Path, bundle: Any, classes: list[str]) -> list[dict]:
    """A few test images per class as PNGs (what "Try it" offers to classify)."""
    (out / runfolder.SAMPLES).mkdir(exist_ok=True)
    per_class: dict[int, int] = {}
    samples = []
    labels = bundle.eval_uint8("test")[1].tolist() if hasattr(bundle, "eval_uint8") else []
    for i, label in enumerate(labels):
        if per_class.get(label, 0) >= SAMPLES_PER_CLASS:
            continue
        per_class[label] = per_class.get(label, 0) + 1
        name = f"{runfolder.SAMPLES}/{len(samples):04d}.png"
        bundle.eval_image("test", i).save(out / name)
        samples.append({"index": i, "label": classes[label], "image": name})
    return samples
