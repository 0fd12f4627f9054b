"""The Sweeps page and New job's "Sweep" mode through Streamlit's AppTest, against the session's real redis-server.

Trials that "ran" go through the worker's own functions (mark_started, the Redis event sink, mark_final) and the
sweep's own `advance`, so no worker trains here; tests/test_sweeps.py runs real sweeps on real workers and
tests/test_browser.py takes the page's screenshot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.forms import sweepable
from tests.fixtures_app import open_page, texts
from tests.fixtures_worker import DIGITS, run_trial
from worker import api
from worker.states import JobState
from worker.sweeps import advance


@pytest.fixture
def app_env(redis_conn: Any, job_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DATA_CACHE_DIR", str(tmp_path / "data-cache"))
    return redis_conn


def seeded_sweep(conn: Any) -> str:
    """A finished 4-trial sweep: three complete trials and one pruned, two parameters."""
    sweep_id = api.create_sweep(str(DIGITS), {"optim.lr": {"float": [1e-3, 1e-1], "log": True},
                                              "train.batch_size": {"choice": [32, 64]}},
                                connection=conn, trials=4, parallel=4, name="seeded", seed=3, pruner="none",
                                allow_local_paths=True)
    rows = api.sweep_trials(conn, sweep_id)
    for row, accs in zip(rows, ([0.5, 0.7, 0.8], [0.4, 0.6, 0.9], [0.3, 0.5, 0.6])):
        run_trial(conn, row["job"], accs)
    run_trial(conn, rows[3]["job"], [0.1], state=JobState.PRUNED)
    assert advance(conn, sweep_id)
    return sweep_id


def test_sweeps_page_lists_sweeps_and_shows_one(app_env: Any) -> None:
    sweep_id = seeded_sweep(app_env)
    st = api.sweep_status(app_env, sweep_id)
    assert st["state"] == "finished" and st["best_value"] == pytest.approx(0.9) and st["best_trial"] == 1

    at = open_page("sweeps", {"sweep": sweep_id})
    assert not at.exception, at.exception
    shown = texts(at)
    assert "Trials ended 4/4" in shown and "Complete 3" in shown and "Pruned 1" in shown
    assert "Best val_acc 0.9000" in shown and "Trial **1**" in shown
    lists = [df.value for df in at.dataframe]
    assert list(lists[0]["sweep"]) == [sweep_id] and float(lists[0]["progress"][0]) == 1.0
    trials = lists[1]
    assert list(trials["trial"]) == [0, 1, 2, 3] and list(trials["status"])[3] == "pruned"
    assert list(trials["job"])[1] == f"job?job={st['best_job']}"
    assert {"optim.lr", "train.batch_size"} <= set(trials.columns)
    charts = at.get("plotly_chart")
    assert len(charts) >= 3, "objective, importances and parallel coordinates"


def test_sweeps_page_without_sweeps_and_with_an_unknown_id(app_env: Any) -> None:
    at = open_page("sweeps")
    assert not at.exception and "No sweeps yet" in texts(at)
    seeded_sweep(app_env)
    at = open_page("sweeps", {"sweep": "20250101-120000-abcdef"})
    assert not at.exception and "No such sweep" in texts(at)


def sweep_form(at: Any, vary: list[str]) -> Any:
    at.toggle(key="new:sweep").set_value(True).run()
    prefix = "new:digits:"
    at.multiselect(key=prefix + "sweep:vary").set_value(vary).run()
    return prefix


def start(at: Any) -> Any:
    [button] = [b for b in at.button if b.label == "Start sweep"]
    return button.click().run()


def test_new_job_sweep_mode_starts_a_sweep(app_env: Any) -> None:
    at = open_page("new")
    prefix = sweep_form(at, ["optim.lr", "train.batch_size"])
    at.number_input(key=prefix + "sweep:optim.lr:low").set_value(0.001)
    at.number_input(key=prefix + "sweep:optim.lr:high").set_value(0.01)
    at.number_input(key=prefix + "sweep:train.batch_size:low").set_value(32)
    at.number_input(key=prefix + "sweep:train.batch_size:high").set_value(64)
    at.number_input(key=prefix + "sweep:trials").set_value(5)
    at.number_input(key=prefix + "sweep:parallel").set_value(2)
    at = start(at.run())
    assert not at.exception, at.exception
    [sweep] = api.list_sweeps(app_env)
    assert sweep["trials"] == 5 and sweep["parallel"] == 2 and sweep["counts"]["queued"] == 2
    assert sweep["space"] == {"optim.lr": {"float": [0.001, 0.01], "log": True},
                              "train.batch_size": {"int": [32, 64]}}
    assert "Sweeps" in texts(at) and "Trials ended 0/5" in texts(at)


BAD_FORM = [
    # (field, widget values, message fragment)
    ("optim.lr", {"low": 0.1, "high": 0.01}, "low > high"),
    ("optim.lr", {"low": 0.01, "high": 20.0}, "optim.lr=20.0"),
    ("train.batch_size", {"low": 64, "high": 5000}, "larger than the train split"),
    ("data.augment", {"choices": []}, "non-empty list"),
    ("model.freeze", {"choices": ["none", "backbone"]}, "model.pretrained: true"),
]


@pytest.mark.parametrize("key,values,message", BAD_FORM, ids=[c[2][:24] for c in BAD_FORM])
def test_bad_sweep_input_in_the_form_starts_nothing(app_env: Any, key: str, values: dict[str, Any],
                                                    message: str) -> None:
    at = open_page("new")
    prefix = sweep_form(at, [key])
    for name, value in values.items():
        widget = at.multiselect if name == "choices" else at.number_input
        widget(key=prefix + f"sweep:{key}:{name}").set_value(value)
    at = start(at.run())
    assert not at.exception, at.exception
    shown = texts(at)
    assert "Nothing was started" in shown and message in shown, shown
    assert not list(app_env.scan_iter(match="trainer:*")) and not list(app_env.scan_iter(match="rq:queue:*"))


def test_a_pruned_job_says_so_on_the_jobs_and_job_pages(app_env: Any) -> None:
    sweep_id = seeded_sweep(app_env)
    pruned = api.sweep_trials(app_env, sweep_id)[3]["job"]
    at = open_page("job", {"job": pruned})
    assert not at.exception and "pruned" in texts(at).lower()
    at = open_page("jobs")
    assert not at.exception
    assert "pruned" in list(at.dataframe[0].value["status"])


def test_the_form_cannot_express_the_other_bad_inputs(app_env: Any) -> None:
    """Unknown keys, trials or parallel < 1 and a metric no epoch event carries (refused by the CLI, tests/
    test_sweeps.py) cannot be entered here: the keys come from the form's fields, the counts' widgets stop at 1,
    the metric is picked from the epoch metrics."""
    at = open_page("new")
    prefix = sweep_form(at, [])
    assert set(at.multiselect(key=prefix + "sweep:vary").options) == {f"{f.label} ({f.key})" for f in sweepable()}
    assert at.number_input(key=prefix + "sweep:trials").min == 1
    assert at.number_input(key=prefix + "sweep:parallel").min == 1
    assert list(at.selectbox(key=prefix + "sweep:metric").options) == list(api.EPOCH_METRICS)
    at = start(at)
    assert "Pick at least one field to vary" in texts(at) and not list(app_env.scan_iter(match="trainer:*"))
    at.multiselect(key=prefix + "sweep:vary").set_value(["optim.lr"]).run()
    at.number_input(key=prefix + "nodes").set_value(2)  # a form field: submitted with the click
    at = start(at)
    assert "one node each" in texts(at) and not list(app_env.scan_iter(match="trainer:*"))
