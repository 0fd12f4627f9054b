"""Rows 6 and 8: the digits preset's time to ≥ 0.98 test accuracy (≤ 20 s) beside the classic recipe's, and the peak
RSS of its training process; whole `python -m core.train` children."""
from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.fixtures import CLASSIC_WORKERS
from tests.bench.harness import Row, Section, log
from tests.bench.processes import train_subprocess


def bench_digits(quick: bool) -> list[Row]:
    reps = 1 if quick else 2
    runs: dict[str, list[dict[str, Any]]] = {"digits": [], "classic": []}
    sides = {
        "digits": ("configs/digits.yaml", ["export.enabled=false"]),
        # the classic recipe on the classic pipeline: DataLoader + PIL transforms with 2 workers
        "classic": ("configs/classic_recipe.yaml", ["export.enabled=false", "data.cache='off'",
                                                     f"data.num_workers={CLASSIC_WORKERS}"]),
    }
    with tempfile.TemporaryDirectory(prefix="bench-digits-") as tmp:
        for rep in range(reps):
            for name in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
                config, overrides = sides[name]
                r = train_subprocess(config, overrides, Path(tmp) / f"{name}-{rep}")
                runs[name].append(r)
                log(f"row 6: {name}: test acc {r['report']['test']['accuracy']:.4f} in {r['report']['seconds']:.1f} s "
                    f"(process {r['wall']:.1f} s, peak RSS {r['rss_mib']:.0f} MiB)")

    def summary(name: str) -> tuple[float, str]:
        accs = [r["report"]["test"]["accuracy"] for r in runs[name]]
        secs = [r["report"]["seconds"] for r in runs[name]]
        reached = [s for s, a in zip(secs, accs) if a >= 0.98]
        value = statistics.median(reached) if len(reached) == len(secs) else math.inf
        epochs = runs[name][0]["report"]["epochs_completed"]
        return value, (f"test acc {', '.join(f'{a:.4f}' for a in accs)} after {epochs} epochs; "
                       f"{', '.join(f'{s:.1f}' for s in secs)} s")

    digits, digits_note = summary("digits")
    classic, classic_note = summary("classic")
    rss = statistics.median(r["rss_mib"] for r in runs["digits"])
    return [
        Row("digits preset: time to ≥ 0.98 test accuracy", digits, 20.0, "s", higher_is_better=False,
            note=f"train() wall time incl. data and test; {digits_note}; classic recipe: "
                 f"{'never' if not math.isfinite(classic) else f'{classic:.1f} s'} ({classic_note})"),
        Row("classic recipe (DataLoader + PIL, 2 workers): time to ≥ 0.98 test accuracy", classic, None, "s",
            higher_is_better=False, note=classic_note),
        Row("memory: peak RSS of a training process running digits", rss, None, "MiB", higher_is_better=False,
            note="`python -m core.train configs/digits.yaml`, no export (its VmHWM, polled every 50 ms)"),
    ]


SECTION = Section("digits", "rows 6, 8", bench_digits,
                  (Row("digits preset: time to ≥ 0.98 test accuracy", None, 20.0, "s", False),))
