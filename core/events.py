"""How core reports what happens: a tiny sink interface. Core never imports Redis or Streamlit.

Event types (each an `emit(type, data)` call, `data` a JSON-able dict):
- `start`:  {"epochs", "world_size", "classes", "counts", "config", "device", "amp", "resumed_from",
            "steps_per_epoch", "data_path" ("dataloader" | "tensor_cache" | "feature_cache" | "shards"),
            "feature_cache" (report.json's block when on, else {"off": why})}
- `step`:   {"epoch", "step", "global_step", "steps_per_epoch", "loss", "lr", "images_per_sec"}
- `epoch`:  {"epoch" (1-based), "epochs", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "lr",
             "seconds", "images_per_sec", "best_val_acc"}
- `phase`:  {"phase": "prepare" | "data" | "embed" | "train" | "test" | "export" | "done" | "early_stop"}
- `prepare`: {"done", "total", "images_per_sec"}: a worker preparing the job's dataset into shards before launching
            it (worker/datasets/prepared.py), every 256 images and at the end
- `embed`:  {"done", "total", "views", "images_per_sec"}: the feature cache's embedding pass (core.features), at most
            once a second and at the end; `total` counts this rank's images (views × train shard + val shard)
- `report`: the final report.json content (without per-sample predictions)
- `error`:  {"error", "kind"}

Epoch events are idempotent in every sink: an epoch number already seen is dropped, so a resumed run never shows an
epoch twice. A worker plugs in its own sink with `CORE_EVENT_SINK=module:factory` (factory() -> EventSink).
"""
from __future__ import annotations

import importlib
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

EPOCH_METRICS = ("val_acc", "val_loss", "val_macro_f1", "train_acc", "train_loss", "best_val_acc", "lr", "seconds",
                 "images_per_sec")
"""The numbers every `epoch` event carries (see above): what a sweep may optimise and what its pruner watches."""


class EventSink(Protocol):
    def emit(self, type: str, data: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullSink:
    def emit(self, type: str, data: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """Appends `{"type", "time", "data"}` lines to a file (the run's metrics.jsonl); flushed per event."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._epochs_seen = {
            rec["data"].get("epoch") for rec in read_jsonl(self.path) if rec.get("type") == "epoch"
        }
        self._fh = self.path.open("a", encoding="utf-8")

    def emit(self, type: str, data: dict[str, Any]) -> None:
        if type == "epoch":
            if data.get("epoch") in self._epochs_seen:
                return
            self._epochs_seen.add(data.get("epoch"))
        self._fh.write(json.dumps({"type": type, "time": time.time(), "data": data}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class PrintSink:
    """Human-readable epoch lines on stdout (the CLI's summary)."""

    def emit(self, type: str, data: dict[str, Any]) -> None:
        if type == "epoch":
            print(
                f"epoch {data['epoch']}/{data['epochs']}  train loss {data['train_loss']:.4f} acc {data['train_acc']:.4f}"
                f"  val loss {data['val_loss']:.4f} acc {data['val_acc']:.4f} f1 {data['val_macro_f1']:.4f}"
                f"  {data['images_per_sec']:.0f} img/s  {data['seconds']:.1f}s",
                flush=True,
            )

    def close(self) -> None:
        pass


class MultiSink:
    def __init__(self, *sinks: EventSink):
        self.sinks = [s for s in sinks if s is not None]

    def emit(self, type: str, data: dict[str, Any]) -> None:
        for s in self.sinks:
            s.emit(type, data)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def append_bounded(buf: deque[tuple[str, dict[str, Any]]], event: tuple[str, dict[str, Any]], limit: int) -> bool:
    """Append (type, data) to a sink's buffer of at most `limit` events; when it is full, the oldest step event makes
    room (else the oldest event): curves thin out, epochs and phases survive. Returns whether an event was dropped."""
    dropped = len(buf) >= limit
    if dropped:
        for i, (t, _) in enumerate(buf):
            if t == "step":
                del buf[i]
                break
        else:
            buf.popleft()
    buf.append(event)
    return dropped


def sink_from_env() -> EventSink | None:
    """The sink named by `CORE_EVENT_SINK=module:factory`, or None. Imported lazily so core depends on nothing."""
    spec = os.environ.get("CORE_EVENT_SINK", "").strip()
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attr or "sink_from_env")
    return factory()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON line of a file (a torn last line, from a crash, is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
