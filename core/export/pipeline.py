"""`export_run`: the steps of an export, built in export.partial/ and swapped in as export/ once all checked out."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core import runfolder
from core.data.workers import num_workers
from core.errors import CoreError, ExportError, RunDirError
from core.export.card import model_card
from core.export.deploy import choose_deploy, predict_script
from core.export.defaults import PARITY_ATOL, PARITY_MIN_IMAGES, PREDICT_TEMPLATE
from core.export.inputs import calibration_images, take_images
from core.export.int8 import quantize_int8
from core.export.onnx_export import check_onnx, export_onnx, trace_model
from core.export.ort import check_parity, latency_ms, ort_predictions, ort_session
from core.export.tensorrt_probe import probe_tensorrt
from core.runfolder import Run, build_model, load_run

Log = Callable[[str], None]


def _record_failure(run: Run, message: str) -> None:
    """report.json says why the export failed (the dashboard shows it); the export folder is left untouched."""
    report = runfolder.read_json(run.path / runfolder.REPORT)
    report["export"] = {"ok": False, "error": message}
    runfolder.write_json(run.path / runfolder.REPORT, report)


def export_run(run_dir: str | Path, *, log: Log = print) -> dict[str, Any]:
    """Export and verify a finished run; returns report.json's new "export" section (also written to report.json).

    Raises RunDirError for a missing or half-written run folder, ExportError when a file cannot be made or fails
    its check (report.json then records the error and no export/ folder from this attempt remains).
    """
    t0 = time.time()
    run = load_run(run_dir)
    partial = run.path / runfolder.EXPORT_PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        export = _export_files(run, partial, log)
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, Exception):
            message = str(err) if isinstance(err, CoreError) else f"{type(err).__name__}: {err}"
            with contextlib.suppress(CoreError, OSError):
                _record_failure(run, message)
        raise
    final, old = run.path / runfolder.EXPORT, run.path / runfolder.EXPORT_OLD
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
    export["seconds"] = time.time() - t0
    report = runfolder.read_json(run.path / runfolder.REPORT)
    report["export"] = export
    runfolder.write_json(run.path / runfolder.REPORT, report)
    log(f"export: done in {export['seconds']:.1f}s → {final}")
    return export


def _export_files(run: Run, out: Path, log: Log) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    from core.data import build_datasets

    cfg = run.cfg
    model = build_model(run)
    bundle = build_datasets(cfg)
    if list(bundle.classes) != run.classes:
        raise RunDirError(f"the dataset's classes {list(bundle.classes)[:20]} no longer match labels.json "
                          f"{run.classes[:20]}: the data changed since training")
    size = (int(run.preprocess["input_size"][0]), int(run.preprocess["input_size"][1]))
    export: dict[str, Any] = {"ok": True, "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                                                       "onnxruntime": ort.__version__}}

    # ---- torch.export → model.pt2 (and the graph the ONNX exporter starts from)
    n_parity = max(cfg.export.parity_images, PARITY_MIN_IMAGES)
    parity_x, where = take_images(bundle, n_parity, ("test", "val", "train"))
    example = parity_x[:2] if len(parity_x) >= 2 else parity_x.repeat(2, 1, 1, 1)  # batch 1 would be specialised
    t = time.time()
    program, trace_error = trace_model(model, example)
    pt2: dict[str, Any] = {"ok": program is not None}
    if program is not None:
        try:
            torch.export.save(program, str(out / runfolder.PT2))
            pt2["bytes"] = (out / runfolder.PT2).stat().st_size
        except Exception as err:  # noqa: BLE001
            pt2 = {"ok": False, "error": f"torch.export.save: {type(err).__name__}: {str(err)[:300]}"}
    else:
        pt2["error"] = f"torch.export: {trace_error}"
    export["pt2"] = pt2

    # ---- ONNX FP32, checked, then parity with PyTorch on real images
    onnx_path = out / runfolder.ONNX
    onnx_info = export_onnx(model, program, example, onnx_path, cfg.export.opset)
    onnx_info["opset_requested"] = cfg.export.opset
    onnx_info["export_seconds"] = time.time() - t
    check_onnx(onnx_path, run.in_chans, size)
    session = ort_session(onnx_path)
    parity = check_parity(model, session, parity_x)
    parity["images_from"] = sorted({split for split, _ in where})
    onnx_info.update(parity, bytes=onnx_path.stat().st_size)
    log(f"export: {runfolder.ONNX} ({onnx_info['exporter']}, opset {onnx_info['opset']}) parity on {len(parity_x)} images: "
        f"max |Δlogit| {parity['max_abs_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.4f}")
    if not parity["ok"]:
        raise ExportError(f"ONNX parity failed on {len(parity_x)} images: max |Δlogit| {parity['max_abs_diff']:.3g} "
                          f"(allowed {PARITY_ATOL:g}), top-1 agreement {parity['top1_agreement']:.4f} (required 1.0); "
                          "no model was exported")
    export["onnx"] = onnx_info

    # ---- INT8 (static QDQ), calibrated on training images; failure is reported, not fatal
    sessions = {"fp32": session}
    int8: dict[str, Any] = {"ok": False}
    int8_path = out / runfolder.INT8_ONNX
    if cfg.export.int8:
        try:
            t = time.time()
            calib = calibration_images(bundle, cfg.export.calib_images, cfg.train.seed).numpy()
            int8.update(quantize_int8(onnx_path, int8_path, calib, out))
            onnx.checker.check_model(str(int8_path))
            sessions["int8"] = ort_session(int8_path)
            int8.update(ok=True, bytes=int8_path.stat().st_size, quantize_seconds=time.time() - t)
        except Exception as err:  # noqa: BLE001
            int8_path.unlink(missing_ok=True)
            int8 = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:500]}"}
            log(f"export: INT8 quantization failed, FP32 export continues: {int8['error']}")
    else:
        int8["error"] = "disabled by export.int8: false"

    # ---- accuracy of the ONNX files on the whole test split (ONNX Runtime, one pass)
    preds, labels, seconds = ort_predictions(sessions, bundle.test, num_workers(cfg))
    fp32_acc = float((preds["fp32"] == labels).mean()) if len(labels) else float("nan")
    onnx_info["accuracy"] = fp32_acc
    onnx_info["pytorch_accuracy"] = run.report.get("test", {}).get("accuracy")
    onnx_info["test_images"] = len(labels)
    x1 = parity_x[:1].numpy()
    onnx_info["latency_ms_batch1"] = latency_ms(session, x1)
    if "int8" in sessions:
        acc = float((preds["int8"] == labels).mean()) if len(labels) else float("nan")
        int8.update(accuracy=acc, fp32_accuracy=fp32_acc, accuracy_drop=fp32_acc - acc,
                    top1_agreement_with_fp32=float((preds["int8"] == preds["fp32"]).mean()) if len(labels) else None,
                    latency_ms_batch1=latency_ms(sessions["int8"], x1),
                    speedup_vs_fp32_test_pass=seconds["fp32"] / max(seconds["int8"], 1e-9))
        log(f"export: INT8 test accuracy {acc:.4f} vs FP32 {fp32_acc:.4f} (drop {100 * (fp32_acc - acc):.2f} points), "
            f"{int8['bytes'] / 1e6:.2f} MB vs {onnx_info['bytes'] / 1e6:.2f} MB")
    export["int8"] = int8
    export["tensorrt"] = probe_tensorrt(onnx_path, x1, session.run(["logits"], {"input": x1})[0])
    export["deploy"] = choose_deploy(onnx_info, int8)
    log(f"export: deploy {export['deploy']['file']}: {export['deploy']['reason']}")

    # ---- PyTorch weights, the client contract files, the card and the bundle
    torch.save(model.state_dict(), out / runfolder.STATE_DICT)
    runfolder.write_json(out / runfolder.LABELS, run.classes)
    runfolder.write_json(out / runfolder.PREPROCESS, {**run.preprocess, "input_name": "input"})
    (out / runfolder.PREDICT_SCRIPT).write_text(predict_script(PREDICT_TEMPLATE.read_text(encoding="utf-8"),
                                                        export["deploy"]), encoding="utf-8")
    export["files"] = {name: (out / name).stat().st_size for name in runfolder.BUNDLE_FILES if (out / name).exists()}
    (out / runfolder.MODEL_CARD).write_text(model_card(run, export), encoding="utf-8")
    export["files"][runfolder.MODEL_CARD] = (out / runfolder.MODEL_CARD).stat().st_size
    with zipfile.ZipFile(out / runfolder.BUNDLE, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in runfolder.BUNDLE_FILES:
            if (out / name).exists():
                zf.write(out / name, arcname=name)
    export["files"][runfolder.BUNDLE] = (out / runfolder.BUNDLE).stat().st_size
    return export
