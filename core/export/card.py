"""model_card.md: what the model is, what it was trained and tested on, how well, and what was verified."""
from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from core import runfolder
from core.export.defaults import PARITY_ATOL
from core.runfolder import Run


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f} %"


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def _deploy_file(export: dict[str, Any]) -> str:
    return (export.get("deploy") or {}).get("file") or runfolder.ONNX


def _deploy_lines(export: dict[str, Any]) -> list[str]:
    deploy = export.get("deploy")
    if not deploy:
        return []
    return [f"**Deploy `{deploy['file']}`**: {deploy['reason']}. `predict.py` uses it when no model is named.", ""]


def model_card(run: Run, export: dict[str, Any]) -> str:
    """model_card.md: what the model is, what it was trained and tested on, how well, and what was verified."""
    cfg, report, pp = run.cfg, run.report, run.preprocess
    test = report.get("test", {})
    data = report.get("data", {})
    counts = data.get("counts", {})
    onnx_info, int8 = export["onnx"], export["int8"]
    h, w = pp["input_size"]
    geometry = (f"resize to {h}×{w} (bilinear)" if not pp.get("resize_shorter") else
                f"resize shorter side to {pp['resize_shorter']} (bilinear), centre-crop {pp['center_crop']}")
    lines = [
        f"# Model card: {cfg.model.name} on {cfg.data.name}", "",
        (f"An image classifier for {len(run.classes)} classes, trained with this project's managed training "
        f"(run folder `{run.path.name}`). Exported {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."), "",
        "## Use it", "",
        *_deploy_lines(export),
        "```", "pip install onnxruntime numpy pillow",
        f"python {runfolder.PREDICT_SCRIPT} image.png --top-k 5 [--json]      # {_deploy_file(export)}",
        f"python {runfolder.PREDICT_SCRIPT} {runfolder.ONNX} image.png                # or name the model", "```",
        "", (f"Input `input` float32 [batch, {run.in_chans}, {h}, {w}]; output `logits` [batch, {len(run.classes)}] "
        f"(softmax gives probabilities). Preprocessing ({runfolder.PREPROCESS}): convert to "
        f"{pp['color_mode']}, {geometry}, pixels / 255, subtract mean {pp['mean']}, divide by std {pp['std']}, CHW."),
        "", "## Intended use and limitations", "",
        (f"- Classifies images that look like the training data ({cfg.data.name}) into exactly these classes: "
        f"{', '.join(run.classes[:50])}{' …' if len(run.classes) > 50 else ''}. Anything else is still forced into "
        "one of them; a low top-1 probability is a hint, not a guarantee, that an image is out of scope."),
        ("- Accuracy below is measured on a held-out split of the same dataset; expect lower accuracy on images from "
        "other cameras, lighting, framing or populations. Validate on your own data before relying on it."),
        ("- Not for decisions about people or safety-critical uses without further evaluation. EXIF orientation is "
        "not applied (training did not apply it either)."), "",
        "## Data", "",
        (f"- Dataset: {cfg.data.name}{f' ({cfg.data.path})' if cfg.data.path else ''}; split train/val/test "
        f"{counts.get('train', '?')}/{counts.get('val', '?')}/{counts.get('test', '?')} images "
        f"(fractions {cfg.data.split}, seed {cfg.train.seed})."),
        *([(f"- Registered dataset: `{cfg.data.dataset}` (content hash "
             f"`{(cfg.track.tags or {}).get('dataset_hash', '?')}`).")] if cfg.data.dataset else []),
        f"- Skipped unreadable files: {len(report.get('skipped_files', []))}.", "",
        "## Training", "",
        (f"- Model `{cfg.model.name}` (pretrained: {cfg.model.pretrained}, freeze: {cfg.model.freeze}), "
        f"{report.get('model', {}).get('parameters', '?')} parameters."),
        (f"- {report.get('epochs_completed', '?')} epochs, batch {cfg.train.batch_size}, {cfg.optim.name} lr "
        f"{cfg.optim.lr:g} wd {cfg.optim.weight_decay:g}, schedule {cfg.sched.name}, augment {cfg.data.augment}, "
        f"AMP {cfg.train.amp}, {report.get('world_size', 1)} process(es) on {report.get('device', '?')}, "
        f"{report.get('seconds', 0):.0f} s."),
    ]
    if "pruning" in report:
        pr = report["pruning"]
        lines.append(f"- Pruned: {'structured (channels)' if pr.get('structured') else 'global L1 unstructured'}, "
                     f"amount {pr.get('amount')}, sparsity {_pct(pr.get('sparsity'))} of pruned weights, "
                     f"fine-tuned {pr.get('finetune_epochs')} epoch(s).")
    lines += [
        "", "## Metrics (test split, best checkpoint by validation accuracy)", "",
        "| metric | value |", "|---|---|",
        f"| accuracy (PyTorch) | {_pct(test.get('accuracy'))} |",
        f"| accuracy (ONNX FP32, ONNX Runtime) | {_pct(onnx_info.get('accuracy'))} |",
        f"| accuracy (ONNX INT8, ONNX Runtime) | {_pct(int8.get('accuracy'))} |",
        f"| macro F1 | {test.get('macro_f1', float('nan')):.4f} |",
        f"| validation accuracy | {_pct(report.get('val', {}).get('accuracy'))} |",
    ]
    if "top5_accuracy" in test:
        lines.append(f"| top-5 accuracy | {_pct(test['top5_accuracy'])} |")
    per_class = test.get("per_class", [])
    if per_class:
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
                  for c in per_class]
    cm = test.get("confusion_matrix", [])
    if cm and len(cm) <= 30:
        lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
                  "| true \\ pred | " + " | ".join(run.classes) + " |", "|---" * (len(cm) + 1) + "|"]
        lines += [f"| {run.classes[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(cm)]
    elif cm:
        lines += ["", f"Confusion matrix: {len(cm)}×{len(cm)}, see {runfolder.REPORT} (too large for this card)."]
    if (cm is None or len(cm) > 30) and test.get("top_confusions"):
        lines += ["", "Most frequent confusions (test):", "", "| true | predicted | count |", "|---|---|---|"]
        lines += [f"| {c['true']} | {c['predicted']} | {c['count']} |" for c in test["top_confusions"][:20]]
    lines += [
        "", "## Export verification", "",
        (f"- `{runfolder.ONNX}`: FP32, opset {onnx_info['opset']}, exporter {onnx_info['exporter']}, "
        f"{_mb(onnx_info['bytes'])}. ONNX Runtime vs PyTorch on {onnx_info['parity_images']} real images: "
        f"max |Δlogit| {onnx_info['max_abs_diff']:.2e} (limit {PARITY_ATOL:g}), top-1 agreement "
        f"{_pct(onnx_info['top1_agreement'])}. Batch-1 latency {onnx_info.get('latency_ms_batch1', float('nan')):.2f} "
        "ms on the exporting machine's CPU."),
    ]
    if int8.get("ok"):
        lines.append(f"- `{runfolder.INT8_ONNX}`: static QDQ INT8 (per-channel {int8['weight_type']} weights, "
                     f"{int8['activation_type']} activations), calibrated on {int8['calib_images']} training images; "
                     f"{_mb(int8['bytes'])}; test accuracy {_pct(int8['accuracy'])} vs FP32 {_pct(int8['fp32_accuracy'])}"
                     f" (drop {100 * int8['accuracy_drop']:.2f} points); agrees with FP32 on "
                     f"{_pct(int8['top1_agreement_with_fp32'])} of test images; batch-1 latency "
                     f"{int8.get('latency_ms_batch1', float('nan')):.2f} ms.")
    else:
        lines.append(f"- `{runfolder.INT8_ONNX}`: not produced ({int8.get('error', 'disabled')}).")
    pt2 = export["pt2"]
    lines.append(f"- `{runfolder.STATE_DICT}`: state_dict ({_mb(export['files'].get(runfolder.STATE_DICT))}); rebuild with "
                 f"`core.models.create_model({cfg.model.name!r}, {len(run.classes)}, in_chans={run.in_chans}, "
                 f"image_size={run.image_size})` and load it with `torch.load(path, weights_only=True)`.")
    lines.append(f"- `{runfolder.PT2}`: torch.export program ({_mb(pt2.get('bytes'))}), load with `torch.export.load`."
                 if pt2.get("ok") else f"- `{runfolder.PT2}`: not produced ({pt2.get('error')}).")
    trt = export.get("tensorrt", {})
    lines.append(f"- TensorRT: {trt['backend']}, batch-1 latency {trt['latency_ms_batch1']:.3f} ms."
                 if trt.get("latency_ms_batch1") is not None else f"- TensorRT: {trt.get('reason') or trt.get('error')}.")
    lines += ["", "## Versions", "",
              (f"torch {torch.__version__}, onnx {export['versions'].get('onnx')}, onnxruntime "
              f"{export['versions'].get('onnxruntime')}, python {sys.version.split()[0]}."), ""]
    return "\n".join(lines)
