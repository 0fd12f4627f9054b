"""The Datasets page and the registered-dataset parts of New job and Job, through Streamlit's AppTest against the real
test redis-server (and a real S3 server, moto_server on loopback, where a URL source is involved).

What a user would notice: the list and one version's classes, health, images and jobs; a refused registration says
why and registers nothing; removing a version in use is refused with the registry's reason; New job submits
`data.dataset: NAME:VERSION` (the latest unless another version is picked); an upload on New job becomes a version
the job trains on, which a clone keeps; the Job page names the version it trained on and its data path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_app import open_page, seed_finished_job, submit_digits, texts
from tests.fixtures_runs import digits_run_exported
from tests.fixtures_s3 import S3Server, s3_server  # noqa: F401 - s3_server: the fixture
from tests.fixtures_worker import make_imagefolder
from tests.test_app import buttons, enqueued, widget, zip_bytes
from worker import api, keys

SMALL = ["train.batch_size=8", "data.image_size=16"]
"""A job on the 36-image test dataset: a batch of 64 would be refused at submission."""


@pytest.fixture
def app_env(redis_conn: Any, job_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An empty Redis, and this test's own artifact store, var/ and dataset caches."""
    monkeypatch.setenv("DATA_CACHE_DIR", str(tmp_path / "data-cache"))
    return redis_conn


def shapes(tmp_path: Path, name: str = "shapes", *, corrupt: bool = False, per_class: int = 12) -> Path:
    folder = make_imagefolder(tmp_path / name, per_class=per_class, size=16)
    if corrupt:
        (folder / "tri" / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


TABLES = {
    "list": ("name", "latest", "versions"), "counts": ("class", "images"), "jobs": ("job", "status", "submitted"),
    "versions": ("version", "classes", "images"), "skipped": ("file", "reason"),
}
"""The Datasets page's tables, told apart by their first columns (AppTest does not expose a dataframe's key)."""


def frame(at: Any, table: str) -> Any:
    """The dataframe of the page that is `table` (a key of TABLES), as a pandas DataFrame."""
    first = TABLES[table]
    found = [d.value for d in at.dataframe if tuple(d.value.columns[:len(first)]) == first]
    assert found, [list(d.value.columns) for d in at.dataframe]
    return found[0]


def thumbnails(at: Any) -> int:
    """Images the page shows (st.image lists)."""
    return sum(len(i.value) for i in at.get("image"))


def no_exception(at: Any) -> None:
    assert not at.exception, [e.value for e in at.exception]


# ------------------------------------------------------------------------------------------------ the page
def test_list_a_version_its_classes_health_images_and_jobs(app_env: Any, tmp_path: Path) -> None:
    v1 = api.datasets.register(app_env, "shapes", str(shapes(tmp_path, corrupt=True))).version
    v2 = api.datasets.register(app_env, "shapes", str(shapes(tmp_path, "more", per_class=14))).version
    api.datasets.register(app_env, "other", str(shapes(tmp_path, "third", per_class=10)))
    job = submit_digits(app_env, ["data.dataset=shapes:1", *SMALL], name="on shapes one")

    at = open_page("datasets")
    no_exception(at)
    listed = frame(at, "list")
    assert list(listed["name"]) == ["shapes", "other"]
    assert listed.loc[0, "latest"] == "shapes:2" and listed.loc[0, "versions"] == 2
    assert listed.loc[0, "images"] == 42 and listed.loc[0, "classes"] == 3 and listed.loc[0, "source"] == "uploaded"
    assert at.subheader[0].value == "shapes:2"  # the latest version by default
    assert at.query_params.get("dataset") == "shapes"

    widget(at, "selectbox", "Version").set_value(1).run()  # the older one, with its job
    no_exception(at)
    assert at.subheader[0].value == "shapes:1" and at.query_params.get("version") == "1"
    assert v1.hash in texts(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Classes"] == "3" and metrics["Images"] == "36" and metrics["Corrupt / skipped"] == "1"
    assert any("could not be used" in w.value for w in at.warning)
    assert "broken.png" in frame(at, "skipped").to_string()
    counts = frame(at, "counts")
    assert dict(zip(counts["class"], counts["images"])) == {"circle": 12, "square": 12, "tri": 12}
    assert thumbnails(at) == 3 * 4  # four images per class
    jobs = frame(at, "jobs")
    assert list(jobs["job"]) == [f"job?job={job}"] and list(jobs["status"]) == ["queued"]
    versions = frame(at, "versions")
    assert list(versions["version"]) == [2, 1] and versions.loc[0, "hash"] == v2.hash[:12]

    at = open_page("datasets", {"dataset": "other"})  # a link to another dataset
    no_exception(at)
    assert at.subheader[0].value == "other:1"


def test_a_refused_registration_says_why_and_registers_nothing(app_env: Any, tmp_path: Path,
                                                               s3_server: S3Server) -> None:
    bucket = s3_server.bucket("photos")
    s3_server.fs().pipe_file("photos/loose/readme.txt", b"no class folders here")
    at = open_page("datasets")
    no_exception(at)
    assert any("No registered datasets" in i.value for i in at.info)
    widget(at, "text_input", "Dataset name").set_value("photos")
    widget(at, "radio", "Source").set_value("url").run()
    for url, reason in ((f"{bucket}/nothing-here", "nothing there"),
                        (f"{bucket}/loose", "no class folders with images"),
                        (str(tmp_path), "is not a URL"),
                        (f"file://{tmp_path}", "DASHBOARD_DATASET_ROOTS")):
        widget(at, "text_input", "URL").set_value(url)
        buttons(at)["Register"].click().run()
        no_exception(at)
        shown = [e.value for e in at.error]
        assert any("Nothing was registered" in e and reason in e for e in shown), (url, shown)
        assert api.datasets.list_datasets(app_env) == []
    widget(at, "text_input", "Dataset name").set_value("Bad Name")
    buttons(at)["Register"].click().run()
    assert any("invalid dataset name" in e.value for e in at.error)
    assert not list(app_env.scan_iter(keys.dataset_versions("photos")))


def test_register_an_s3_url_and_an_upload_from_the_page(app_env: Any, tmp_path: Path, s3_server: S3Server) -> None:
    from tests.test_datasets import upload_tree

    bucket = s3_server.bucket("data")
    upload_tree(s3_server, shapes(tmp_path, per_class=40), f"{bucket}/shapes")
    at = open_page("datasets")
    widget(at, "text_input", "Dataset name").set_value("remote")
    widget(at, "radio", "Source").set_value("url").run()
    widget(at, "text_input", "URL").set_value(f"{bucket}/shapes")
    buttons(at)["Register"].click().run()
    no_exception(at)
    version = api.datasets.get_version(app_env, "remote")
    assert version.kind == "in_place" and version.source == f"{bucket}/shapes" and version.num_images == 120
    assert at.subheader[0].value == "remote:1"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Checked"].startswith("sample of")
    assert thumbnails(at) == 3 * 4  # read from the bucket, a few per class
    read = set(s3_server.object_gets("data"))  # registration's sample (8 per class), then 4 thumbnails per class
    assert len(read) <= 3 * (8 + 4) < 120, len(read)

    widget(at, "text_input", "Dataset name").set_value("remote")
    widget(at, "radio", "Source").set_value("upload").run()
    at.file_uploader[0].upload("shapes.zip", zip_bytes(shapes(tmp_path, "zipped", per_class=13)), "application/zip")
    buttons(at)["Register"].click().run()
    no_exception(at)
    assert [v.kind for v in api.datasets.dataset_versions(app_env, "remote")] == ["in_place", "upload"]
    assert at.subheader[0].value == "remote:2" and any("Registered remote:2" in s.value for s in at.success)


def test_register_a_shared_folder_under_the_allowed_roots(app_env: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "shared" / "photos"  # pre-split, below a wrapping folder: the walk finds the class folders
    make_imagefolder(root / "all" / "train", per_class=8, size=16)
    make_imagefolder(root / "all" / "val", per_class=4, size=16)
    monkeypatch.setenv("DASHBOARD_DATASET_ROOTS", str(tmp_path / "shared"))
    at = open_page("datasets")
    widget(at, "text_input", "Dataset name").set_value("photos")
    widget(at, "radio", "Source").set_value("url").run()
    widget(at, "text_input", "URL").set_value(f"file://{root}")
    buttons(at)["Register"].click().run()
    no_exception(at)
    assert api.datasets.get_version(app_env, "photos:1").kind == "in_place"
    counts = frame(at, "counts")
    assert list(counts.columns) == ["class", "images", "train", "val"]
    assert counts.loc[0].to_dict() == {"class": "circle", "images": 12, "train": 8, "val": 4}
    assert thumbnails(at) == 3 * 4


def test_removing_a_version_in_use_is_refused_with_the_reason(app_env: Any, tmp_path: Path) -> None:
    api.datasets.register(app_env, "shapes", str(shapes(tmp_path)))
    job = submit_digits(app_env, ["data.dataset=shapes", *SMALL])
    at = open_page("datasets", {"dataset": "shapes", "version": "1"})
    buttons(at)["Remove shapes:1…"].click().run()
    assert any("cannot be undone" in w.value and "1 active job" in w.value for w in at.warning)
    buttons(at)["Yes, remove"].click().run()
    no_exception(at)
    assert any("Not removed" in e.value and f"by job {job} (queued)" in e.value for e in at.error), \
        [e.value for e in at.error]
    assert api.datasets.get_version(app_env, "shapes:1").version == 1

    api.cancel_job(app_env, job)
    buttons(at)["Remove shapes:1…"].click().run()
    buttons(at)["Yes, remove"].click().run()
    no_exception(at)
    assert api.datasets.list_datasets(app_env) == []
    assert any("Removed shapes:1" in s.value for s in at.success)
    assert any("No registered datasets" in i.value for i in at.info)


# -------------------------------------------------------------------------------------------------- New job
def test_new_job_on_a_registered_dataset_submits_name_and_version(app_env: Any, tmp_path: Path) -> None:
    api.datasets.register(app_env, "shapes", str(shapes(tmp_path)))
    v2 = api.datasets.register(app_env, "shapes", str(shapes(tmp_path, "more", per_class=14))).version
    at = open_page("new")
    at.radio[0].set_value("registered").run()
    no_exception(at)
    assert widget(at, "selectbox", "Registered dataset").value == "shapes"
    assert widget(at, "selectbox", "Version").value == 2  # the latest by default
    widget(at, "selectbox", "Colour mode").set_value("RGB")
    widget(at, "number_input", "Batch size").set_value(8)
    buttons(at)["Submit job"].click().run()
    no_exception(at)
    (job,) = api.list_jobs(app_env, with_config=True)
    assert job["config"]["data"]["dataset"] == "shapes:2" and job["config"]["data"]["path"] == v2.data_path
    assert api.job_status(app_env, job["id"])["dataset"]["hash"] == v2.hash
    assert at.title[0].value == "Job" and "Dataset shapes:2" in [p.proto.label for p in at.get("page_link")]

    at = open_page("new", {"dataset": "shapes:1"})  # "New job on shapes:1" from the Datasets page
    assert at.radio[0].value == "registered" and widget(at, "selectbox", "Version").value == 1
    widget(at, "number_input", "Batch size").set_value(8)
    buttons(at)["Submit job"].click().run()
    no_exception(at)
    assert sorted(j["config"]["data"]["dataset"] for j in api.list_jobs(app_env, with_config=True)) == \
        ["shapes:1", "shapes:2"]


def test_a_sweep_on_a_registered_dataset_pins_every_trial(app_env: Any, tmp_path: Path) -> None:
    api.datasets.register(app_env, "shapes", str(shapes(tmp_path)))
    at = open_page("new")
    at.toggle(key="new:sweep").set_value(True).run()
    at.radio[0].set_value("registered").run()
    prefix = "new:digits:"
    at.multiselect(key=prefix + "sweep:vary").set_value(["optim.lr"]).run()
    at.number_input(key=prefix + "sweep:trials").set_value(2)
    widget(at, "number_input", "Batch size").set_value(8)
    [start] = [b for b in at.button if b.label == "Start sweep"]
    start.click().run()
    no_exception(at)
    [sweep] = api.list_sweeps(app_env)
    trials = api.list_jobs(app_env, with_config=True)
    assert trials and {t["config"]["data"]["dataset"] for t in trials} == {"shapes:1"}, sweep


def test_new_job_without_registered_datasets_submits_nothing(app_env: Any) -> None:
    at = open_page("new")
    at.radio[0].set_value("registered").run()
    assert any("No registered datasets" in i.value for i in at.info)
    buttons(at)["Submit job"].click().run()
    no_exception(at)
    assert enqueued(app_env) == 0
    assert any(e.value.startswith("dataset: pick a registered dataset") for e in at.error)


def test_upload_registers_a_version_that_a_clone_keeps(app_env: Any, tmp_path: Path) -> None:
    at = open_page("new")
    at.radio[0].set_value("upload").run()
    at.file_uploader[0].upload("My Shapes.zip", zip_bytes(shapes(tmp_path)), "application/zip")
    at.run()
    no_exception(at)
    assert widget(at, "text_input", "Register as dataset").value == "my-shapes"
    widget(at, "number_input", "Epochs").set_value(0)  # refused: nothing registered, nothing enqueued
    buttons(at)["Submit job"].click().run()
    assert api.datasets.list_datasets(app_env) == [] and enqueued(app_env) == 0
    assert any(e.value.startswith("train.epochs:") for e in at.error)

    widget(at, "number_input", "Epochs").set_value(1)
    widget(at, "selectbox", "Colour mode").set_value("RGB")
    widget(at, "number_input", "Batch size").set_value(8)
    buttons(at)["Submit job"].click().run()
    no_exception(at)
    (job,) = api.list_jobs(app_env, with_config=True)
    version = api.datasets.get_version(app_env, "my-shapes")
    assert job["config"]["data"]["dataset"] == "my-shapes:1" == version.ref and version.kind == "upload"
    assert job["dataset"]["ref"] == "my-shapes:1"
    assert [j.id for j in api.datasets.version_jobs(app_env, "my-shapes", 1)] == [job["id"]]

    at = open_page("new", {"clone": job["id"]})  # the clone keeps the version, no upload
    no_exception(at)
    assert at.radio[0].value == "registered"
    assert widget(at, "selectbox", "Registered dataset").value == "my-shapes"
    buttons(at)["Submit job"].click().run()
    no_exception(at)
    clone = [j for j in api.list_jobs(app_env, with_config=True) if j["id"] != job["id"]]
    assert [c["config"]["data"]["dataset"] for c in clone] == ["my-shapes:1"]
    assert len(api.datasets.dataset_versions(app_env, "my-shapes")) == 1  # nothing registered again


# ------------------------------------------------------------------------------------------------------ Job
def test_job_page_names_its_dataset_version_and_data_path(app_env: Any, tmp_path: Path,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    run = digits_run_exported(tmp_path_factory)[0]
    version = api.datasets.register(app_env, "shapes", str(shapes(tmp_path))).version
    job = seed_finished_job(app_env, run, overrides=["data.dataset=shapes:1", *SMALL])
    at = open_page("job", {"job": job})
    no_exception(at)
    links = {p.proto.label: p for p in at.get("page_link")}
    assert "Dataset shapes:1" in links and "version=1" in links["Dataset shapes:1"].proto.query_string
    assert version.hash in texts(at)
    report = json.loads((run / "report.json").read_text())
    assert f"Data path: {report['data_path'].replace('_', ' ')}" in texts(at)


# ---------------------------------------------------------------------------------------------------- helpers
def test_a_name_from_a_file_name_and_the_config_a_choice_builds() -> None:
    from app import forms
    from app.tables import data_path_text

    assert api.suggest_dataset_name("My Photos (2).zip") == "my-photos-2"
    assert api.suggest_dataset_name("flowers-2024.ZIP") == "flowers-2024"
    assert api.suggest_dataset_name("___.zip") == "dataset"
    raw = {"data": {"name": "imagefolder", "path": "artifact:datasets/x.zip", "dataset": "old:1"}}
    assert forms.default_dataset(raw) == forms.REGISTERED  # a clone keeps its registered version
    registered = forms.build_config(raw, {}, forms.REGISTERED, "shapes:2")["data"]
    assert registered == {"name": "imagefolder", "dataset": "shapes:2"}  # submission pins data.path
    assert "dataset" not in forms.build_config(raw, {}, "digits")["data"]
    assert data_path_text({"data_path": "tensor_cache"}).startswith("tensor cache")
    assert data_path_text({"data": {"path": "shards"}}).startswith("prepared shards")
    assert data_path_text({"data": {}}) is None
