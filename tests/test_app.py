"""The dashboard through Streamlit's AppTest, against the session's real redis-server: every page renders without an
exception and shows what a user needs; submit enqueues a job and opens its page; bad input enqueues nothing and says
why; job actions change the real job state; a Redis that is down gives a banner, not a traceback.

Jobs that "ran" are seeded with worker's own state functions and event sink over a real trained-and-exported run
folder (tests/fixtures_runs.py), so no worker has to train here; tests/test_browser.py runs the real thing.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.fixtures_app import (
    PAGES,
    TEST_WORKER,
    open_page,
    seed_finished_job,
    seed_running_job,
    seed_step_events,
    submit_digits,
    texts,
)
from tests.fixtures_runs import digits_run_exported
from tests.fixtures_worker import make_imagefolder
from worker import api, keys
from worker.artifacts import ArtifactStore
from worker.presence import advertise


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real digits run folder, trained and exported by core (shared with the export tests of the session)."""
    return digits_run_exported(tmp_path_factory)[0]


@pytest.fixture
def app_env(redis_conn: Any, job_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An empty Redis, and this test's own artifact store, var/ and dataset extraction cache."""
    monkeypatch.setenv("DATA_CACHE_DIR", str(tmp_path / "data-cache"))
    return redis_conn


def enqueued(conn: Any) -> int:
    """Jobs in our index plus RQ jobs in any queue: what "nothing was enqueued" must keep at zero."""
    rq_jobs = sum(conn.llen(k) for k in conn.scan_iter("rq:queue:*"))
    return conn.zcard(keys.jobs_index()) + rq_jobs


def widget(at: Any, kind: str, label: str) -> Any:
    """The one widget of `kind` with `label` on the page."""
    found = [w for w in getattr(at, kind) if w.label == label]
    assert len(found) == 1, f"{kind} {label!r}: found {[w.label for w in getattr(at, kind)]}"
    return found[0]


def buttons(at: Any) -> dict[str, Any]:
    return {b.label: b for b in at.button}


def zip_bytes(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder.parent).as_posix())
    return buf.getvalue()


def advertise_worker(conn: Any, slots: int = 1, gpus: list[dict[str, Any]] | None = None) -> None:
    advertise(conn, "gpu-box-1", {"name": "gpu-box-1", "hostname": "gpu-box", "pid": 1, "kind": "gpu" if gpus else
                                  "cpu", "gpus": gpus or [], "slots": slots, "state": "idle", "current_job": "",
                                  "started_at": 1.0}, ttl=60)


# ------------------------------------------------------------------------------------------------- every page
@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders_on_an_empty_redis(app_env: Any, page: str) -> None:
    at = open_page(page)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value in {"New job", "Jobs", "Job", "Compare runs", "Workers", "Try it", "Sweeps", "Datasets",
                                 "Models", "Settings"}


def test_redis_down_shows_a_banner_on_every_page(app_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://:secret@127.0.0.1:{free_port()}/0")
    for page in PAGES:
        at = open_page(page)
        assert not at.exception, (page, [e.value for e in at.exception])
        assert at.error and "Redis is unreachable" in at.error[0].value, page
        assert "secret" not in at.error[0].value  # the password is redacted
        assert "recovers by itself" in at.error[0].value


def test_the_banner_goes_away_when_redis_is_back(app_env: Any, redis_url: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    submit_digits(app_env, name="kept while Redis was away")
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    at = open_page("jobs")
    assert "Redis is unreachable" in at.error[0].value and not at.dataframe
    monkeypatch.setenv("REDIS_URL", redis_url)  # back (same server: its cached client reconnects by itself)
    at.run()
    assert not at.error and not at.exception
    assert list(at.dataframe[0].value["name"]) == ["kept while Redis was away"]


# ------------------------------------------------------------------------------------------------------ New job
FORM_WIDGETS = {
    "selectbox": ["Start from", "Model", "Freeze", "Colour mode", "Augmentation", "Optimizer", "Schedule", "Priority"],
    "checkbox": ["Pretrained (ImageNet weights)", "Mixed precision (AMP)", "Export ONNX when training ends",
                 "Also an INT8 model"],
    "number_input": ["Image size (px)", "Epochs", "Batch size", "Learning rate", "Weight decay", "Label smoothing",
                     "GPUs"],
    "text_input": ["Job name (optional)"],
}


def test_new_job_has_every_field_prefilled_from_the_preset(app_env: Any) -> None:
    at = open_page("new")
    for kind, labels in FORM_WIDGETS.items():
        for label in labels:
            widget(at, kind, label)
    assert widget(at, "selectbox", "Start from").value == "digits"
    assert widget(at, "number_input", "Epochs").value == 12  # configs/digits.yaml
    assert widget(at, "number_input", "Learning rate").value == pytest.approx(0.003)
    assert widget(at, "selectbox", "Colour mode").value == "L"
    assert at.radio[0].value == "digits"
    assert "Submit job" in buttons(at)


def test_submit_enqueues_the_job_and_opens_its_page(app_env: Any) -> None:
    at = open_page("new")
    widget(at, "number_input", "Epochs").set_value(3)
    widget(at, "number_input", "Learning rate").set_value(0.002)
    widget(at, "text_input", "Job name (optional)").set_value("my digits run")
    buttons(at)["Submit job"].click().run()
    assert not at.exception, [e.value for e in at.exception]

    jobs = api.list_jobs(app_env)
    assert len(jobs) == 1
    job = api.job_status(app_env, jobs[0]["id"])
    assert job["state"] == "queued" and job["name"] == "my digits run"
    assert job["config"]["train"]["epochs"] == 3 and job["config"]["optim"]["lr"] == 0.002
    assert job["config"]["data"]["hflip"] is False  # keys the form does not show keep the preset's value
    assert app_env.llen(f"rq:queue:{job['queue']}") == 1
    # landed on the Job page of that job, with its id in the URL
    assert at.query_params.get("job") == job["id"]
    assert at.title[0].value == "Job"
    assert job["id"] in texts(at)


def test_bad_values_show_inline_errors_and_enqueue_nothing(app_env: Any) -> None:
    at = open_page("new")
    widget(at, "number_input", "Epochs").set_value(0)
    widget(at, "number_input", "Learning rate").set_value(0.0)
    buttons(at)["Submit job"].click().run()
    assert not at.exception
    assert enqueued(app_env) == 0
    errors = [e.value for e in at.error]
    assert any(e.startswith("train.epochs:") for e in errors), errors
    assert any(e.startswith("optim.lr:") for e in errors), errors
    assert any("Nothing was submitted" in e for e in errors)
    assert at.title[0].value == "New job"  # stayed on the form, values kept
    assert widget(at, "number_input", "Epochs").value == 0

    widget(at, "number_input", "Epochs").set_value(2)
    widget(at, "number_input", "Learning rate").set_value(0.001)
    buttons(at)["Submit job"].click().run()
    assert len(api.list_jobs(app_env)) == 1 and at.title[0].value == "Job"


def test_more_gpus_than_any_worker_is_refused_at_the_field(app_env: Any) -> None:
    advertise_worker(app_env, slots=2)
    at = open_page("new")
    widget(at, "number_input", "GPUs").set_value(4)
    buttons(at)["Submit job"].click().run()
    assert enqueued(app_env) == 0
    assert any(e.value.startswith("gpus: no live worker can run 4") for e in at.error), [e.value for e in at.error]


def test_frozen_backbone_without_pretrained_is_explained(app_env: Any) -> None:
    at = open_page("new")
    widget(at, "selectbox", "Freeze").set_value("backbone")
    buttons(at)["Submit job"].click().run()
    assert enqueued(app_env) == 0
    assert any(e.value.startswith("model.freeze:") for e in at.error)


def test_feature_cache_fields_show_for_a_frozen_backbone_preset(app_env: Any) -> None:
    at = open_page("new")
    labels = [w.label for w in at.selectbox] + [w.label for w in at.number_input]
    assert "Feature cache" not in labels and "Augmented views per image" not in labels  # digits: nothing frozen
    widget(at, "selectbox", "Start from").set_value("transfer_efficientnet_lite0").run()
    assert not at.exception, [e.value for e in at.exception]
    assert widget(at, "selectbox", "Freeze").value == "backbone"
    assert widget(at, "selectbox", "Feature cache").value == "auto"
    assert widget(at, "number_input", "Augmented views per image").value is None  # empty: auto, by the epochs


def choose_upload(at: Any) -> Any:
    at.radio[0].set_value("upload").run()
    assert not at.exception
    return at.file_uploader[0]


def test_upload_shows_dataset_health_then_submits_it(app_env: Any, tmp_path: Path) -> None:
    folder = make_imagefolder(tmp_path / "shapes", per_class=12, size=16)
    (folder / "square" / "broken.png").write_bytes(b"\x89PNG not really")
    at = open_page("new")
    choose_upload(at).upload("shapes.zip", zip_bytes(folder), "application/zip")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Classes"] == "3" and metrics["Images"] == "36" and metrics["Skipped / corrupt"] == "1"
    assert any("could not be used" in w.value for w in at.warning)  # the corrupt file, named in the report
    assert sum(len(i.value) for i in at.get("image")) >= 3 * 4  # thumbnails: four per class
    assert any("ready to train" in s.value for s in at.success)

    widget(at, "number_input", "Epochs").set_value(1)
    widget(at, "selectbox", "Colour mode").set_value("RGB")
    widget(at, "number_input", "Batch size").set_value(8)  # 36 images: a batch of 64 is refused at submission
    buttons(at)["Submit job"].click().run()
    assert not at.exception
    (job,) = api.list_jobs(app_env, with_config=True)
    assert job["config"]["data"]["name"] == "imagefolder"
    assert job["config"]["data"]["path"].startswith("artifact:datasets/")
    assert job["dataset"]["classes"] == ["circle", "square", "tri"]


@pytest.mark.parametrize(("content", "reason"), [
    (b"this is not a zip file", "not a .zip archive"),
    ("one-class", "need at least two folders of images"),
    ("zip-slip", "contains '..'"),
])
def test_bad_upload_is_refused_with_the_reason(app_env: Any, tmp_path: Path, content: Any, reason: str) -> None:
    if content == "one-class":
        content = zip_bytes(make_imagefolder(tmp_path / "one", classes=("only",)))
    elif content == "zip-slip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("data/a/1.png", b"x")
            zf.writestr("../evil.png", b"x")
        content = buf.getvalue()
    at = open_page("new")
    choose_upload(at).upload("data.zip", content, "application/zip")
    at.run()
    assert not at.exception
    shown = [e.value for e in at.error]
    assert any("cannot be used" in e and reason in e for e in shown), shown
    assert not any(str(tmp_path) in e or "/uploads/" in e for e in shown)  # no server path in the message
    buttons(at)["Submit job"].click().run()
    assert enqueued(app_env) == 0
    assert any(e.value.startswith("dataset:") for e in at.error)


def test_upload_cap_comes_from_the_environment(app_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.upload import UploadError, check_upload, max_upload_mb

    monkeypatch.setenv("DASHBOARD_MAX_UPLOAD_MB", "3")
    assert max_upload_mb() == 3
    with pytest.raises(UploadError, match="the limit is 3 MB"):
        check_upload(b"0" * 3_000_001)
    at = open_page("new")
    at.radio[0].set_value("upload").run()
    assert "at most 3 MB" in at.file_uploader[0].help


# --------------------------------------------------------------------------------------------------------- Jobs
def test_jobs_table_filter_cancel_retry_clone_delete(app_env: Any, finished_run: Path) -> None:
    from worker.artifacts import ArtifactStore

    queued = submit_digits(app_env, name="waiting one")
    done = seed_finished_job(app_env, finished_run, name="done one")
    at = open_page("jobs")
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert list(table["id"]) == [done, queued]  # newest first
    assert set(table.columns) >= {"status", "progress", "epoch", "best val acc", "duration / ETA", "worker",
                                  "submitted"}
    assert table.loc[table["id"] == done, "progress"].item() == 1.0

    at.get("button_group")[0].set_value(["queued"]).run()  # the status filter
    assert list(at.dataframe[0].value["id"]) == [queued]
    at.get("button_group")[0].set_value([]).run()

    at.multiselect[0].set_value([queued]).run()
    buttons(at)["Cancel"].click().run()
    assert api.job_status(app_env, queued)["state"] == "cancelled"
    assert enqueued(app_env) == 2  # the index keeps both jobs; the cancelled one left its RQ queue

    at.multiselect[0].set_value([queued]).run()
    buttons(at)["Retry"].click().run()
    assert not at.exception
    retried = [j for j in api.list_jobs(app_env) if j["id"] not in (queued, done)]
    assert len(retried) == 1 and retried[0]["state"] == "queued"

    at.multiselect[0].set_value([done]).run()
    buttons(at)["Delete…"].click().run()
    assert any("cannot be undone" in w.value for w in at.warning)
    assert api.job_status(app_env, done)["state"] == "finished"  # nothing yet: it asks first
    run_dir = ArtifactStore().local_run_dir(done)
    assert run_dir.is_dir()
    buttons(at)["Yes, delete"].click().run()
    assert not at.exception
    assert done not in [j["id"] for j in api.list_jobs(app_env)]
    assert not run_dir.exists()

    at.multiselect[0].set_value([queued]).run()
    buttons(at)["Clone"].click().run()
    assert not at.exception
    assert at.title[0].value == "New job" and at.query_params.get("clone") == queued
    assert "a copy of job" in widget(at, "selectbox", "Start from").format_func(
        widget(at, "selectbox", "Start from").value)
    assert widget(at, "text_input", "Job name (optional)").value == "waiting one (copy)"
    buttons(at)["Submit job"].click().run()
    assert len(api.list_jobs(app_env)) == 3


# ---------------------------------------------------------------------------------------------------------- Job
def test_running_job_page_reads_only_new_stream_entries(app_env: Any) -> None:
    job = seed_running_job(app_env)
    seed_step_events(app_env, job, 50, steps_per_epoch=20)
    at = open_page("job", {"job": job})
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("plotly_chart")) == 4
    series = at.session_state[f"job:series:{job}"]
    assert series.entries == 50 and len(series.epoch) == 2
    first_last = series.last_id
    assert "Cancel" in buttons(at)
    assert any("stopped sending heartbeats" in w.value for w in at.warning)  # its worker is not alive
    assert any("Log (last" in e.label for e in at.expander)

    seed_step_events(app_env, job, 10, steps_per_epoch=20)  # replays epoch 1's steps: a resumed attempt
    at.run()
    series = at.session_state[f"job:series:{job}"]
    assert series.entries == 60  # the 10 new entries, not 60 re-read
    assert series.last_id > first_last
    assert series.step_x[-1] == pytest.approx(0.5) and len(series.step_x) == 10  # replaced, drawn once
    assert len(series.epoch) == 2


def test_recovering_and_failed_jobs_say_so(app_env: Any) -> None:
    from worker.record import claim_for_requeue, mark_final, mark_started
    from worker.states import JobState

    job = seed_running_job(app_env)
    state, _ = claim_for_requeue(app_env, job, TEST_WORKER, max_recoveries=3, reason="worker lost (test)")
    assert state == "recovering"
    at = open_page("job", {"job": job})
    assert not at.exception
    assert any("Recovering" in w.value and "last checkpoint" in w.value for w in at.warning)

    assert mark_started(app_env, job, TEST_WORKER, job) == "ok"
    app_env.xadd(keys.logs(job), {"line": "Traceback (most recent call last):", "src": "train"})
    app_env.xadd(keys.logs(job), {"line": "RuntimeError: boom", "src": "train"})
    mark_final(app_env, job, TEST_WORKER, JobState.FAILED, {"error": "training failed: RuntimeError: boom"})
    at = open_page("job", {"job": job})
    assert not at.exception
    assert any("Failed" in e.value and "RuntimeError: boom" in e.value for e in at.error)
    log_tail = [c.value for c in at.code if not c.value.startswith("tensorboard ")]  # not the TensorBoard command
    assert "RuntimeError: boom" in log_tail[0]  # the log tail
    assert "Retry" in buttons(at) and "Cancel" not in buttons(at)


def test_finished_job_page_shows_results_and_downloads(app_env: Any, finished_run: Path) -> None:
    job = seed_finished_job(app_env, finished_run)
    at = open_page("job", {"job": job})
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    report = json.loads((finished_run / "report.json").read_text())
    assert metrics["Test accuracy"] == f"{report['test']['accuracy']:.4f}"
    assert metrics["State"].endswith("finished")
    assert "INT8 test accuracy" in metrics and "ONNX parity: max |Δlogit|" in metrics
    downloads = {d.label for d in at.get("download_button")}  # AppTest has no download route: Streamlit's button
    assert downloads == {"model.onnx", "model.int8.onnx", "model.pt", "bundle.zip"}
    charts = at.get("plotly_chart")
    assert len(charts) == 5  # four live charts + the confusion matrix
    tb = f"tensorboard --logdir {ArtifactStore().local_run_dir(job) / 'tb'}"  # the one command to view its curves
    assert any(c.value == tb for c in at.code), [c.value for c in at.code]
    deploy = report["export"]["deploy"]  # the Export tab names the file to deploy, and why
    assert any(f"Deploy `{deploy['file']}`." in m.value and deploy["reason"] in m.value for m in at.success)
    assert list(at.dataframe[0].value.columns) == ["class", "precision", "recall", "f1", "support"]
    gallery = [c.value for c in at.caption if "→ pred" in c.value]
    assert len(gallery) == min(24, len(report.get("misclassified") or []))
    series = at.session_state[f"job:series:{job}"]
    assert len(series.epoch) == report["epochs_completed"]


def test_job_page_without_jobs_and_with_an_unknown_id(app_env: Any) -> None:
    at = open_page("job")
    assert not at.exception and any("No jobs yet" in i.value for i in at.info)
    submit_digits(app_env)
    at = open_page("job", {"job": "../../etc/passwd"})
    assert not at.exception  # a malformed id is just not offered; the picker shows the real jobs
    assert at.selectbox[0].value != "../../etc/passwd"


# ------------------------------------------------------------------------------------------ Compare, Workers, Try
def test_compare_overlays_runs_and_lists_what_differs(app_env: Any, finished_run: Path) -> None:
    a = seed_finished_job(app_env, finished_run, name="run a")
    b = seed_finished_job(app_env, finished_run, name="run b")
    app_env.hset(keys.job(b), "priority", "high")
    at = open_page("compare", {"jobs": f"{a},{b}"})
    assert not at.exception, [e.value for e in at.exception]
    assert at.multiselect[0].value == [a, b]
    assert len(at.get("plotly_chart")) == 2
    metrics, diff = at.dataframe[0].value, at.dataframe[1].value
    assert "test acc" in metrics.index and len(metrics.columns) == 2
    assert list(diff.index) == ["job.priority"]


def test_workers_page_lists_live_workers_and_the_add_command(app_env: Any) -> None:
    advertise_worker(app_env, slots=2, gpus=[{"index": 0, "name": "NVIDIA H100", "memory_mb": 81559},
                                             {"index": 1, "name": "NVIDIA H100", "memory_mb": 81559}])
    at = open_page("workers")
    assert not at.exception
    row = at.dataframe[0].value.iloc[0]
    assert row["host"] == "gpu-box" and "NVIDIA H100 (80 GB)" in row["GPUs"] and row["state"] == "idle"
    assert row["last heartbeat"].endswith("s ago")
    assert any("python -m worker run" in c.value for c in at.code)
    assert all("t-" not in c.value.split("@")[0] for c in at.code)  # no password in the command


def test_try_it_classifies_test_samples_and_uploads(app_env: Any, finished_run: Path) -> None:
    import onnxruntime as ort

    from core.predict_template import classify, load_preprocess, preprocess_image

    job = seed_finished_job(app_env, finished_run)
    at = open_page("try", {"job": job})
    assert not at.exception, [e.value for e in at.exception]
    tables = [d.value for d in at.dataframe]
    assert len(tables) == 4 and all(len(t) == 5 for t in tables)  # 4 samples by default, top-5 each

    # the same numbers as the exported predict.py's functions on the exported model
    report = json.loads((finished_run / "report.json").read_text())
    sample = report["samples"][0]
    pp = load_preprocess(finished_run / "export" / "preprocess.json")
    session = ort.InferenceSession(str(finished_run / "export" / "model.onnx"))
    with Image.open(finished_run / sample["image"]) as img:
        x = preprocess_image(img, pp)[None]
    labels = json.loads((finished_run / "labels.json").read_text())
    expected = classify(session, x, labels, 5, pp.get("input_name") or "input")[0]
    assert list(tables[0]["label"]) == [e["label"] for e in expected]
    assert np.allclose(tables[0]["prob"], [e["prob"] for e in expected], atol=1e-5)

    at.segmented_control[0].set_value("Upload images").run()
    png = io.BytesIO()
    Image.fromarray(np.full((40, 30), 200, np.uint8)).save(png, format="PNG")
    at.file_uploader[0].set_value([("mine.png", png.getvalue(), "image/png"), ("bad.png", b"nope", "image/png")])
    at.run()
    assert not at.exception
    assert len(at.dataframe) == 1
    assert any("bad.png: not a readable image" in e.value for e in at.error)
