"""Many classes do not exhaust memory: a dataset over MAX_CLASSES is refused before anything is decoded (a folder
and an in-place source), and above CONFUSION_MATRIX_MAX_CLASSES the metric block lists the commonest confusions
instead of a dense n×n matrix; the metric block's scores equal scikit-learn's."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.data import defaults
from core.data.imagefolder import scan_imagefolder
from core.errors import DataError
from core.evaluate import CONFUSION_MATRIX_MAX_CLASSES, compute_metrics
from tests.fixtures_worker import make_imagefolder, run_cli


def test_too_many_classes_is_refused_naming_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_imagefolder(tmp_path / "many", tuple(f"c{i:02d}" for i in range(12)), per_class=1, size=8)
    monkeypatch.setattr(defaults, "MAX_CLASSES", 10)
    monkeypatch.setattr("core.data.imagefolder.MAX_CLASSES", 10)
    with pytest.raises(DataError, match="12 class folders; at most 10 classes"):
        scan_imagefolder(root, max_image_pixels=10**8)


def test_a_source_over_the_bound_is_refused_before_sampling(redis_conn: Any, job_env: dict[str, str],
                                                            tmp_path: Path) -> None:
    """The real bound, through the real CLI: 10,001 empty-named class folders with one tiny file each."""
    root = tmp_path / "wide"
    for i in range(defaults.MAX_CLASSES + 1):
        (root / f"c{i:05d}").mkdir(parents=True)
        (root / f"c{i:05d}" / "a.png").write_bytes(b"not decoded")  # a refusal before sampling never opens it
    res = run_cli(["worker", "dataset", "add", "wide", root.as_uri()], job_env, timeout=300)
    assert res.returncode == 2 and "10,001 class folders; at most 10,000" in res.stderr, res.stderr[-2000:]


def test_the_metric_block_of_many_classes_lists_top_confusions() -> None:
    n = CONFUSION_MATRIX_MAX_CLASSES + 1
    classes = [f"c{i}" for i in range(n)]
    labels = np.arange(3 * n) % n
    probs = np.zeros((3 * n, n), np.float32)
    probs[np.arange(3 * n), labels] = 1.0
    probs[:5, :] = 0.0
    probs[:5, 7] = 1.0  # samples 0-4 (true c0..c4) predicted c7
    probs[n:n + 3, :] = 0.0
    probs[n:n + 3, 7] = 1.0  # true c0, c1, c2 again predicted c7
    out = compute_metrics(labels, probs, classes)
    assert out["confusion_matrix"] is None
    assert out["top_confusions"][:3] == [{"true": "c0", "predicted": "c7", "count": 2},
                                         {"true": "c1", "predicted": "c7", "count": 2},
                                         {"true": "c2", "predicted": "c7", "count": 2}]
    assert len(out["top_confusions"]) == 5
    small = compute_metrics(np.array([0, 1, 1]), np.eye(2, dtype=np.float32)[[0, 0, 1]], ["a", "b"])
    assert small["confusion_matrix"] == [[1, 0], [1, 1]] and small["top_confusions"] == [
        {"true": "b", "predicted": "a", "count": 1}]


@pytest.mark.parametrize("seed", range(4))
def test_the_metric_block_equals_scikit_learns(seed: int) -> None:
    """compute_metrics' own F1, precision, recall, support and confusion matrix against scikit-learn's, on
    predictions with a class never predicted, a class never present and a class neither present nor predicted."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    n_classes, n = 7, 200
    labels = rng.choice([0, 1, 2, 3, 5], n)  # 4 and 6 never present
    preds = np.where(rng.random(n) < 0.6, labels, rng.choice([0, 1, 2, 4], n))  # 3, 5 only when right; 4 only wrong
    preds[labels == 5] = 0  # 5 never predicted; 6 neither present nor predicted
    probs = np.eye(n_classes, dtype=np.float32)[preds]
    out = compute_metrics(labels, probs, [f"c{i}" for i in range(n_classes)])
    every = list(range(n_classes))
    assert out["macro_f1"] == pytest.approx(f1_score(labels, preds, labels=every, average="macro", zero_division=0))
    assert out["weighted_f1"] == pytest.approx(f1_score(labels, preds, labels=every, average="weighted",
                                                        zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=every, zero_division=0)
    got = out["per_class"]
    assert [c["precision"] for c in got] == pytest.approx(precision.tolist())
    assert [c["recall"] for c in got] == pytest.approx(recall.tolist())
    assert [c["f1"] for c in got] == pytest.approx(f1.tolist())
    assert [c["support"] for c in got] == support.tolist()
    assert out["confusion_matrix"] == confusion_matrix(labels, preds, labels=every).tolist()
    assert got[5]["recall"] == 0 and got[4]["precision"] == 0 and got[6] == {
        "class": "c6", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_the_job_page_lists_top_confusions_for_many_classes(redis_conn: Any, job_env: dict[str, str],
                                                             tmp_path: Path,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """A finished job whose test set has 60 classes: the Job page shows the commonest confusions as a table, not a
    60×60 heatmap. The report's test block is compute_metrics' own output on 60-class predictions."""
    import json
    import shutil

    from tests.fixtures_app import open_page, seed_finished_job
    from tests.fixtures_runs import digits_run_exported

    run = tmp_path / "run"
    shutil.copytree(digits_run_exported(tmp_path_factory)[0], run)
    n = 60
    classes = [f"c{i}" for i in range(n)]
    labels = np.arange(2 * n) % n
    probs = np.eye(n, dtype=np.float32)[labels]
    probs[:3] = np.eye(n, dtype=np.float32)[[9, 9, 9]]  # c0, c1, c2 predicted c9
    report = json.loads((run / "report.json").read_text())
    report["test"] = compute_metrics(labels, probs, classes)
    report["data"]["classes"] = classes
    (run / "report.json").write_text(json.dumps(report))
    job_id = seed_finished_job(redis_conn, run)
    at = open_page("job", {"job": job_id})
    assert not at.exception, [e.value for e in at.exception]
    tables = [d.value for d in at.dataframe if "predicted" in getattr(d.value, "columns", [])]
    assert tables and tables[0].to_dict("records")[:1] == [{"true": "c0", "predicted": "c9", "count": 1}]
    traces = [t.get("type") for c in at.get("plotly_chart") for t in json.loads(c.proto.spec).get("data", [])]
    assert traces and "heatmap" not in traces
