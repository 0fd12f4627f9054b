"""core/runfolder.py owns the run folder's names (a contract with users), worker/states.py the job states, and each
list of choices has one source."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from core import runfolder as rf

ROOT = Path(__file__).resolve().parents[1]


def test_the_names_users_rely_on_are_unchanged() -> None:
    assert (rf.CONFIG, rf.LABELS, rf.SPLIT, rf.PREPROCESS, rf.METRICS, rf.REPORT, rf.PREDICTIONS) == (
        "config.yaml", "labels.json", "split.json", "preprocess.json", "metrics.jsonl", "report.json",
        "predictions.jsonl")
    assert (rf.LAST_CHECKPOINT, rf.BEST_CHECKPOINT) == ("checkpoints/last.pt", "checkpoints/best.pt")
    assert (rf.MISCLASSIFIED, rf.SAMPLES, rf.EXPORT, rf.CANCELLED, rf.FAILED) == (
        "misclassified", "samples", "export", "CANCELLED", "FAILED")
    assert [rf.exported(n) for n in (rf.ONNX, rf.INT8_ONNX, rf.STATE_DICT, rf.PT2, rf.BUNDLE)] == [
        "export/model.onnx", "export/model.int8.onnx", "export/model.pt", "export/model.pt2", "export/bundle.zip"]
    assert set(rf.BUNDLE_FILES) == {"model.onnx", "model.int8.onnx", "model.pt", "model.pt2", "labels.json",
                                    "preprocess.json", "predict.py", "model_card.md"}


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """String literals of a module, docstrings left out (they may name files in prose)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_run_folder_file_name_is_spelled_outside_its_owner() -> None:
    """No literal names a run-folder file outside core/runfolder.py (predict_template.py
    is the bundle's standalone copy and keeps its own). Names without a dot (samples, export, FAILED) are also report
    keys, phases and MLflow statuses, so only the file names with a suffix and the paths under checkpoints/ and
    export/ are searched for."""
    paths = [v for k, v in vars(rf).items() if k.isupper() and isinstance(v, str) and "." in v]
    names = {*paths, *(p.rsplit("/", 1)[-1] for p in paths)}  # checkpoints/last.pt and last.pt
    prefixes = (f"{rf.CHECKPOINTS}/", f"{rf.EXPORT}/")
    owners = {ROOT / "core/runfolder.py", ROOT / "core/predict_template.py"}
    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}"
             for package in ("core", "worker", "app") for path in sorted((ROOT / package).rglob("*.py"))
             if path not in owners
             for line, text in _string_constants(path)
             if text in names or text.startswith(prefixes) or any(text.endswith("/" + n) for n in names)]
    assert not found, found


def _job_state_literals(source: str) -> list[tuple[int, str | bytes]]:
    """Job-state values (text or bytes) written as literals where a state is compared (`==`, `in`, ...) or set
    (`state=...`, `{"state": ...}`, `x.state = ...`, `st["state"] = ...`)."""
    from worker.states import JobState

    values = {s.value for s in JobState} | {s.value.encode() for s in JobState}
    tree = ast.parse(source)
    places: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            places += [node.left, *node.comparators]
        elif isinstance(node, ast.keyword) and node.arg == "state":
            places.append(node.value)
        elif isinstance(node, ast.Dict):
            places += [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "state"]
        elif isinstance(node, ast.Assign) and any(
                (isinstance(t, ast.Name) and t.id == "state") or (isinstance(t, ast.Attribute) and t.attr == "state")
                or (isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant) and t.slice.value == "state")
                for t in node.targets):
            places.append(node.value)
    return sorted({(n.lineno, n.value) for place in places for n in ast.walk(place)
                   if isinstance(n, ast.Constant) and isinstance(n.value, (str, bytes)) and n.value in values},
                  key=lambda found: (found[0], repr(found[1])))


def test_no_job_state_is_spelled_outside_its_owner() -> None:
    """A job state is compared or set as a `worker.states.JobState`, never as a raw string
    (`b"running"`, `"finished"`) outside worker/states.py. Other strings that happen to match (a key name, a message)
    are not comparisons or assignments of a state and are left alone."""
    assert set(_job_state_literals('if st["state"] == b"running" or x in ("queued", "y"):\n    rec.state = "failed"\n'
                                   'f(state="pruned", other="finished")\n')) == {
        (1, b"running"), (1, "queued"), (2, "failed"), (3, "pruned")}  # the search itself finds what it should
    owner = ROOT / "worker/states.py"
    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}"
             for package in ("core", "worker", "app") for path in sorted((ROOT / package).rglob("*.py"))
             if path != owner
             for line, text in _job_state_literals(path.read_text(encoding="utf-8"))]
    assert not found, found


def test_form_options_come_from_the_config_schema() -> None:
    from app import forms
    from core.config import Config, choices
    from core.data.transforms import AUGMENTS

    selects = {f.key: f.options for f in forms.fields()
               if f.kind == "select" and "." in f.key and f.key != "model.name"}
    assert selects and all(options == choices(Config, key) for key, options in selects.items())
    assert AUGMENTS == choices(Config, "data.augment") == ("classic", "none", "strong")
    with pytest.raises(KeyError):
        choices(Config, "optim.lr")  # not a list of choices


def test_submission_estimates_the_train_split_with_cores_rule() -> None:
    from core.config import load_config
    from core.data import build_datasets
    from core.data.builtin import expected_train_images

    cfg = load_config(ROOT / "configs/digits.yaml")
    estimate = expected_train_images(cfg.to_dict()["data"])
    assert estimate is not None and abs(estimate - len(build_datasets(cfg).train)) <= 10  # per-class rounding
    cifar = {"name": "cifar10", "split": [0.8, 0.1, 0.1]}
    assert expected_train_images(cifar) == math.ceil(50_000 * 0.8 / 0.9)  # val is carved out of the 50,000
