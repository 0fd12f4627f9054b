"""The one typed config schema: YAML preset → `--set dotted.key=value` overrides → validated `Config`.

Every field below is a stable, documented key (see README "Configuration"). Validation happens before any data is
touched; every error names the dotted key, the bad value and what is allowed.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError, FieldError

DatasetName = Literal["digits", "cifar10", "cifar100", "imagefolder", "synthetic"]
Augment = Literal["classic", "none", "strong"]
"""classic: random crop + flip + colour jitter; strong: TrivialAugment; none: the eval transform only."""
ColorMode = Literal["RGB", "L"]
CacheMode = Literal["auto", "on", "off"]
Freeze = Literal["none", "backbone"]
Device = Literal["auto", "cpu", "cuda"]
OptimizerName = Literal["adamw", "sgd"]
ScheduleName = Literal["cosine", "onecycle", "step", "none"]

FEATURE_VIEWS_MAX = 4
"""data.feature_views auto: at most this many views (8 were no better after 300 epochs; docs/benchmarks.md,
"Feature cache")."""
EPOCHS_PER_VIEW = 10
"""data.feature_views auto: one view per this many epochs (up to 10 epochs extra views changed val accuracy by less
than the noise; from 20 epochs on 4 views gained 1-2 points: docs/benchmarks.md, "Feature cache")."""

MAX_BATCH_INPUT_BYTES = 8 * 2**30
"""Largest float32 input of one batch, batch_size × channels × image_size² × 4 bytes (8 GiB: 682 RGB images of
1,024 px; 256 at 224 px is 154 MB). Over it the config is refused instead of exhausting the machine's memory."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _on_off(value: Any) -> Any:
    """YAML 1.1 reads a bare `on`/`off` as true/false: map them back for the auto|on|off switches."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class DataConfig(_Section):
    name: DatasetName = "digits"
    path: str | None = None
    """imagefolder: a folder or .zip of class folders; cifar: the dataset root (default `data/`)."""
    dataset: str | None = Field(default=None, min_length=1)
    """A registered dataset, `NAME` (its latest version) or `NAME:VERSION` (README "Datasets"): submission pins it to
    NAME:VERSION and fills `path`; sets `name: imagefolder` (whatever the preset had)."""
    prepared: str | None = Field(default=None, min_length=1)
    """imagefolder: the URL of a prepared form (core/data/shards.py) to read instead of scanning `path`; the worker
    sets it when the job's registered dataset has one for its input size (README "Datasets")."""
    image_size: int | None = Field(default=None, ge=4, le=1024)
    """Model input side in pixels; None = the dataset's native size (digits 8 → 32 is set by the preset)."""
    split: list[float] = Field(default_factory=lambda: [0.7, 0.2, 0.1])
    """train/val/test fractions, summing to 1. CIFAR keeps its official test set."""
    augment: Augment = "classic"
    hflip: bool = True
    """Random horizontal flip in the classic/strong presets (off for digits and text-like data)."""
    color_mode: ColorMode = "RGB"
    """RGB converts every image to 3 channels; L keeps one channel."""
    download: bool = False
    """cifar: download into `path` when the files are missing (needs internet)."""
    num_workers: int | Literal["auto"] = Field(default="auto")
    """DataLoader processes per rank on the PIL path; auto: min(CPUs per rank - 1, 4) (core/data/workers.py)."""
    pin_memory: bool = False
    cache: CacheMode = "auto"
    """Tensor cache (decode once, augment batches as tensors): auto = on when the dataset fits in memory."""
    cache_max_mb: int = Field(default=4096, ge=1)
    """MiB per process: `cache: auto` uses the tensor cache when its uint8 size is at most this; the feature cache
    (`train.feature_cache`) holds at most this many MiB of features (auto falls back to the normal path, on refuses)."""
    feature_views: int | None = Field(default=None, ge=1, le=64)
    """Feature cache: augmented views embedded per train image (each epoch uses one per image); 1 with augment none.
    None (or `auto`): one per EPOCHS_PER_VIEW epochs, 1 to FEATURE_VIEWS_MAX (core.features.effective_views)."""
    synthetic_size: int = Field(default=1000, ge=10, le=10_000_000)
    synthetic_classes: int = Field(default=10, ge=2, le=10_000)
    synthetic_image_size: int = Field(default=32, ge=4, le=1024)
    max_image_pixels: int = Field(default=50_000_000, ge=1)
    """Images with more pixels are refused (decompression-bomb guard)."""

    _cache_on_off = field_validator("cache", mode="before")(_on_off)
    _feature_views_auto = field_validator("feature_views", mode="before")(lambda v: None if v == "auto" else v)

    @field_validator("num_workers")
    @classmethod
    def _workers_in_range(cls, v: int | str) -> int | str:
        if v != "auto" and not 0 <= int(v) <= 64:
            raise ValueError(f"must be 'auto' or a whole number from 0 to 64, got {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _dataset_is_imagefolder(cls, raw: Any) -> Any:
        """A registered dataset is an imagefolder: `name` becomes imagefolder whatever a preset said (as a dashboard
        upload does), so `--set data.dataset=NAME` works on every preset."""
        if isinstance(raw, dict) and raw.get("dataset") not in (None, ""):
            raw = {**raw, "name": "imagefolder"}
        return raw

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: list[float]) -> list[float]:
        if len(v) != 3 or any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] <= 0:
            raise ValueError(f"must be three non-negative fractions [train, val, test] summing to 1 with train > 0, got {v}")
        return v


class ModelConfig(_Section):
    name: str = "simple_cnn"
    pretrained: bool = False
    freeze: Freeze = "none"
    backbone_lr_scale: float = Field(default=0.1, gt=0, le=1)
    """When fine-tuning a pretrained model (freeze: none), the backbone learns at lr × this."""
    small_input: bool | None = None
    """torchvision models: replace the ImageNet stem for inputs ≤ 64 px; None = automatic by image size."""
    dropout: float = Field(default=0.0, ge=0, lt=1)


class TrainConfig(_Section):
    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    """Per-process batch size (each DDP rank takes this many)."""
    amp: bool = False
    """Mixed precision with torch.autocast: bf16 on CPU; on CUDA bf16 when supported, else fp16 + GradScaler."""
    seed: int = Field(default=0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    grad_clip: float | None = Field(default=None, gt=0)
    """Clip the global gradient norm to this; None = off."""
    channels_last: bool | Literal["auto"] = "auto"
    """NHWC memory format for the model and its inputs. auto: on for CPU training (oneDNN's NHWC kernels were faster
    for every model here: 1.06-1.74x per training step) and for CUDA with train.amp (tensor cores); see
    core.train.use_channels_last."""
    compile: bool = False
    early_stopping: int = Field(default=0, ge=0)
    """Stop after this many epochs without val-accuracy improvement; 0 = off."""
    log_every: int = Field(default=20, ge=1)
    """Emit a step event (and sync loss to the host) every this many steps."""
    eval_batch_size: int | None = Field(default=None, ge=1)
    """Batch size of val/test passes and embedding; None = batch_size on CPU, max(batch_size, 256) on GPU."""
    time_limit: float | None = Field(default=None, gt=0)
    """Seconds; the run fails as timed out past it. None = no limit."""
    device: Device = "auto"
    feature_cache: CacheMode = "auto"
    """Embed images with the frozen backbone once and train only the head on the cached features (core.features).
    auto: on when the backbone is frozen and in eval mode (its output depends only on the image)."""

    _feature_cache_on_off = field_validator("feature_cache", mode="before")(_on_off)

    def eval_batch(self, device_type: str) -> int:
        """The batch size of val/test passes (and of embedding passes) on a device of this type ("cpu", "cuda"):
        eval_batch_size, or when unset the train batch size on CPU and max(batch_size, 256) elsewhere. On the CPU
        a batch of 256 was slower for every model measured (Lite0 at 224 px 2x, SimpleCNN 1.4-1.9x, ResNet-18
        1.1-1.2x: docs/benchmarks.md, "Evaluation batch size"); a GPU wants big batches."""
        if self.eval_batch_size:
            return self.eval_batch_size
        return self.batch_size if device_type == "cpu" else max(self.batch_size, 256)


class OptimConfig(_Section):
    name: OptimizerName = "adamw"
    lr: float = Field(default=1e-3, gt=0, le=10)
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True


class SchedConfig(_Section):
    name: ScheduleName = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0)
    """Linear warm-up length in epochs (fractional allowed); converted to steps."""
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    step_epochs: int = Field(default=30, ge=1)
    gamma: float = Field(default=0.1, gt=0, le=1)


class ExportConfig(_Section):
    enabled: bool = True
    """Run `core.export` automatically when training ends."""
    int8: bool = True
    calib_images: int = Field(default=256, ge=1)
    parity_images: int = Field(default=64, ge=1)
    opset: int = Field(default=18, ge=13)


class TrackConfig(_Section):
    """Where metrics go besides the run folder and the dashboard (core/tracking.py)."""

    tensorboard: bool = True
    """TensorBoard event files in RUN_DIR/tb/ (view: tensorboard --logdir RUN_DIR/tb)."""
    mlflow: bool | None = None
    """None: log to MLflow when MLFLOW_TRACKING_URI is set; true: always (URI from mlflow_uri or the variable);
    false: never."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, ...); overrides MLFLOW_TRACKING_URI."""
    mlflow_experiment: str = Field(default="image-classifier", min_length=1)
    run_name: str | None = None
    """The MLflow run's name (the worker sets the job's name)."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Tags of the MLflow run (the worker sets job_id, worker and, for an uploaded dataset, dataset_hash)."""


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sched: SchedConfig = Field(default_factory=SchedConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        if self.data.name == "imagefolder" and not (self.data.path or self.data.dataset or self.data.prepared):
            raise _KeyError("data.path", self.data.path,
                            "required when data.name is 'imagefolder' (a folder or .zip of class folders), unless "
                            "data.dataset names a registered dataset or data.prepared a prepared form")
        if self.model.freeze == "backbone" and not self.model.pretrained:
            raise _KeyError("model.freeze", self.model.freeze,
                            "'backbone' needs model.pretrained: true (a frozen random backbone learns nothing)")
        if self.train.feature_cache == "on" and self.model.freeze != "backbone":
            raise _KeyError("train.feature_cache", self.train.feature_cache,
                            "'on' needs model.freeze: backbone (a backbone that trains changes its features every "
                            "step, so they cannot be computed once); use auto or off")
        batch = max(self.train.batch_size, self.train.eval_batch_size or 0)
        side = self.data.image_size
        channels = 1 if self.data.color_mode == "L" else 3
        if side and batch * channels * side * side * 4 > MAX_BATCH_INPUT_BYTES:
            key = "train.batch_size" if batch == self.train.batch_size else "train.eval_batch_size"
            raise _KeyError(key, batch, f"a batch of {batch} images of {side}×{side}×{channels} is "
                            f"{batch * channels * side * side * 4 / 2**30:.1f} GiB of float32 input; at most "
                            f"{MAX_BATCH_INPUT_BYTES / 2**30:g} GiB (lower the batch size or data.image_size)")
        from core.models import list_models  # local import: models import torch, config must stay light

        if self.model.name not in list_models():
            raise _KeyError("model.name", self.model.name,
                            f"unknown model {self.model.name!r}; choose from {', '.join(list_models())}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class _KeyError(ValueError):
    """A cross-field check's error, naming the key it is about (pydantic reports those without a location)."""

    def __init__(self, key: str, value: Any, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.error = FieldError(key, value, message)


def _field_errors(err: ValidationError) -> list[FieldError]:
    out = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, _KeyError):
            out.append(cause.error)
        elif e["type"] == "extra_forbidden":
            out.append(FieldError(key, e["input"], f"unknown key (value {e['input']!r}); see README 'Configuration' "
                                                   "for the allowed keys"))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            out.append(FieldError(key, e["input"], f"{msg} (got {e['input']!r})" if key else msg))
    return out


def validation_error(err: ValidationError) -> ConfigError:
    """pydantic's errors as one ConfigError: "invalid config: key: what is wrong (got value); ..."."""
    errors = _field_errors(err)
    return ConfigError("invalid config: " + "; ".join(str(e) for e in errors), errors)


def choices(model: type[BaseModel], key: str) -> tuple[Any, ...]:
    """The allowed values of a `Literal` config field, in declaration order: `choices(Config, "optim.name")` →
    ("adamw", "sgd"). The one list the dashboard's select boxes, error messages and dispatch tables use."""
    annotation: Any = model
    for part in key.split("."):
        fields = getattr(annotation, "model_fields", None)
        if not fields or part not in fields:
            raise KeyError(f"{key}: not a config key")
        annotation = fields[part].annotation
    if get_origin(annotation) is not Literal:
        raise KeyError(f"{key}: not a field with a fixed list of choices")
    return get_args(annotation)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` → (['a', 'b'], parsed value). Values are parsed as YAML scalars/lists (`1e-3`, `true`, `[0.8,0.1,0.1]`)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """`raw[a][b] = value` for the key "a.b", making missing sections; ValueError("'a' is not a section") when a
    part of the key holds a value instead of a section."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        parts, value = parse_override(item)
        try:
            set_dotted(raw, ".".join(parts), value)
        except ValueError as err:
            raise ConfigError(f"--set {item!r}: {err}") from None
    return raw


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config: the top level must be a mapping of sections, got {type(raw).__name__}")
    merged = apply_overrides(raw, overrides)
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise validation_error(err) from None


def load_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file's content ({} when empty); ConfigError saying "<what> '<path>' not found" or not valid YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {err}") from None
    return raw or {}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (or defaults when path is None), apply `--set` overrides, validate."""
    raw = load_yaml(path) if path is not None else {}
    return config_from_dict(raw, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
