"""The run folder: its file names, their atomic writers and readers, and rebuilding a run's model.

Every name a run folder holds is defined here and nowhere else; train, evaluate, prune, export, the worker and the
dashboard import them. The names themselves are a contract with users (scripts read `report.json`, clients unzip
`export/bundle.zip`): change a value here only with a migration.

    config.yaml          the resolved config          labels.json        class names in index order
    split.json           sample ids per split         preprocess.json    what a client does to an image
    metrics.jsonl        events, one JSON per line    report.json        written last: the run finished
    checkpoints/last.pt  resume point (every epoch)   checkpoints/best.pt  best validation accuracy
    predictions.jsonl    one line per test sample     misclassified/, samples/  PNGs for the dashboard
    export/              the verified export (BUNDLE_FILES, bundle.zip), built in export.partial/ and swapped in
    CANCELLED, FAILED    markers with the reason, written when a run stops early
    tb/, mlflow.json     TensorBoard events and the MLflow run id (core/tracking.py)
    job.log              the worker's log of the job

Checkpoints are plain dicts of tensors and lists, so `load_checkpoint` reads them with `weights_only=True`.
Importing this module does not import torch (the dashboard reads the names).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import Config, load_config
from core.errors import Cancelled, ConfigError, RunDirError

if TYPE_CHECKING:  # torch is imported where a model or a checkpoint is touched: the names stay cheap to import
    from torch import nn

# ------------------------------------------------------------------------------------------------------ file names
CONFIG = "config.yaml"
"""The resolved config (every default filled in); `--resume` trains with it."""
LABELS = "labels.json"
"""Class names in index order (a JSON list)."""
SPLIT = "split.json"
"""Sample ids per split: {"train": [...], "val": [...], "test": [...]}."""
PREPROCESS = "preprocess.json"
"""What a client does to an image before the model sees it (colour mode, geometry, mean, std, input name)."""
METRICS = "metrics.jsonl"
"""The run's events, one JSON object per line: {"type", "time", "data"}."""
REPORT = "report.json"
"""The final report; written last, so its presence means the run finished."""
PREDICTIONS = "predictions.jsonl"
"""One line per test sample: index, id, true, pred, confidence."""
CHECKPOINTS = "checkpoints"
"""Folder of the two checkpoints below."""
LAST_CHECKPOINT = f"{CHECKPOINTS}/last.pt"
"""Written every epoch: model, optimizer, scheduler, scaler, epoch, rng, config, best_val_acc, epoch_event."""
BEST_CHECKPOINT = f"{CHECKPOINTS}/best.pt"
"""The epoch with the best validation accuracy: model, epoch, config, val_metrics, best_val_acc."""
MISCLASSIFIED = "misclassified"
"""Folder of PNGs of misclassified test images (listed in the report's `misclassified`)."""
SAMPLES = "samples"
"""Folder of a few test images per class (listed in the report's `samples`; the dashboard's "Try it" offers them)."""
EXPORT = "export"
"""Folder of the verified export (BUNDLE_FILES and BUNDLE)."""
EXPORT_PARTIAL = "export.partial"
"""Where an export is built; renamed to EXPORT only once every file checked out."""
EXPORT_OLD = "export.old"
"""The previous EXPORT while a new one is swapped in."""
TENSORBOARD = "tb"
"""Folder of TensorBoard event files (core/tracking.py)."""
MLFLOW_RUN = "mlflow.json"
"""The MLflow run of this run folder ({"tracking_uri", "experiment_id", "run_id"}): a resumed run continues it."""
JOB_LOG = "job.log"
"""The worker's log of the job (its notes and the training process's output), beside core's files."""
CANCELLED = "CANCELLED"
"""Marker: the run was cancelled (its text says when)."""
FAILED = "FAILED"
"""Marker: the run failed (its text is the error)."""
MARKERS = (FAILED, CANCELLED)
"""The markers of a run that stopped early, in the order they are checked."""

# names inside export/
ONNX = "model.onnx"
"""FP32 ONNX model: input `input` [batch, C, H, W], output `logits`."""
INT8_ONNX = "model.int8.onnx"
"""Static QDQ INT8 ONNX model (may be missing; the report says why)."""
STATE_DICT = "model.pt"
"""The PyTorch state_dict."""
PT2 = "model.pt2"
"""The torch.export program (may be missing; the report says why)."""
PREDICT_SCRIPT = "predict.py"
"""The standalone prediction script (a copy of core/predict_template.py)."""
MODEL_CARD = "model_card.md"
"""What the model is, what it was trained and tested on, how well, and what was verified."""
BUNDLE = "bundle.zip"
"""The client bundle: BUNDLE_FILES that exist."""
BUNDLE_FILES = (ONNX, INT8_ONNX, STATE_DICT, PT2, LABELS, PREPROCESS, PREDICT_SCRIPT, MODEL_CARD)
"""What bundle.zip holds (the files that exist; model.int8.onnx and model.pt2 may be missing, the report says why)."""
REQUIRED_FOR_EXPORT = (CONFIG, LABELS, PREPROCESS, BEST_CHECKPOINT, REPORT)
"""What a finished run folder holds before it can be exported (train writes report.json last)."""

PREPROCESS_KEYS = ("color_mode", "input_size", "resize_shorter", "center_crop", "mean", "std")
"""Keys preprocess.json must have (besides input_name)."""


def exported(name: str) -> str:
    """The path of an export file relative to the run folder: `exported(ONNX)` → "export/model.onnx"."""
    return f"{EXPORT}/{name}"


# ----------------------------------------------------------------------------------------------- atomic read/write
@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temp path beside `path` to write into; when the block ends it is flushed to disk (fsync) and renamed over
    `path`, so readers and a crash see the old file or the new one, never half of one. When the block raises (a full
    disk, say) the temp file is removed and the previous `path` is kept as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through `replacing`: readers see the old file or the new one, never half of one."""
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def read_json(path: Path) -> Any:
    """A run-folder JSON file; RunDirError (saying what to do) when it is missing, half-written or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path}: half-written or not JSON ({err}); re-run training or the step that wrote it"
                          ) from None


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write through `replacing`, so a crash or a full disk never leaves a half-written checkpoint."""
    import torch

    with replacing(path) as tmp, open(tmp, "wb") as fh:
        try:
            torch.save(obj, fh)
        except RuntimeError as err:  # torch's zip writer hides the OSError (a full disk: ENOSPC) behind its own
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint written by this project (tensors, lists and numbers only)."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


def save_best_checkpoint(path: Path, model: nn.Module, *, epoch: int, cfg: Config,
                         val_metrics: dict[str, Any]) -> None:
    """checkpoints/best.pt: the weights of the epoch with the best validation accuracy, and its metrics."""
    from core.models import unwrap_model

    atomic_torch_save({"model": unwrap_model(model).state_dict(), "epoch": epoch, "config": cfg.to_dict(),
                       "val_metrics": val_metrics, "best_val_acc": val_metrics["accuracy"]}, path)


def mark(run_dir: Path, marker: str, text: str) -> None:
    """Write a CANCELLED or FAILED marker with its reason (one line)."""
    (run_dir / marker).write_text(f"{text}\n", encoding="utf-8")


def marker_for(err: BaseException) -> str:
    """CANCELLED for a cancellation (SIGTERM, Ctrl-C), FAILED for anything else."""
    return CANCELLED if isinstance(err, (Cancelled, KeyboardInterrupt)) else FAILED


# ------------------------------------------------------------------------------------------------ a finished run
def in_chans(preprocess: dict[str, Any]) -> int:
    """Input channels of a model fed with images prepared by `preprocess` (1 for colour mode L, else 3)."""
    from core.data.transforms import channels

    return channels(preprocess["color_mode"])


@dataclass
class Run:
    """A finished run folder, loaded and checked: everything needed to rebuild its model."""

    path: Path
    cfg: Config
    classes: list[str]
    preprocess: dict[str, Any]
    report: dict[str, Any]
    checkpoint: dict[str, Any]

    @property
    def in_chans(self) -> int:
        return in_chans(self.preprocess)

    @property
    def image_size(self) -> int:
        return int(self.preprocess["input_size"][0])


def load_run(run_dir: str | Path) -> Run:
    """Check that `run_dir` is a finished run and load it; RunDirError names the first thing that is wrong."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"run folder {str(path)!r} does not exist")
    for marker in MARKERS:
        if (path / marker).exists():
            detail = (path / marker).read_text(encoding="utf-8", errors="replace").strip()
            raise RunDirError(f"run folder {str(path)!r} is marked {marker} ({detail}); nothing to export")
    missing = [name for name in REQUIRED_FOR_EXPORT if not (path / name).is_file()]
    if missing:
        raise RunDirError(f"run folder {str(path)!r} is missing {', '.join(missing)}: not a finished run "
                          f"(training writes {REPORT} last)")
    report = read_json(path / REPORT)
    if not isinstance(report, dict) or "test" not in report:
        raise RunDirError(f"{path / REPORT}: has no 'test' section; the run did not finish")
    classes = read_json(path / LABELS)
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise RunDirError(f"{path / LABELS}: expected a JSON list of at least 2 class names, got {classes!r:.200}")
    preprocess = read_json(path / PREPROCESS)
    if not isinstance(preprocess, dict) or any(k not in preprocess for k in PREPROCESS_KEYS):
        raise RunDirError(f"{path / PREPROCESS}: expected the keys {', '.join(PREPROCESS_KEYS)}")
    try:
        cfg = load_config(path / CONFIG)
    except ConfigError as err:
        raise RunDirError(f"{path / CONFIG}: {err}") from None
    try:
        checkpoint = load_checkpoint(path / BEST_CHECKPOINT)
    except Exception as err:  # noqa: BLE001 - truncated zip, pickle with non-tensor objects, ...
        raise RunDirError(f"{path / BEST_CHECKPOINT}: cannot be loaded ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise RunDirError(f"{path / BEST_CHECKPOINT}: expected a dict with a 'model' state_dict")
    return Run(path, cfg, classes, preprocess, report, checkpoint)


def create_run_model(cfg: Config, num_classes: int, preprocess: dict[str, Any], *, pretrained: bool = False
                     ) -> nn.Module:
    """The model `cfg` describes for images prepared by `preprocess` (what training builds and export rebuilds)."""
    from core.models import create_model

    return create_model(cfg.model.name, num_classes, in_chans=in_chans(preprocess), pretrained=pretrained,
                        image_size=int(preprocess["input_size"][0]), small_input=cfg.model.small_input,
                        dropout=cfg.model.dropout)


def build_model(run: Run) -> nn.Module:
    """The run's model on the CPU in eval mode, with the best checkpoint's weights."""
    model = create_run_model(run.cfg, len(run.classes), run.preprocess)
    try:
        model.load_state_dict(run.checkpoint["model"])
    except RuntimeError as err:
        raise RunDirError(f"{run.path / BEST_CHECKPOINT}: does not match model {run.cfg.model.name!r} with "
                          f"{len(run.classes)} classes: {str(err)[:500]}") from None
    return model.eval()
