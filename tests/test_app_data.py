"""The dashboard's non-UI helpers: live series, the thinned stream reader (real Redis), form error placement, tables."""
from __future__ import annotations

from typing import Any

import pytest

from app import forms
from app.tables import LiveSeries, differing_params, fmt_seconds, jobs_frame, thin
from tests.fixtures_app import seed_step_events
from worker.chartstream import chart_events_since, epoch_events


def step(i: str, epoch: int, s: int, loss: float = 1.0) -> dict[str, Any]:
    return {"id": i, "type": "step", "data": {"epoch": epoch, "step": s, "steps_per_epoch": 10, "loss": loss,
                                              "lr": 0.1, "images_per_sec": 5.0}}


def test_live_series_keeps_each_epoch_once_across_a_resume() -> None:
    s = LiveSeries()
    s.add([step("1-0", 1, 5), step("2-0", 1, 10), {"id": "3-0", "type": "epoch", "data": {"epoch": 1, "val_acc": .5}},
           step("4-0", 2, 5), step("5-0", 2, 10)])
    assert s.step_x == [0.5, 1.0, 1.5, 2.0] and s.epoch == [1]
    # the worker died in epoch 2; the resumed attempt redoes epoch 2 from its start and re-emits epoch 1 (dropped
    # by the sink; dropped here too if a reader ever saw it twice)
    s.add([{"id": "6-0", "type": "epoch", "data": {"epoch": 1, "val_acc": .5}}, step("7-0", 2, 5, loss=0.7)])
    assert s.step_x == [0.5, 1.0, 1.5] and s.step_loss[-1] == 0.7 and s.epoch == [1]
    assert s.last_id == "7-0" and s.entries == 7


def test_thin_keeps_the_ends_and_bounds_the_points() -> None:
    x, y = thin(list(range(10_000)), [float(v) for v in range(10_000)], 100)
    assert len(x) == 100 and x[0] == 0 and x[-1] == 9_999
    x, y = thin([0, 1], [None, 2.0], 100)
    assert len(x) == 2 and y[0] != y[0]  # None becomes NaN (a gap in the line)


def test_stream_reader_thins_steps_on_the_server_and_reads_only_new_entries(redis_conn: Any) -> None:
    job = "20250101-000000-abcdef"
    seed_step_events(redis_conn, job, 2_019, steps_per_epoch=100)  # 20 epochs of 100 steps, 19 epoch events
    events, scanned = chart_events_since(redis_conn, job, "0", max_steps=500)
    assert scanned == 2_019
    kinds = [e["type"] for e in events]
    assert kinds.count("epoch") == 19  # every epoch event
    assert 450 <= kinds.count("step") <= 500
    assert events[-1]["data"]["global_step"] == 2_000  # the last entry always comes back: it is the next start

    more, scanned = chart_events_since(redis_conn, job, events[-1]["id"])
    assert (more, scanned) == ([], 0)
    seed_step_events(redis_conn, job, 3, steps_per_epoch=100)
    more, scanned = chart_events_since(redis_conn, job, events[-1]["id"])
    assert scanned == 3 and len(more) == 3  # small reads are not thinned
    assert [e["epoch"] for e in epoch_events(redis_conn, job)] == list(range(1, 20))


def test_errors_land_on_the_fields_they_name() -> None:
    from core.config import config_from_dict
    from core.errors import ConfigError
    from worker.errors import SubmissionError

    with pytest.raises(ConfigError) as exc:  # core's own validation: one FieldError per bad key
        config_from_dict({"train": {"epochs": 0}, "optim": {"lr": 0.0}, "data": {"split": [1]}})
    assert str(exc.value) == "invalid config: " + "; ".join(str(e) for e in exc.value.errors)
    out = forms.errors_by_field(exc.value.errors)
    assert set(out) == {"train.epochs", "optim.lr", ""}
    assert out[""].startswith("data.split")  # not a form field: shown above the submit button
    assert forms.errors_by_field(SubmissionError.on("gpus", 4, "no live worker can run 4 device(s)").errors) == {
        "gpus": "gpus: no live worker can run 4 device(s)"}
    assert set(forms.errors_by_field(SubmissionError.on("dataset upload", "d.zip", "disk full").errors)) == {"dataset"}
    with pytest.raises(ConfigError) as exc:  # a cross-field check names its key too
        config_from_dict({"data": {"name": "imagefolder"}})
    assert set(forms.errors_by_field(exc.value.errors)) == {"dataset"}


@pytest.mark.parametrize("name", forms.preset_names())
def test_every_preset_fills_every_field(name: str) -> None:
    values = forms.initial_values(forms.load_preset(name))
    assert set(values) == {f.key for f in forms.fields()}
    assert values["train.epochs"] >= 1 and values["optim.lr"] > 0


def test_build_config_keeps_hidden_keys_and_drops_builtin_paths() -> None:
    raw = forms.load_preset("cifar10_resnet18")
    values = forms.initial_values(raw)
    cfg = forms.build_config(raw, {**values, "train.epochs": 2}, "digits")
    assert cfg["train"]["epochs"] == 2 and cfg["train"]["channels_last"] is True
    assert cfg["data"]["name"] == "digits" and "path" not in cfg["data"]
    with pytest.raises(ValueError, match="unknown preset"):
        forms.load_preset("../../etc/passwd")


def test_feature_cache_fields_apply_only_where_shown() -> None:
    """Frozen-backbone fields: an emptied views box means auto; a preset that does not show them keeps its values."""
    raw = forms.load_preset("transfer_efficientnet_lite0")
    values = forms.initial_values(raw)
    assert values["data.feature_views"] is None  # the preset's auto
    assert forms.build_config(raw, {**values, "data.feature_views": 2}, "digits")["data"]["feature_views"] == 2
    cloned = {**raw, "data": {**raw["data"], "feature_views": 6}}
    assert forms.build_config(cloned, {**values, "data.feature_views": None}, "digits")["data"]["feature_views"] is None
    digits = {**forms.load_preset("digits"), "data": {**forms.load_preset("digits")["data"], "feature_views": 3}}
    built = forms.build_config(digits, {**forms.initial_values(digits), "data.feature_views": None}, "digits")
    assert built["data"]["feature_views"] == 3  # not shown (nothing frozen): the config's own value stays


def test_tables_and_formats() -> None:
    frame = jobs_frame([{"id": "a", "state": "running", "progress": 0.5, "epoch": 1, "epochs": 2, "duration": 30,
                         "eta": 30, "submitted_at": 1.7e9, "best_val_acc": 0.9}])
    assert frame.loc[0, "epoch"] == "1/2" and frame.loc[0, "duration / ETA"] == "30s (ETA 30s)"
    assert fmt_seconds(3725) == "1h 02m" and fmt_seconds(None) == ""
    diff = differing_params({"a": {"optim": {"lr": 0.1}, "x": 1}, "b": {"optim": {"lr": 0.2}, "x": 1}})
    assert list(diff.index) == ["optim.lr"]


def test_cpu_ranks_are_named_as_such() -> None:
    """A job that ran on a CPU worker (its device), or will (every live worker is a CPU worker), has CPU ranks, not
    GPUs; while that is unknown the text says either."""
    from app.tables import rank_kind, resources_text

    ran_on_cpu = {"gpus": 2, "device": "cpu"}
    assert rank_kind(ran_on_cpu, {"gpu"}) == "cpu" and resources_text(ran_on_cpu, "cpu") == "2 CPU ranks"
    assert rank_kind({"gpus": 1, "device": "cuda:0"}) == "gpu"
    queued = {"gpus": 1}
    assert rank_kind(queued, {"cpu"}) == "cpu" and resources_text(queued, "cpu") == "1 CPU rank"
    assert rank_kind(queued, {"cpu", "gpu"}) is None and resources_text(queued, None) == "1 GPU or CPU rank"
    assert resources_text({"gpus": 4, "num_nodes": 2}, "gpu") == "2 nodes × 4 GPUs"
    frame = jobs_frame([{"id": "a", "state": "queued", "gpus": 1}, {"id": "b", "state": "finished", "gpus": 1,
                                                                     "device": "cuda:0"}], {"cpu"})
    assert list(frame["resources"]) == ["1 CPU rank", "1 GPU"]
