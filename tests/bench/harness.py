"""What every benchmark family shares: the row type, the table and the docs block it prints, the JSON it writes, the
machine it ran on, and the side-by-side timing (alternate, ratio_median) that makes rows comparable on a shared,
loaded machine. A family is a module of this package with a `SECTION`; `python -m tests.bench` runs them."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "benchmarks.md"
"""The file whose `bench:start`/`bench:end` block a full run rewrites."""
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"


# ---------------------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One line of the table / one JSON record. target None: informational (no target to meet)."""

    name: str
    value: float | None
    target: float | None
    unit: str
    higher_is_better: bool = True
    note: str = ""
    shown: str | None = field(default=None, repr=False)
    """Text for the value column when the number alone would mislead ("never", "n/a")."""

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None or not math.isfinite(self.value):
            return None if self.target is None or self.shown == "n/a" else False
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def record(self) -> dict[str, Any]:
        value = self.value if self.value is None or math.isfinite(self.value) else None
        return {"name": self.name, "value": value, "target": self.target, "unit": self.unit,
                "higher_is_better": self.higher_is_better, "note": self.note}


def na(name: str, target: float | None, unit: str, why: str, higher_is_better: bool = True) -> Row:
    return Row(name, None, target, unit, higher_is_better, note=why, shown="n/a")


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "never"
    if unit in ("×", "ratio"):
        return f"{v:.2f}"
    if unit == "%":
        return f"{v:+.1f}"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"


def table(rows: list[Row]) -> str:
    lines = ["| # | benchmark | value | target | unit | met | note |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        target = "-" if r.target is None else ("≥ " if r.higher_is_better else "≤ ") + _fmt(r.target, r.unit)
        met = {True: "yes", False: "**MISSED**", None: "-"}[r.met]
        lines.append(f"| {i} | {r.name} | {r.shown or _fmt(r.value, r.unit)} | {target} | {r.unit} | {met} | "
                     f"{r.note} |")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ machine
def machine(*, keeps_freed_memory: bool = False) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    # what decides these numbers most: AVX-512, VNNI (int8 dot products) and BF16 (native bf16 autocast)
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    if isa:
        cpu = f"{cpu} ({', '.join(isa)})"
    versions: dict[str, str] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "onnxruntime", "onnx", "redis", "rq", "streamlit", "numpy"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "os": platform.platform(), "versions": versions, "load_avg": [round(x, 2) for x in load],
            "malloc": "keeps freed memory (core.runtime.keep_freed_memory)" if keeps_freed_memory else "default",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# --------------------------------------------------------------------------------------------------------- timing
def alternate(sides: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run each side once per repetition, rotating their order, so load changes hit every side alike."""
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            out[name].append(sides[name]())
    return out


def ratio_median(a: list[float], b: list[float]) -> float:
    """Median of the per-repetition ratios a[i] / b[i] (each pair measured back to back)."""
    return statistics.median(x / y for x, y in zip(a, b))


def quartiles(values: list[float]) -> str:
    """The first and third quartile of `values` ("n/a" under four values): the spread beside a median."""
    if len(values) < 4:
        return "n/a"
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.3f}–{q[2]:.3f}"


# ------------------------------------------------------------------------------------------------------- output
def write_docs(rows: list[Row], info: dict[str, Any], seconds: float, quick: bool, path: Path = DOCS) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    block = "\n".join([
        MARK_START,
        "## Latest run",
        "",
        (f"`python -m tests.bench{' --quick' if quick else ''}` on {info['date']}, {seconds:.0f} s. "
         f"Machine: {info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}), "
         f"GPU: {info['gpu'] or 'none'}; malloc: {info['malloc']}; load average at the start {info['load_avg']}. "
         f"{info['os']}."),
        f"Versions: {versions}.",
        "",
        table(rows),
        MARK_END,
    ])
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    if MARK_START in text and MARK_END in text:
        head, _, rest = text.partition(MARK_START)
        _, _, tail = rest.partition(MARK_END)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_json(rows: list[Row], path: Path) -> None:
    """`--json FILE`: the rows as a list of {name, value, target, unit, higher_is_better, note} (tests/gpu_check.sh
    reads it)."""
    path.write_text(json.dumps([r.record() for r in rows], indent=2), encoding="utf-8")


# ------------------------------------------------------------------------------------------------------ sections
@dataclass(frozen=True)
class Section:
    """One family of rows, as `--only NAME` selects it. `fallback`: the rows it stands for when it cannot run (its
    prerequisites missing, or it raised), each then shown "n/a" with the reason."""

    name: str
    label: str
    """How the log names it ("rows 1-2")."""
    run: Callable[..., list[Row]]
    """run(quick) or, with `redis`, run(quick, url) of a private redis-server started for it."""
    fallback: tuple[Row, ...]
    redis: bool = False
    available: Callable[[], bool] = lambda: True
    """False: the section is left out silently (the GPU rows on a machine without CUDA)."""


def guard(name: str, fn: Callable[[], list[Row]], fallback: list[Row] | tuple[Row, ...]) -> list[Row]:
    """A broken section must not lose the others: it becomes its n/a rows with the error."""
    t = time.perf_counter()
    try:
        rows = fn()
    except Exception as err:  # noqa: BLE001
        log(f"{name} failed: {type(err).__name__}: {err}")
        return [na(r.name, r.target, r.unit, f"failed: {type(err).__name__}: {str(err)[:200]}", r.higher_is_better)
                for r in fallback]
    log(f"{name}: {time.perf_counter() - t:.0f} s")
    return rows
