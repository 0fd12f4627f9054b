"""The transfer rows: a frozen-backbone Lite0 job on 400 photo-like images, feature cache vs the current path, whole
`python -m core.train` time at 3 and 10 epochs (≥ 4× at 10), and the val accuracy of both."""
from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.harness import ROOT, Row, Section, log, ratio_median
from tests.bench.processes import train_subprocess

TRANSFER_PRESET = ROOT / "configs" / "transfer_efficientnet_lite0.yaml"
TRANSFER_PHOTOS_PER_CLASS = 100
"""Images per class of the transfer rows' photo set (tests.fixtures_images.make_photo_tree: 4 classes, 256 px)."""


def bench_transfer(quick: bool) -> list[Row]:
    """A frozen-backbone transfer job (the transfer preset: Lite0 at 224 px) on 400 photo-like images: whole
    `python -m core.train` wall time with the feature cache (the preset's auto views: 1 at 10 epochs, and a fixed 4)
    vs the current path (train.feature_cache off), same epochs, sides alternating; export off on every side (the same
    model either way).

    Arithmetic that bounds the ratio: the current path runs the backbone over train + val every epoch (and test once),
    the cache over views × train + val + test once, so at E epochs the ratio is at most
    E·(train + val) / (views·train + val + test), less the fixed start-up and decoding both sides pay."""
    from tests.fixtures_images import make_photo_tree

    epochs_list = (10,) if quick else (3, 10)
    reps = 1 if quick else 2
    variants = {"current": ["train.feature_cache=off"], "cache": ["train.feature_cache=on"],
                "cache, 4 views": ["train.feature_cache=on", "data.feature_views=4"]}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        photos = make_photo_tree(Path(tmp) / "photos", TRANSFER_PHOTOS_PER_CLASS)
        for rep in range(reps):
            for epochs in epochs_list:
                names = list(variants)
                names = names[(rep + epochs) % len(names):] + names[:(rep + epochs) % len(names)]
                for side in names:
                    overrides = [f"data.path={photos}", f"train.epochs={epochs}", "export.enabled=false",
                                 *variants[side]]
                    folder = Path(tmp) / f"{side.replace(', ', '-').replace(' ', '')}-{epochs}-{rep}"
                    r = train_subprocess(str(TRANSFER_PRESET), overrides, folder)
                    runs.setdefault((side, epochs), []).append(r)
                    rep_ = r["report"]
                    log(f"transfer: {side} {epochs} epochs: {r['wall']:.1f} s, val acc {rep_['val']['accuracy']:.4f}, "
                        f"test acc {rep_['test']['accuracy']:.4f}, peak RSS {r['rss_mib']:.0f} MiB")
    counts = runs[("cache", epochs_list[0])][0]["report"]["data"]["counts"]
    rows = []
    for epochs in epochs_list:
        current = [r["wall"] for r in runs[("current", epochs)]]
        for side in ("cache", "cache, 4 views"):
            walls = [r["wall"] for r in runs[(side, epochs)]]
            fc = runs[(side, epochs)][0]["report"].get("feature_cache") or {}
            views = fc.get("views", 0)
            bound = epochs * (counts["train"] + counts["val"]) / max(views * counts["train"] + counts["val"]
                                                                     + counts["test"], 1)
            ratio = ratio_median(current, walls)
            # above the bound, the sides did not run under the same load: the number says nothing about the code
            # (a bound under 1 is no ceiling: the start-up both sides pay pulls the ratio towards 1 from below)
            suspect = "; ABOVE the bound: the load changed between sides, rerun on an idle machine" \
                if ratio > 1.1 * max(bound, 1.0) else ""
            label = f"auto: {views} view{'s' if views > 1 else ''}" if side == "cache" else f"{views} views"
            rows.append(Row(f"transfer job, feature cache ({label}) vs current path: whole core.train time, "
                            f"{epochs} epochs", ratio,
                            4.0 if epochs == 10 and side == "cache" else None, "×",
                            note=f"Lite0 224 px frozen, {sum(counts.values())} photo-like images "
                                 f"({counts['train']}/{counts['val']}/{counts['test']}), process wall: cache "
                                 f"{_seconds(walls)}, current {_seconds(current)}; backbone passes bound the ratio at "
                                 f"{bound:.1f}×; embedding {fc.get('images_per_sec', 0):.1f} img/s "
                                 f"({fc.get('precision')}); {len(walls)} alternating run(s) each{suspect}"))
    last = epochs_list[-1]
    acc = {k: statistics.median(r["report"]["val"]["accuracy"] for r in runs[(k, last)]) for k in variants}
    test = {k: statistics.median(r["report"]["test"]["accuracy"] for r in runs[(k, last)]) for k in variants}
    n_val = counts["val"]
    se = math.sqrt(max(acc["current"] * (1 - acc["current"]), 1e-9) / n_val) * 100
    rows.append(Row(f"transfer job, {last} epochs: val accuracy, feature cache − current path",
                    (acc["cache"] - acc["current"]) * 100, -round(se, 1), "points",
                    note=f"best-checkpoint val accuracy (report.json val.accuracy), same seed, median over "
                         f"{len(runs[('cache', last)])} run(s): cache {acc['cache']:.4f} (4 views "
                         f"{acc['cache, 4 views']:.4f}), current {acc['current']:.4f} on {n_val} images "
                         f"(target: within one binomial standard error, {se:.1f} points); test accuracy of the whole "
                         "fp32 model: "
                         f"cache {test['cache']:.4f} (4 views {test['cache, 4 views']:.4f}), current "
                         f"{test['current']:.4f}"))
    return rows


def _seconds(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values) + " s"


SECTION = Section("transfer", "transfer rows", bench_transfer, (
    Row("transfer job, feature cache vs current path: whole core.train time, 10 epochs", None, 4.0, "×"),))
