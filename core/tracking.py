"""Metrics where users already look: TensorBoard event files in every run folder, and an MLflow run when asked.

Both are `EventSink`s (core/events.py) that do their work on a thread of their own: `emit()` appends to a bounded
buffer and returns, so neither a slow disk nor an unreachable tracking server ever makes a training step wait. They
import tensorboard and mlflow on that thread, and only when enabled (`track.tensorboard`, `track.mlflow` or
`MLFLOW_TRACKING_URI`); core imports neither otherwise.

- TensorBoard (`RUN_DIR/tb/`, `track.tensorboard`, on by default): `step/loss`, `step/lr`, `step/images_per_sec` over
  the global step; `epoch/train_loss`, `epoch/train_acc`, `epoch/val_loss`, `epoch/val_acc`, `epoch/val_macro_f1`,
  `epoch/lr`, `epoch/images_per_sec` over the epoch; `test/accuracy`, `test/macro_f1`. A resumed run hides the steps
  the interrupted attempt logged after its checkpoint (SummaryWriter's purge_step) and never writes an epoch twice.
  View: `tensorboard --logdir RUN_DIR/tb`.
- MLflow (`MLFLOW_TRACKING_URI`, or `track.mlflow: true` with `track.mlflow_uri`; `track.mlflow: false` turns it off
  even when the variable is set): one run per training run, named `track.run_name`, in experiment
  `track.mlflow_experiment`. Params: the flattened config (`data.name`, `optim.lr`, ...; not `track.*`). Metrics: the
  epoch metrics above without their prefix (step = epoch), `step_loss` and `step_lr` (step = global step),
  `test_accuracy` and `test_macro_f1`. Tags: `track.tags` (the worker sets `job_id` and `worker`, and `dataset_hash`
  for an uploaded dataset) plus `dataset_hash` when missing (sha256 of split.json and labels.json: which images, which
  classes). At the end: `report.json`, `model.onnx` as an MLflow ONNX model (`runs:/<run id>/model`) and `bundle.zip`.
  The run id is kept in `RUN_DIR/mlflow.json`, so a resumed run continues the same MLflow run; steps and epochs the
  server already has are not sent again. An unreachable server is reported once on stderr (the job log) and retried
  in the background with a growing pause; training never waits for it.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from core import runfolder
from core.events import append_bounded

TB_DIR = runfolder.TENSORBOARD
MLFLOW_RUN_FILE = runfolder.MLFLOW_RUN

BUFFER_EVENTS = 50_000
"""Events a tracking sink holds while its target is slow or away; beyond it the oldest step events are dropped."""

FLUSH_SECONDS = 1.0
"""Seconds between a tracking sink's batches (non-step events wake it at once)."""

RETRY_MAX_SECONDS = 10.0
"""Longest pause between two tries to reach an unreachable MLflow server."""

CLOSE_TIMEOUT = 120.0
"""Seconds `close()` waits for the last batch and the artifacts to reach a server that answers."""

CLOSE_TIMEOUT_UNREACHABLE = 3.0
"""Seconds `close()` waits when the server is unreachable at the end: the run ends anyway; what was not sent is said."""

MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
"""MLflow's own HTTP retries (minutes by default) are replaced by this sink's background retry; an environment that
sets these variables keeps its values."""

EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "lr", "images_per_sec")
"""Epoch-event fields logged as metrics (TensorBoard `epoch/<key>`, MLflow `<key>`)."""


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class BackgroundSink:
    """emit() buffers and returns; a daemon thread calls `open()` once and `handle(batch)` with the events in order.

    `handle` raises to have the batch retried after a pause (it must skip what it already sent); `finish()` runs once
    when closed. Subclasses never see an event on the training thread.
    """

    what = "tracking"

    def __init__(self) -> None:
        self._buf: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self.failing = False
        """True while the last try to hand events over failed (the close then waits only briefly)."""
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, name=f"{self.what}-sink", daemon=True)
        self._thread.start()

    # ---- the training thread's side
    def emit(self, type: str, data: dict[str, Any]) -> None:
        with self._lock:
            self.dropped += append_bounded(self._buf, (type, dict(data)), BUFFER_EVENTS)
        if type != "step":
            self._wake.set()

    def close(self) -> None:
        """Hand over what is left: up to CLOSE_TIMEOUT s, or CLOSE_TIMEOUT_UNREACHABLE s while the target fails."""
        self._closed.set()
        self._wake.set()
        start = time.monotonic()
        while self._thread.is_alive():
            waited = time.monotonic() - start
            if waited > CLOSE_TIMEOUT or (self.failing and waited > CLOSE_TIMEOUT_UNREACHABLE):
                with self._lock:
                    left = len(self._buf)
                _warn(f"{self.what}: the run ends with {left} event(s) (and the final artifacts) not sent")
                return
            self._thread.join(timeout=0.1)

    # ---- the sink's thread
    def open(self) -> None: ...

    def handle(self, batch: list[tuple[str, dict[str, Any]]]) -> None: ...

    def finish(self) -> None: ...

    def describe_failure(self, err: BaseException) -> str:
        return f"{self.what}: {type(err).__name__}: {err}"

    def _take(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            batch = list(self._buf)
            self._buf.clear()
        return batch

    def _put_back(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        with self._lock:
            self._buf.extendleft(reversed(batch))

    def _loop(self) -> None:
        try:
            self.open()
        except Exception as err:  # noqa: BLE001 - a tracking sink must never take the run down
            _warn(f"{self.describe_failure(err)}; it is off for this run")
            return
        pause, warned = FLUSH_SECONDS, False
        while True:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            closing = self._closed.is_set()
            batch = self._take()
            try:
                if batch:
                    self.handle(batch)
                if closing:
                    self.finish()
                    return
                if self.failing:
                    self.failing = False
                    _warn(f"{self.what}: reachable again; sending what was held back")
                pause = FLUSH_SECONDS
            except Exception as err:  # noqa: BLE001 - retried in the background; training goes on
                self._put_back(batch)
                self.failing = True
                if not warned:
                    _warn(f"{self.describe_failure(err)}; training continues, retrying in the background")
                    warned = True
                self._closed.wait(pause)  # close() cuts the pause short for a last try
                pause = min(pause * 2, RETRY_MAX_SECONDS)


# ---------------------------------------------------------------------------------------------------- TensorBoard
class TensorBoardSink(BackgroundSink):
    """Scalars into `RUN_DIR/tb/` through torch.utils.tensorboard's SummaryWriter (see the module docstring)."""

    what = "TensorBoard"

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.writer: Any = None
        self._start: dict[str, Any] = {}
        self._epochs_logged: set[int] = set()
        super().__init__()

    def open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - fails early when tensorboard is missing

    def _writer(self) -> Any:
        """The SummaryWriter, made at the first value to write (after `start`, which says whether this resumes)."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None
            resumed, spe = self._start.get("resumed_from"), self._start.get("steps_per_epoch")
            if resumed:
                self._epochs_logged = logged_steps(self.log_dir, "epoch/val_acc")
                if spe:
                    purge = int(resumed) * int(spe) + 1  # hides the steps logged after the checkpoint we resume from
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        return self.writer

    def handle(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        for type_, data in batch:
            if type_ == "start":
                self._start = data
            elif type_ == "step" and data.get("global_step") is not None:
                w, step = self._writer(), int(data["global_step"])
                for key in ("loss", "lr", "images_per_sec"):
                    if _number(data.get(key)):
                        w.add_scalar(f"step/{key}", float(data[key]), step)
            elif type_ == "epoch":
                epoch = int(data["epoch"])
                w = self._writer()
                if epoch in self._epochs_logged:  # the resumed run's repeat of its checkpoint's epoch
                    continue
                self._epochs_logged.add(epoch)
                for key in EPOCH_KEYS:
                    if _number(data.get(key)):
                        w.add_scalar(f"epoch/{key}", float(data[key]), epoch)
                w.flush()
            elif type_ == "report":
                w, test, step = self._writer(), data.get("test") or {}, int(data.get("epochs_completed") or 0)
                for key in ("accuracy", "macro_f1"):
                    if _number(test.get(key)):
                        w.add_scalar(f"test/{key}", float(test[key]), step)
                w.flush()

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()


def logged_steps(log_dir: Path, tag: str) -> set[int]:
    """The steps of `tag` in the event files already in `log_dir` (tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not log_dir.is_dir():
        return set()
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {int(s.step) for s in acc.Scalars(tag)} if tag in acc.Tags().get("scalars", []) else set()


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


# --------------------------------------------------------------------------------------------------------- MLflow
def mlflow_uri(track: Any) -> str | None:
    """The tracking URI a run logs to, or None when MLflow is off for it (see the module docstring)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if track.mlflow is False:
        return None
    if track.mlflow is True:
        return track.mlflow_uri or env or None
    return env or None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MlflowSink(BackgroundSink):
    """One MLflow run per run folder, through MlflowClient (see the module docstring)."""

    what = "MLflow"

    def __init__(self, uri: str, run_dir: str | Path, config: dict[str, Any], *, resume: bool):
        self.uri = uri
        self.run_dir = Path(run_dir)
        self.config = config
        self.resume = resume
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.status: str | None = None
        self.done = False
        self.artifacts_sent = False
        self._sent: dict[str, set[int]] = collections.defaultdict(set)
        super().__init__()

    def describe_failure(self, err: BaseException) -> str:
        text = str(err).splitlines()[0][:300] if str(err) else ""
        return f"MLflow tracking server {self.uri} unreachable or refusing ({type(err).__name__}: {text})"

    def open(self) -> None:
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)  # log_model reads the process-wide URI
        self.client = MlflowClient(self.uri)

    # ---- the run
    def _ensure_run(self) -> str:
        if self.run_id is not None:
            return self.run_id
        track = self.config.get("track") or {}
        saved = _read_json(self.run_dir / MLFLOW_RUN_FILE) if self.resume else None
        if saved and saved.get("tracking_uri") == self.uri:
            run_id = saved["run_id"]
            self.experiment_id = saved.get("experiment_id")
            self.client.update_run(run_id, status="RUNNING")
            for key in (*EPOCH_KEYS, "step_loss", "step_lr"):
                self._sent[key] = {int(m.step) for m in self.client.get_metric_history(run_id, key)}
            self.run_id = run_id
            return run_id
        name = track.get("mlflow_experiment") or "image-classifier"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        tags = {str(k): str(v) for k, v in (track.get("tags") or {}).items()}
        tags.setdefault("dataset_hash", dataset_hash(self.run_dir))
        run = self.client.create_run(exp_id, tags=tags, run_name=track.get("run_name") or None)
        run_id = run.info.run_id
        self.experiment_id = exp_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(self.config).items() if not k.startswith("track.")]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])
        runfolder.write_json(self.run_dir / MLFLOW_RUN_FILE,
                      {"tracking_uri": self.uri, "experiment_id": exp_id, "run_id": run_id})
        self.run_id = run_id
        return run_id

    def handle(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        from mlflow.entities import Metric

        if self.run_id is None and not any(t == "start" for t, _ in batch):
            return  # before `start` (the data phase): split.json, which the dataset hash reads, is not written yet
        run_id = self._ensure_run()
        now = int(time.time() * 1000)
        metrics: list[Any] = []

        def add(key: str, value: Any, step: int) -> None:
            if _number(value) and step not in self._sent[key]:
                metrics.append(Metric(key, float(value), now, step))

        for type_, data in batch:
            if type_ == "step" and data.get("global_step") is not None:
                add("step_loss", data.get("loss"), int(data["global_step"]))
                add("step_lr", data.get("lr"), int(data["global_step"]))
            elif type_ == "epoch":
                for key in EPOCH_KEYS:
                    add(key, data.get(key), int(data["epoch"]))
            elif type_ == "report":
                test, step = data.get("test") or {}, int(data.get("epochs_completed") or 0)
                add("test_accuracy", test.get("accuracy"), step)
                add("test_macro_f1", test.get("macro_f1"), step)
            elif type_ == "phase" and data.get("phase") == "done":
                self.done = True
            elif type_ == "error":
                self.status = "KILLED" if data.get("kind") in ("Cancelled", "KeyboardInterrupt") else "FAILED"
        for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            chunk = metrics[i:i + 1000]
            self.client.log_batch(run_id, metrics=chunk)
            for m in chunk:  # a retried batch skips what went out
                self._sent[m.key].add(m.step)
        if self.done and not self.artifacts_sent:
            self._log_artifacts(run_id)

    def _log_artifacts(self, run_id: str) -> None:
        report = self.run_dir / runfolder.REPORT
        if report.exists():
            self.client.log_artifact(run_id, str(report))
        onnx_path = self.run_dir / runfolder.exported(runfolder.ONNX)
        if onnx_path.exists():
            import mlflow
            import mlflow.onnx
            import onnx

            if self.experiment_id:  # the logged model goes to the run's experiment (else to the default one)
                mlflow.set_experiment(experiment_id=self.experiment_id)
            mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model", run_id=run_id)
        bundle = self.run_dir / runfolder.exported(runfolder.BUNDLE)
        if bundle.exists():
            self.client.log_artifact(run_id, str(bundle))
        self.artifacts_sent = True

    def finish(self) -> None:
        if self.run_id is None:
            return
        status = self.status or ("FINISHED" if self.done else None)
        if status:
            self.client.set_terminated(self.run_id, status=status)


def dataset_hash(run_dir: Path) -> str:
    """sha256 of the run's split.json and labels.json: the same images in the same splits with the same classes."""
    h = hashlib.sha256()
    for name in (runfolder.SPLIT, runfolder.LABELS):
        path = run_dir / name
        if path.exists():
            h.update(path.read_bytes())
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------- setup
def tracking_sinks(track: Any, config: dict[str, Any], run_dir: Path, *, resume: bool) -> list[Any]:
    """The tracking sinks a run's rank 0 adds to its sinks (none when everything is off)."""
    if not resume:  # a fresh run in an old folder starts fresh curves and a new MLflow run
        import shutil

        shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
        (run_dir / MLFLOW_RUN_FILE).unlink(missing_ok=True)
    sinks: list[Any] = []
    if track.tensorboard:
        sinks.append(TensorBoardSink(run_dir / TB_DIR))
    uri = mlflow_uri(track)
    if uri:
        sinks.append(MlflowSink(uri, run_dir, config, resume=resume))
    elif track.mlflow is True:
        _warn("track.mlflow is true but neither track.mlflow_uri nor MLFLOW_TRACKING_URI is set: MLflow is off")
    return sinks
