"""Data shaping for the pages, with no drawing: the jobs table, a job's live series, workers, comparisons.

Everything here is plain Python over the dicts `worker.api` returns, so it can be tested and timed without Streamlit.
"""
from __future__ import annotations

import dataclasses
import math
import time
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from core import runfolder as rf
from worker.api import ACTIVE_STATES, JobState, datasets, shown_counts

STATE_ICONS = {
    JobState.QUEUED: "hourglass_top", JobState.RUNNING: "play_circle", JobState.RECOVERING: "sync_problem",
    JobState.FINISHED: "check_circle", JobState.FAILED: "error", JobState.CANCELLED: "stop_circle",
    JobState.PRUNED: "content_cut",
}
"""A Material icon per job state (`:material/NAME:` in Streamlit text); icons, not emoji, so any browser draws them."""

STATE_COLORS = {
    JobState.QUEUED: "gray", JobState.RUNNING: "blue", JobState.RECOVERING: "orange", JobState.FINISHED: "green",
    JobState.FAILED: "red", JobState.CANCELLED: "gray", JobState.PRUNED: "violet",
}
"""A badge colour per job state."""


# ----------------------------------------------------------------------------------------------------- formatting
def fmt_seconds(seconds: float | None) -> str:
    """1h 02m, 3m 07s, 42s; '' when unknown."""
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return ""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def fmt_ago(t: float | None, now: float | None = None) -> str:
    """'4 s ago', '3 min ago'; '' when unknown."""
    if not t:
        return ""
    d = max(0.0, (now or time.time()) - t)
    if d < 90:
        return f"{d:.0f} s ago"
    if d < 5400:
        return f"{d / 60:.0f} min ago"
    return f"{d / 3600:.1f} h ago"


def fmt_time(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return ""


def state_label(state: str | None, *, icon: bool = False) -> str:
    """The state as text; with `icon`, prefixed by its Material icon (for Streamlit markdown, pills, badges)."""
    text = state or "unknown"
    return f":material/{STATE_ICONS[text]}: {text}" if icon and text in STATE_ICONS else text


def job_label(job: dict[str, Any]) -> str:
    """How a job is named in pickers: id · name (the state changes while a picker is open; pages show it apart)."""
    return f"{job.get('id')} · {job.get('name') or ''}"


def timing_text(job: dict[str, Any]) -> str:
    """Duration of a job that ended or has run, plus its ETA while running."""
    if job.get("state") == JobState.RUNNING and job.get("eta") is not None:
        return f"{fmt_seconds(job.get('duration'))} (ETA {fmt_seconds(job['eta'])})"
    return fmt_seconds(job.get("duration"))


# ----------------------------------------------------------------------------------------------------- jobs table
JOB_COLUMNS = ["id", "name", "status", "progress", "epoch", "best val acc", "duration / ETA", "resources", "worker",
               "owner", "submitted"]


def rank_kind(job: dict[str, Any], live_kinds: set[str] | frozenset[str] = frozenset()) -> str | None:
    """"cpu" or "gpu": what the job's ranks are. Where it ran, its device says (the start event's `device`); before
    that, the live workers do when they are all of one kind (`live_kinds`: their `kind`s). None: not known yet."""
    device = str(job.get("device") or "")
    if device:
        return "gpu" if device.startswith("cuda") else "cpu"
    return next(iter(live_kinds)) if len(live_kinds) == 1 else None


def resources_text(job: dict[str, Any], kind: str | None) -> str:
    """"1 CPU rank", "2 GPUs", "2 nodes × 4 GPUs"; "1 GPU or CPU rank" while the kind is unknown."""
    n, nodes = int(job.get("gpus") or 1), int(job.get("num_nodes") or 1)
    one, many = {"cpu": ("CPU rank", "CPU ranks"), "gpu": ("GPU", "GPUs")}.get(
        kind or "", ("GPU or CPU rank", "GPUs or CPU ranks"))
    text = f"{n} {one if n == 1 else many}"
    return f"{nodes} nodes × {text}" if nodes > 1 else text


def jobs_frame(jobs: list[dict[str, Any]], live_kinds: set[str] | frozenset[str] = frozenset()) -> pd.DataFrame:
    """One row per job for the jobs table (columns JOB_COLUMNS), in the order given (newest first). `live_kinds`:
    the kinds of the live workers (`rank_kind`)."""
    rows = {c: [] for c in JOB_COLUMNS}
    for j in jobs:
        epochs = j.get("epochs")
        rows["id"].append(j.get("id"))
        rows["name"].append(j.get("name") or "")
        rows["status"].append(state_label(j.get("state")))
        rows["progress"].append(float(j.get("progress") or 0.0))
        rows["epoch"].append(f"{j.get('epoch') or 0}/{epochs}" if epochs else "")
        rows["best val acc"].append(j.get("best_val_acc"))
        rows["duration / ETA"].append(timing_text(j))
        rows["resources"].append(resources_text(j, rank_kind(j, live_kinds)))
        rows["worker"].append(j.get("worker") or "")
        rows["owner"].append(j.get("owner") or "")
        rows["submitted"].append(datetime.fromtimestamp(j["submitted_at"]) if j.get("submitted_at") else None)
    frame = pd.DataFrame(rows, columns=JOB_COLUMNS)
    frame["best val acc"] = pd.to_numeric(frame["best val acc"], errors="coerce")
    frame["submitted"] = pd.to_datetime(frame["submitted"])
    return frame


def state_counts(jobs: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.get("state") or "unknown"] = counts.get(j.get("state") or "unknown", 0) + 1
    return counts


def any_active(jobs: list[dict[str, Any]]) -> bool:
    return any(j.get("state") in ACTIVE_STATES for j in jobs)


# ---------------------------------------------------------------------------------------------------- live series
@dataclasses.dataclass
class LiveSeries:
    """Every chart point of one job, grown from the stream entries after `last_id` (kept in st.session_state).

    Steps are placed at fractional epochs ((epoch - 1) + step / steps_per_epoch). A resumed run repeats the steps of
    the epoch it resumes; a step at or before the last one drawn replaces the points from there on, so every epoch
    appears once in the charts, as in the stream's epoch events.
    """

    last_id: str = "0"
    entries: int = 0
    step_x: list[float] = dataclasses.field(default_factory=list)
    step_loss: list[float | None] = dataclasses.field(default_factory=list)
    step_lr: list[float | None] = dataclasses.field(default_factory=list)
    step_ips: list[float | None] = dataclasses.field(default_factory=list)
    epoch: list[int] = dataclasses.field(default_factory=list)
    train_loss: list[float | None] = dataclasses.field(default_factory=list)
    val_loss: list[float | None] = dataclasses.field(default_factory=list)
    train_acc: list[float | None] = dataclasses.field(default_factory=list)
    val_acc: list[float | None] = dataclasses.field(default_factory=list)
    epoch_lr: list[float | None] = dataclasses.field(default_factory=list)
    epoch_ips: list[float | None] = dataclasses.field(default_factory=list)
    phase: str | None = None
    report: dict[str, Any] | None = None

    @property
    def points(self) -> int:
        """Chart points held (steps count once per plotted quantity; a test waits for this to grow)."""
        return len(self.step_x) + len(self.epoch)

    def add(self, events: list[dict[str, Any]], scanned: int | None = None) -> int:
        """Fold stream entries ({"id", "type", "data"}, oldest first) in; returns how many were new.

        `scanned`: how many stream entries the events stand for, when the reader thinned them (worker/chartstream.py).
        """
        n = 0
        for ev in events:
            self.last_id = ev["id"]
            n += 1
            data = ev.get("data") or {}
            kind = ev.get("type")
            if kind == "step":
                self._add_step(data)
            elif kind == "epoch":
                self._add_epoch(data)
            elif kind == "phase":
                self.phase = data.get("phase")
            elif kind == "report":
                self.report = data
        self.entries += n if scanned is None else scanned
        return n

    def _add_step(self, d: dict[str, Any]) -> None:
        steps = d.get("steps_per_epoch") or 0
        if not steps or d.get("epoch") is None:
            return
        x = (int(d["epoch"]) - 1) + float(d.get("step") or 0) / steps
        if self.step_x and x <= self.step_x[-1]:  # a resumed attempt redoes these steps: keep the new ones
            cut = int(np.searchsorted(np.asarray(self.step_x), x, side="left"))
            for series in (self.step_x, self.step_loss, self.step_lr, self.step_ips):
                del series[cut:]
        self.step_x.append(x)
        self.step_loss.append(_num(d.get("loss")))
        self.step_lr.append(_num(d.get("lr")))
        self.step_ips.append(_num(d.get("images_per_sec")))

    def _add_epoch(self, d: dict[str, Any]) -> None:
        e = d.get("epoch")
        if e is None or int(e) in self.epoch:  # the stream holds each epoch once; this guards a replayed read
            return
        self.epoch.append(int(e))
        self.train_loss.append(_num(d.get("train_loss")))
        self.val_loss.append(_num(d.get("val_loss")))
        self.train_acc.append(_num(d.get("train_acc")))
        self.val_acc.append(_num(d.get("val_acc")))
        self.epoch_lr.append(_num(d.get("lr")))
        self.epoch_ips.append(_num(d.get("images_per_sec")))


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def thin(x: list[float], y: list[float | None], max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` evenly spaced points of a line (first and last kept), as float arrays (None → NaN)."""
    xs = np.asarray(x, dtype=float)
    ys = np.asarray([np.nan if v is None else v for v in y], dtype=float)
    if len(xs) <= max_points:
        return xs, ys
    idx = np.unique(np.linspace(0, len(xs) - 1, max_points).round().astype(int))
    return xs[idx], ys[idx]


# -------------------------------------------------------------------------------------------------------- workers
def gpus_text(gpus: list[dict[str, Any]] | None) -> str:
    if not gpus:
        return "CPU only"
    parts = []
    for g in gpus:
        mem = g.get("memory_mb")
        parts.append(f"{g.get('index', '?')}: {g.get('name', 'GPU')}" + (f" ({mem / 1024:.0f} GB)" if mem else ""))
    return "; ".join(parts)


WORKER_COLUMNS = ["name", "host", "address", "kind", "GPUs", "slots", "state", "current job", "reserved for",
                  "last heartbeat", "up since"]


NODE_COLUMNS = ["node", "worker", "host", "address", "ranks", "state"]


def _node_ranks(node: dict[str, Any]) -> str:
    """Global ranks `0–3` once the node started; before that, how many it will run."""
    ranks = node.get("global_ranks") or []
    if ranks:
        return f"{ranks[0]}–{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
    return f"{node.get('ranks') or '?'} rank(s)"


def nodes_frame(nodes: list[dict[str, Any]]) -> pd.DataFrame:
    """A multi-node job's nodes (worker.api.job_nodes): one row per node, its `state` a worker.api.NodeState; `node`
    is empty while the gang gathers."""
    rows = [{
        "node": "" if n.get("node_rank") is None else str(n["node_rank"]), "worker": n.get("worker") or "",
        "host": n.get("host") or "", "address": n.get("addr") or "",
        "ranks": _node_ranks(n), "state": n.get("state") or "",
    } for n in nodes]
    return pd.DataFrame(rows, columns=NODE_COLUMNS)


def workers_frame(workers: list[dict[str, Any]], now: float | None = None) -> pd.DataFrame:
    now = now or time.time()
    rows = [{
        "name": w.get("name"), "host": w.get("hostname") or "", "address": w.get("addr") or "",
        "kind": w.get("kind") or "",
        "GPUs": gpus_text(w.get("gpus")), "slots": w.get("slots"), "state": w.get("state") or "",
        "current job": w.get("current_job") or "", "reserved for": w.get("reserved_for") or "",
        "last heartbeat": fmt_ago(w.get("heartbeat"), now),
        "up since": fmt_time(w.get("started_at")),
    } for w in workers]
    return pd.DataFrame(rows, columns=WORKER_COLUMNS)


# -------------------------------------------------------------------------------------------------------- compare
def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 3}} → {"train.epochs": 3}."""
    out: dict[str, Any] = {}
    for k, v in (cfg or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differing_params(configs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Rows: the dotted config keys whose values differ between the runs; columns: the runs (labels)."""
    flat = {label: flatten(cfg) for label, cfg in configs.items()}
    keys = sorted({k for f in flat.values() for k in f})
    rows = {}
    for k in keys:
        values = [flat[label].get(k) for label in flat]
        if len({repr(v) for v in values}) > 1:
            rows[k] = [_cell(v) for v in values]
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(flat)) if rows else pd.DataFrame(
        columns=list(flat))


def _cell(v: Any) -> str:
    return "" if v is None else str(v)


def final_metrics(job: dict[str, Any], report: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers a comparison lines up: best val accuracy, test metrics, epochs, time, export sizes."""
    report = report or {}
    test = report.get("test") or {}
    export = report.get("export") or {}
    onnx, int8 = export.get("onnx") or {}, export.get("int8") or {}
    return {
        "state": job.get("state"),
        "epochs": f"{job.get('epoch') or 0}/{job.get('epochs') or '?'}",
        "best val acc": job.get("best_val_acc"),
        "test acc": test.get("accuracy"),
        "test macro-F1": test.get("macro_f1"),
        "duration": fmt_seconds(job.get("duration")),
        "ONNX size": fmt_bytes(onnx.get("bytes")),
        "INT8 acc": int8.get("accuracy"),
        "INT8 size": fmt_bytes(int8.get("bytes")),
    }


def metrics_frame(rows: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Columns: runs; rows: the final metrics (numbers formatted for reading)."""
    out = {}
    for label, m in rows.items():
        out[label] = {k: (f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))) for k, v in m.items()}
    return pd.DataFrame(out)


# -------------------------------------------------------------------------------------------------------- reports
def per_class_frame(report: dict[str, Any], split: str = "test") -> pd.DataFrame:
    rows = (report.get(split) or {}).get("per_class") or []
    frame = pd.DataFrame(rows, columns=["class", "precision", "recall", "f1", "support"])
    return frame


def export_rows(report: dict[str, Any]) -> pd.DataFrame:
    """The export's evidence: ONNX parity with PyTorch, INT8 accuracy and sizes, one row per model file; `deploy`
    marks the file the export recommends (core/export/deploy.py)."""
    export = report.get("export") or {}
    onnx, int8 = export.get("onnx") or {}, export.get("int8") or {}
    deploy = (export.get("deploy") or {}).get("file")
    rows = []
    if onnx:
        rows.append({"file": rf.ONNX, "deploy": deploy == rf.ONNX, "ok": onnx.get("ok"),
                     "size": fmt_bytes(onnx.get("bytes")),
                     "test accuracy": onnx.get("accuracy"), "max |Δlogit| vs PyTorch": onnx.get("max_abs_diff"),
                     "top-1 agreement": onnx.get("top1_agreement"), "opset": onnx.get("opset"),
                     "latency ms (batch 1)": onnx.get("latency_ms_batch1")})
    if int8:
        rows.append({"file": rf.INT8_ONNX, "deploy": deploy == rf.INT8_ONNX, "ok": int8.get("ok"),
                     "size": fmt_bytes(int8.get("bytes")),
                     "test accuracy": int8.get("accuracy"), "max |Δlogit| vs PyTorch": None,
                     "top-1 agreement": int8.get("top1_agreement_with_fp32"), "opset": onnx.get("opset"),
                     "latency ms (batch 1)": int8.get("latency_ms_batch1")})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------- sweeps
def sweeps_frame(sweeps: list[dict[str, Any]]) -> pd.DataFrame:
    """The Sweeps list: one row per sweep, with its progress and trial counts."""
    rows = []
    for s in sweeps:
        rows.append({
            "sweep": s.get("id"), "name": s.get("name"), "owner": s.get("owner") or "",
            "status": state_label(s.get("state")),
            "progress": float(s.get("progress") or 0.0), "trials": f"{s.get('ended', 0)}/{s.get('trials')}",
            **{k.value: n for k, n in shown_counts(s.get("counts") or {}).items()}, "best": s.get("best_value"),
            "objective": f"{s.get('direction', '')[:3]} {s.get('metric', '')}",
            "created": pd.to_datetime(s.get("created_at"), unit="s") if s.get("created_at") else None,
        })
    return pd.DataFrame(rows)


def trials_frame(trials: list[dict[str, Any]], keys: list[str]) -> pd.DataFrame:
    """A sweep's trials table: number, state, value, epoch, one column per searched key, and a link to the job."""
    rows = []
    for t in trials:
        rows.append({
            "trial": t["number"], "status": state_label(t.get("state")), "value": t.get("value"),
            "epoch": t.get("epoch"), **{k: t["params"].get(k) for k in keys},
            "job": f"job?job={t['job']}" if t.get("job") else None, "note": t.get("error") or "",
        })
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------- datasets
SOURCE_KIND_LABELS = {datasets.UPLOAD: "uploaded", datasets.IN_PLACE: "read in place"}
"""How a dataset version's files are kept (worker.datasets' source kinds), as the Datasets page says it."""

DATA_PATH_LABELS = {
    "tensor_cache": "tensor cache (decoded once into memory, augmented as tensors)",
    "feature_cache": "feature cache (frozen backbone's embeddings computed once)",
    "dataloader": "DataLoader (images decoded by PIL every epoch)",
    "shards": "prepared shards (decoded once, streamed from the shard cache)",
}
"""What report.json's data path (core/train.py: `data_path`) means, for the Job page; unknown kinds show as is."""


def data_path_text(report: dict[str, Any]) -> str | None:
    """The data path a run used, from report.json (`data.path`, or the older top-level `data_path`); None if absent."""
    data = report.get("data") if isinstance(report.get("data"), dict) else {}
    kind = data.get("path") or report.get("data_path")
    if isinstance(kind, dict):  # a richer record: its kind names the path
        kind = kind.get("kind")
    return DATA_PATH_LABELS.get(str(kind), str(kind)) if kind else None


def datasets_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The Datasets list: one row per dataset (worker.datasets.summary), its latest version's facts."""
    return pd.DataFrame([{
        "name": r["name"], "latest": f"{r['name']}:{r['latest']}", "versions": len(r["versions"]),
        "classes": r["classes"], "images": r["images"], "size": fmt_bytes(r["bytes"]),
        "source": SOURCE_KIND_LABELS.get(r["kind"], r["kind"]), "owner": ", ".join(r.get("owners") or []),
        "created": pd.to_datetime(r["created_at"], unit="s") if r.get("created_at") else None,
    } for r in rows], columns=["name", "latest", "versions", "classes", "images", "size", "source", "owner",
                               "created"])


def versions_frame(versions: list[Any]) -> pd.DataFrame:
    """One dataset's versions (worker.datasets.DatasetVersion), newest first."""
    return pd.DataFrame([{
        "version": v.version, "classes": len(v.classes), "images": v.num_images, "size": fmt_bytes(v.bytes),
        "source": SOURCE_KIND_LABELS.get(v.kind, v.kind), "hash": v.hash[:12], "owner": v.owner,
        "created": pd.to_datetime(v.created_at, unit="s") if v.created_at else None,
    } for v in sorted(versions, key=lambda v: -v.version)],
        columns=["version", "classes", "images", "size", "source", "hash", "owner", "created"])


def class_counts_frame(counts: dict[str, int], by_split: dict[str, dict[str, int]] | None) -> pd.DataFrame:
    """Images per class, with one column per split folder when the data is pre-split (train/val/test)."""
    splits = [s for s in ("train", "val", "test") if s in (by_split or {})]
    return pd.DataFrame([{"class": c, "images": n, **{s: by_split[s].get(c, 0) for s in splits}}
                         for c, n in counts.items()], columns=["class", "images", *splits])


def dataset_jobs_frame(jobs: list[Any]) -> pd.DataFrame:
    """The jobs submitted on a version (worker.datasets.JobUse), newest first, each linking to its Job page."""
    return pd.DataFrame([{
        "job": f"job?job={j.id}", "status": state_label(j.state) if j.state else "deleted",
        "submitted": pd.to_datetime(j.submitted_at, unit="s"),
    } for j in sorted(jobs, key=lambda j: -j.submitted_at)], columns=["job", "status", "submitted"])
