"""Classify images with an exported model: `python predict.py [MODEL.onnx] IMAGE... [--top-k 5] [--json]`.

Without a model, DEFAULT_MODEL beside this script is used: the file the export recommends deploying (the faster of
model.onnx and model.int8.onnx at equal accuracy; the comment above DEFAULT_MODEL says why). This file is copied into
every export bundle as `predict.py` with only that line changed, so it must stay standalone: it needs only
onnxruntime, numpy and Pillow (no torch, nothing from this project). It reads `labels.json` and `preprocess.json`
from the folder that holds the model, and turns each image into the model input exactly as the training run's
evaluation did (a test in the project compares both tensors):

1. convert to `color_mode` ("RGB" or "L"; palette images with transparency go through "RGBA" first);
2. `resize_shorter` null: resize straight to `input_size` [H, W] with bilinear filtering; otherwise resize the shorter
   side to `resize_shorter` pixels (the longer side becomes int(resize_shorter * long / short)), then centre-crop
   `center_crop` [h, w] at top = round((H' - h) / 2), left = round((W' - w) / 2);
3. pixels / 255, then (x - mean) / std per channel, HWC → CHW, float32.

EXIF orientation tags are not applied, because training did not apply them either.
With `--json` the output is a list of {"file": ..., "top": [{"label": ..., "prob": ...}, ...]}.
Exit status: 0 when every image was classified, 1 when some image could not be read, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

BATCH_SIZE = 32
"""Images per inference call: bounds memory for long file lists."""

DEFAULT_MODEL = "model.onnx"
"""The model used when none is named (beside this script); an export sets its recommendation here."""


def load_preprocess(path: str | Path) -> dict[str, Any]:
    """preprocess.json, with the keys this script relies on checked so a wrong file fails with a clear message."""
    pp = json.loads(Path(path).read_text(encoding="utf-8"))
    missing = [k for k in ("color_mode", "input_size", "mean", "std") if k not in pp]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if pp["color_mode"] not in ("RGB", "L"):
        raise ValueError(f"{path}: color_mode must be 'RGB' or 'L', got {pp['color_mode']!r}")
    return pp


def to_color_mode(img: Image.Image, mode: str) -> Image.Image:
    if img.mode == mode:
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert(mode)


def resize_and_crop(img: Image.Image, pp: dict[str, Any]) -> Image.Image:
    """The eval geometry of preprocess.json (steps 1-2 above), on a PIL image already in the right colour mode."""
    height, width = (int(v) for v in pp["input_size"])
    shorter = pp.get("resize_shorter")
    if not shorter:
        if img.size != (width, height):
            img = img.resize((width, height), Image.BILINEAR)
        return img
    shorter = int(shorter)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shorter, int(shorter * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    crop_h, crop_w = (int(v) for v in (pp.get("center_crop") or pp["input_size"]))
    # a crop larger than the image pads with zeros, split as torchvision does (the smaller half before)
    top = round((new_h - crop_h) / 2) if crop_h <= new_h else -((crop_h - new_h) // 2)
    left = round((new_w - crop_w) / 2) if crop_w <= new_w else -((crop_w - new_w) // 2)
    if (left, top, crop_w, crop_h) == (0, 0, new_w, new_h):
        return img
    return img.crop((left, top, left + crop_w, top + crop_h))


def preprocess_image(img: Image.Image, pp: dict[str, Any]) -> np.ndarray:
    """PIL image of any mode and size → float32 C×H×W model input, following preprocess.json."""
    img = resize_and_crop(to_color_mode(img, pp["color_mode"]), pp)
    x = np.asarray(img, dtype=np.float32) / np.float32(255)
    if x.ndim == 2:
        x = x[:, :, None]
    mean = np.asarray(pp["mean"], dtype=np.float32)
    std = np.asarray(pp["std"], dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def draft_for(img: Image.Image, pp: dict[str, Any]) -> Image.Image:
    """Ask a not yet decoded JPEG to decode at a reduced DCT scale (1/2, 1/4, 1/8) that still leaves every side at
    least as large as step 2 needs: a 4000x3000 photo for a 224 px model decodes at 500x375, an eighth of the pixels,
    and the result differs from a full decode by about one grey level. Other formats are left as they are."""
    if img.format != "JPEG":
        return img
    height, width = (int(v) for v in pp["input_size"])
    shorter = pp.get("resize_shorter")
    if shorter:  # both sides at least their size after "shorter side to resize_shorter" (rounded up)
        w, h = img.size
        short = max(1, min(w, h))
        need = (-(-w * int(shorter) // short), -(-h * int(shorter) // short))
    else:
        need = (width, height)
    img.draft(None, need)
    return img


def load_image(path: str | Path, pp: dict[str, Any] | None = None) -> Image.Image:
    """The decoded image; with `pp` (preprocess.json) a large JPEG decodes at a reduced scale (draft_for)."""
    with Image.open(path) as img:
        if pp is not None:
            draft_for(img, pp)
        img.load()
        return img


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def create_session(model_path: str | Path) -> Any:
    """An ONNX Runtime session on CUDA when this onnxruntime has it, else on the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(model_path), providers=providers or available)


def classify(session: Any, batch: np.ndarray, labels: list[str], top_k: int, input_name: str) -> list[list[dict]]:
    """Top-k {"label", "prob"} lists, one per row of a float32 N×C×H×W batch."""
    return top_labels(session.run(None, {input_name: batch})[0], labels, top_k)


def top_labels(logits: np.ndarray, labels: list[str], top_k: int) -> list[list[dict]]:
    """Top-k {"label", "prob"} lists, one per row of an N×K logits array (most likely first)."""
    probs = softmax(logits.astype(np.float64))
    k = max(1, min(top_k, probs.shape[1]))
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([{"label": labels[i], "prob": float(row[i])} for i in order])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="predict.py", description="Classify images with an exported ONNX model.")
    p.add_argument("files", nargs="+", metavar="[MODEL.onnx] IMAGE",
                   help=f"an optional model (model.onnx or model.int8.onnx; labels.json and preprocess.json sit "
                        f"beside it; default {DEFAULT_MODEL} beside this script), then image files")
    p.add_argument("--top-k", type=int, default=5, help="how many labels to show per image (default 5)")
    p.add_argument("--json", action="store_true", help='print a JSON list of {"file", "top": [{"label", "prob"}]}')
    args = p.parse_args(argv)
    if args.files[0].lower().endswith(".onnx"):
        model, args.images = Path(args.files[0]), args.files[1:]
    else:
        model, args.images = Path(__file__).resolve().parent / DEFAULT_MODEL, args.files
    if not args.images:
        p.error("no image files given")
    folder = model.resolve().parent
    for needed in (model, folder / "labels.json", folder / "preprocess.json"):
        if not needed.is_file():
            print(f"error: {needed} not found (labels.json and preprocess.json must sit beside the model)",
                  file=sys.stderr)
            return 2
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    pp = load_preprocess(folder / "preprocess.json")
    session = create_session(model)
    input_name = pp.get("input_name") or session.get_inputs()[0].name

    results: list[dict[str, Any]] = []
    failed = 0
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        if pending:
            batch = np.stack([x for _, x in pending])
            for (name, _), top in zip(pending, classify(session, batch, labels, args.top_k, input_name)):
                results.append({"file": name, "top": top})
            pending.clear()

    for name in args.images:
        try:
            pending.append((name, preprocess_image(load_image(name, pp), pp)))
        except Exception as err:  # noqa: BLE001 - one unreadable file should not hide the others' results
            print(f"error: {name}: {err}", file=sys.stderr)
            failed += 1
        if len(pending) >= BATCH_SIZE:
            flush()
    flush()

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['file']}: " + ", ".join(f"{t['label']} {t['prob']:.4f}" for t in r["top"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
