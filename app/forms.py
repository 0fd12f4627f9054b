"""The New-job form as data: presets from configs/, the fields it edits, and the placing of validation errors under
fields. Validation itself is core's (through `worker.submit`), and so are the option lists (core/config.py's field
types, core/data/builtin.py's datasets): the dashboard only shows them.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from app.defaults import CONFIGS_DIR, DEFAULT_PRESET
from core.config import EPOCHS_PER_VIEW, FEATURE_VIEWS_MAX, Config, choices
from core.data.builtin import BUILTIN_DATASETS
from core.errors import FieldError
from worker.api import MAX_GPUS_PER_JOB, MAX_NODES_PER_JOB, PRIORITIES, REPO_ROOT

UPLOAD = "upload"
CLONED = "cloned"
REGISTERED = "registered"
DATASET_LABELS = {**{name: d.label for name, d in BUILTIN_DATASETS.items()},
                  REGISTERED: "A registered dataset (Datasets page)",
                  UPLOAD: "Upload a .zip of class folders (registered as a dataset version)",
                  CLONED: "The dataset of the cloned job"}


@dataclasses.dataclass(frozen=True)
class Field:
    """One editable config key: `key` is the dotted config key (or a submission option: gpus, priority, name)."""

    key: str
    label: str
    kind: str  # select | bool | int | float | text
    options: tuple[Any, ...] = ()
    help: str | None = None
    min_value: float | None = None
    max_value: float | None = None
    step: float | None = None
    fmt: str | None = None
    optional: bool = False


def model_names() -> tuple[str, ...]:
    from core.models import list_models

    return tuple(list_models())


def time_limit_default() -> str:
    """The submission default of train.time_limit, in words (JOB_TIME_LIMIT_HOURS)."""
    from worker.api import default_time_limit

    seconds = default_time_limit()
    return f"{seconds:g} s ({seconds / 3600:g} h)" if seconds else "no limit"


def fields() -> list[Field]:
    """Every field of the form, in display order (sections: model, data, training, resources, export)."""
    return [
        Field("model.name", "Model", "select", model_names()),
        Field("model.pretrained", "Pretrained (ImageNet weights)", "bool"),
        Field("model.freeze", "Freeze", "select", choices(Config, "model.freeze"),
              help="backbone: only the new head trains (needs pretrained)"),
        Field("data.image_size", "Image size (px)", "int", min_value=0, max_value=4096, step=1, optional=True,
              help="model input side; empty = the dataset's native size"),
        Field("data.color_mode", "Colour mode", "select", choices(Config, "data.color_mode")),
        Field("data.augment", "Augmentation", "select", choices(Config, "data.augment"),
              help="classic: random crop + flip + colour jitter; strong: TrivialAugment"),
        Field("train.epochs", "Epochs", "int", min_value=0, step=1),
        Field("train.batch_size", "Batch size", "int", min_value=0, step=1, help="per GPU (per DDP rank)"),
        Field("optim.name", "Optimizer", "select", choices(Config, "optim.name")),
        Field("optim.lr", "Learning rate", "float", min_value=0.0, step=1e-4, fmt="%g"),
        Field("optim.weight_decay", "Weight decay", "float", min_value=0.0, step=1e-4, fmt="%g"),
        Field("sched.name", "Schedule", "select", choices(Config, "sched.name")),
        Field("train.amp", "Mixed precision (AMP)", "bool"),
        Field("train.label_smoothing", "Label smoothing", "float", min_value=0.0, step=0.05, fmt="%g"),
        Field("train.feature_cache", "Feature cache", "select", choices(Config, "train.feature_cache"),
              help="frozen backbone: embed each image once (train images once per view) and train only the head on "
                   "the cached features; epochs then cost almost nothing. auto: on when the backbone is frozen"),
        Field("data.feature_views", "Augmented views per image", "int", min_value=1, max_value=64, step=1,
              optional=True, help="feature cache: augmented views of each train image embedded once; each epoch "
                                  f"uses one. Empty = auto: one per {EPOCHS_PER_VIEW} epochs, 1 to {FEATURE_VIEWS_MAX}"),
        Field("gpus", "GPUs", "int", min_value=1, max_value=MAX_GPUS_PER_JOB, step=1,
              help="GPUs on each worker (CPU ranks on a CPU-only worker)"),
        Field("nodes", "Nodes", "int", min_value=1, max_value=MAX_NODES_PER_JOB, step=1,
              help="workers (machines) the job spans: one DDP job of nodes × GPUs ranks, started when that many "
                   "workers are free (docs/multinode.md)"),
        Field("priority", "Priority", "select", PRIORITIES),
        Field("train.time_limit", "Time limit (s)", "float", min_value=0.0, step=3600.0, fmt="%g", optional=True,
              help=f"training stops (timed out, checkpoints kept) after this many seconds; empty = the default, "
                   f"{time_limit_default()}"),
        Field("name", "Job name (optional)", "text"),
        Field("export.enabled", "Export ONNX when training ends", "bool"),
        Field("export.int8", "Also an INT8 model", "bool"),
    ]


FROZEN_BACKBONE_ONLY = ("train.feature_cache", "data.feature_views")
"""Fields the form shows only when the preset or cloned job freezes the backbone (they change nothing else)."""


def shown(key: str, values: dict[str, Any]) -> bool:
    """Whether the form shows field `key` for these starting values."""
    return key not in FROZEN_BACKBONE_ONLY or values.get("model.freeze") == "backbone"


SUBMIT_OPTIONS = ("gpus", "nodes", "priority", "name")
"""Form fields that are options of submit_job, not config keys."""


# ------------------------------------------------------------------------------------------------------- presets
def presets_dir() -> Path:
    return REPO_ROOT / CONFIGS_DIR


def preset_names() -> list[str]:
    """Preset names (YAML file stems in configs/), the default one first."""
    names = sorted(p.stem for p in presets_dir().glob("*.yaml"))
    if DEFAULT_PRESET in names:
        names.remove(DEFAULT_PRESET)
        names.insert(0, DEFAULT_PRESET)
    return names


def load_preset(name: str) -> dict[str, Any]:
    """A preset's raw mapping. Only names from preset_names() are read (no path a user typed reaches the disk)."""
    from core.config import load_yaml

    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    return load_yaml(presets_dir() / f"{name}.yaml")


def resolved(raw: dict[str, Any]) -> dict[str, Any]:
    """Every key with its value (preset + defaults), for pre-filling the form; raw itself when it is invalid."""
    from core.config import config_from_dict
    from core.errors import ConfigError

    try:
        return config_from_dict(_without_data_path(raw)).to_dict()
    except ConfigError:
        return copy.deepcopy(raw)


def _without_data_path(raw: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    data = raw.setdefault("data", {})
    if data.get("name") == "imagefolder" or data.get("dataset"):  # pre-filling only: the data is chosen apart
        data["name"] = "digits"
    data.pop("path", None)
    data.pop("dataset", None)
    return raw


def default_dataset(raw: dict[str, Any]) -> str:
    """Which dataset choice a config starts with."""
    data = raw.get("data") or {}
    path = str(data.get("path") or "")
    if data.get("dataset"):  # a registered version: a clone keeps it
        return REGISTERED
    if path.startswith("artifact:"):
        return CLONED
    name = data.get("name") or "digits"
    return UPLOAD if name == "imagefolder" else name


def initial_values(raw: dict[str, Any], *, gpus: int = 1, nodes: int = 1, priority: str = "default") -> dict[str, Any]:
    """Field key → starting value, from a preset or a cloned job's config."""
    cfg = resolved(raw)
    out: dict[str, Any] = {}
    for f in fields():
        if f.key == "gpus":
            out[f.key] = gpus
        elif f.key == "nodes":
            out[f.key] = nodes
        elif f.key == "priority":
            out[f.key] = priority
        elif f.key == "name":
            out[f.key] = ""
        else:
            section, _, name = f.key.partition(".")
            out[f.key] = (cfg.get(section) or {}).get(name)
    return out


def build_config(raw: dict[str, Any], values: dict[str, Any], dataset: str, registered: str | None = None
                 ) -> dict[str, Any]:
    """The config dict to submit: the preset (or cloned config) with the form's values and dataset applied.

    Keys the form does not show (hflip, log_every, ...) keep the preset's values. A built-in dataset drops any
    data.path and data.dataset (workers read built-ins from their own disk). A registered dataset (or an upload,
    registered on submit) is `data.dataset: registered` (NAME:VERSION) with no data.path: submission pins it.
    """
    cfg = copy.deepcopy(raw)
    starting = {"model.freeze": (raw.get("model") or {}).get("freeze")}  # what decided the fields shown
    for key, value in values.items():
        if key in SUBMIT_OPTIONS or not shown(key, starting):  # not shown: the preset's value
            continue
        section, _, name = key.partition(".")
        cfg.setdefault(section, {})[name] = value
    data = cfg.setdefault("data", {})
    if dataset in BUILTIN_DATASETS:
        data["name"] = dataset
        data.pop("path", None)
        data.pop("dataset", None)
    elif dataset in (UPLOAD, REGISTERED):
        data["name"] = "imagefolder"
        data.pop("path", None)
        data.pop("dataset", None)
        if registered:
            data["dataset"] = registered
    return cfg


# ------------------------------------------------------------------------------------------------ error placement
FIELD_ALIASES = {"data.path": "dataset", "data.name": "dataset", "data.dataset": "dataset", "dataset upload": "dataset",
                 "timeout": "name"}
"""Error keys shown under another field: every data key under the dataset choice, the timeout under the name."""


def errors_by_field(errors: Iterable[FieldError]) -> dict[str, str]:
    """A refusal's errors (`SubmissionError.errors`, `ConfigError.errors`) → {form field key: its messages}.

    Keys not shown in the form land under "" (shown above the submit button), data keys under "dataset".
    """
    known = {f.key for f in fields()} | {"dataset"}
    out: dict[str, str] = {}
    for error in errors:
        key = FIELD_ALIASES.get(error.key, error.key)
        if key not in known:
            key = ""
        out[key] = (out[key] + "; " if key in out else "") + str(error)
    return out


# ---------------------------------------------------------------------------------------------------- sweep mode
def sweepable() -> list[Field]:
    """Fields a sweep can vary: every config key of the form (not the submission options gpus, priority, name)."""
    return [f for f in fields() if f.key not in SUBMIT_OPTIONS and f.kind != "text"]


def space_entry(field: Field, low: Any = None, high: Any = None, log: bool = False,
                choices: list[Any] | None = None) -> dict[str, Any]:
    """One parameter of a sweep's space (the space file's form) from the Sweep widgets of one field."""
    if field.kind in ("select", "bool"):
        return {"choice": list(choices or [])}
    entry: dict[str, Any] = {field.kind: [low, high]}
    if log:
        entry["log"] = True
    return entry
