"""The dataset registry (worker/datasets, `python -m worker dataset ...`): real Redis, a real S3 server (moto_server on
loopback, through s3fs), real worker processes. Registering an in-place source downloads only its sample."""
from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_s3 import S3Server, s3_server  # noqa: F401 - s3_server: the fixture
from tests.fixtures_worker import DIGITS, explain_job, make_imagefolder, run_cli
from worker import api, datasets, keys
from worker.artifacts import ArtifactStore
from worker.defaults import DATASET_SAMPLE_PER_CLASS
from worker.errors import DatasetError, NoSuchDatasetError, SubmissionError
from worker.submit import submit_job

FAST = ["export.enabled=false", "train.log_every=2", "data.image_size=16", "train.batch_size=8",
        "track.tensorboard=false"]
"""Jobs here: a small imagefolder, no export, 16 px."""


def cli(args: list[str], env: dict[str, str]) -> Any:
    return run_cli(["worker", "dataset", *args], env)


def sets(overrides: list[str]) -> list[str]:
    """`--set` flags for the CLI, one per override."""
    return [arg for o in overrides for arg in ("--set", o)]


def stored_zips(env: dict[str, str]) -> list[str]:
    folder = Path(env["ARTIFACTS_DIR"]) / "datasets"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def upload_tree(server: S3Server, local: Path, url: str) -> None:
    """Put every file under `local` to `url` (s3://bucket/prefix), keeping relative paths."""
    fs = server.fs()
    bucket_and_prefix = url.removeprefix("s3://")
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{bucket_and_prefix}/{path.relative_to(local).as_posix()}")


# ----------------------------------------------------------------------------------------------- local sources
def test_add_folder_and_zip_then_list_show_rm(redis_conn: Any, job_env: dict[str, str], tmp_path: Path) -> None:
    folder = make_imagefolder(tmp_path / "shapes")
    out = cli(["add", "shapes", str(folder), "--prepare"], job_env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "shapes:1" and "3 classes, 36 images" in out.stdout
    assert "prepared shapes:1" in out.stdout  # --prepare: shards now (tests/test_shards_worker.py)
    again = datasets.register(redis_conn, "shapes", str(folder))
    assert not again.created and again.version.version == 1  # same content: no new version

    archive = Path(shutil.make_archive(str(tmp_path / "shapes-zip"), "zip", tmp_path, "shapes"))
    v2 = datasets.register(redis_conn, "shapes", str(archive)).version
    assert v2.version == 2 and v2.kind == "upload" and v2.source == f"artifact:datasets/{v2.hash}.zip"
    assert v2.counts == {"circle": 12, "square": 12, "tri": 12} and v2.num_images == 36
    assert len(stored_zips(job_env)) == 2
    alias = datasets.register(redis_conn, "alias", v2.source).version  # a zip already in the store, another name
    assert (alias.ref, alias.hash, alias.kind, alias.counts) == ("alias:1", v2.hash, "upload", v2.counts)

    listed = json.loads(cli(["list", "--json"], job_env).stdout)
    assert [(d["name"], d["versions"], d["latest"]) for d in listed] == [("shapes", [1, 2], 2), ("alias", [1], 1)]
    shown = json.loads(cli(["show", "shapes:2", "--json"], job_env).stdout)
    assert shown["ref"] == "shapes:2" and shown["hash"] == v2.hash and shown["prepared"] == [] and shown["jobs"] == []
    assert shown["report"]["classes"] == ["circle", "square", "tri"] and shown["bytes"] == archive.stat().st_size
    text = cli(["show", "shapes"], job_env).stdout
    assert "shapes:1" in text and "shapes:2" in text and "circle" in text

    out = cli(["rm", "shapes:1"], job_env)
    assert out.returncode == 0 and "removed shapes:1" in out.stdout
    assert stored_zips(job_env) == [f"{v2.hash}.zip"]  # v1's zip went, v2's stays
    out = cli(["show", "shapes:1"], job_env)
    assert out.returncode == 2 and "has no version 1; versions: 2" in out.stderr
    out = cli(["rm", "shapes:7"], job_env)
    assert out.returncode == 2 and "versions: 2" in out.stderr
    assert datasets.register(redis_conn, "shapes", str(folder)).version.version == 3  # numbers are never reused
    assert cli(["rm", "shapes"], job_env).returncode == 0
    assert datasets.list_datasets(redis_conn) == ["alias"]
    assert stored_zips(job_env) == [f"{v2.hash}.zip"]  # alias:1 still refers to it
    datasets.remove(redis_conn, "alias:1")
    assert datasets.list_datasets(redis_conn) == [] and stored_zips(job_env) == []
    out = cli(["show", "shapes"], job_env)
    assert out.returncode == 2 and "no dataset 'shapes'; registered: none" in out.stderr


def test_file_url_is_read_in_place(redis_conn: Any, job_env: dict[str, str], tmp_path: Path) -> None:
    folder = make_imagefolder(tmp_path / "shared" / "shapes", per_class=20)
    (folder / "tri" / "019.png").write_bytes(b"not a png")  # among the sample of a 20-image class
    v = datasets.register(redis_conn, "shared", f"file://{folder}/").version
    assert v.kind == "in_place" and v.source == f"file://{folder}" and v.data_path == str(folder)
    assert v.counts == {"circle": 20, "square": 20, "tri": 20}  # every listed image, not only the sample
    assert v.report["sampled"]["images"] == 3 * DATASET_SAMPLE_PER_CLASS < 60
    assert [s["file"] for s in v.report["skipped_files"]] == ["tri/019.png"]  # the corrupt one, by name
    assert stored_zips(job_env) == []  # nothing uploaded

    job = submit_job(DIGITS, ["data.dataset=shared", *FAST], connection=redis_conn).job_id
    st = api.job_status(redis_conn, job)
    assert st["config"]["data"]["path"] == str(folder) and st["config"]["data"]["dataset"] == "shared:1"
    assert st["config"]["data"]["name"] == "imagefolder"
    assert (st["dataset"]["name"], st["dataset"]["version"], st["dataset"]["hash"]) == ("shared", 1, v.hash)
    assert [j.id for j in datasets.version_jobs(redis_conn, "shared", 1)] == [job]

    # a changed listing (a file added) is a new version; the old one keeps its hash
    make_imagefolder(folder, classes=("circle",), per_class=21)
    v2 = datasets.register(redis_conn, "shared", f"file://{folder}").version
    assert v2.version == 2 and v2.hash != v.hash and v2.counts["circle"] == 21


def test_refusals_name_the_problem_and_register_nothing(redis_conn: Any, job_env: dict[str, str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    single = make_imagefolder(tmp_path / "one", classes=("only",))
    loose = tmp_path / "loose"
    make_imagefolder(tmp_path / "tmp-loose", classes=("x",))
    shutil.copytree(tmp_path / "tmp-loose" / "x", loose)
    (tmp_path / "empty").mkdir()
    cases = [
        ("one", str(single), "found 1 class folder (only)"),
        ("one", f"file://{single}", "found 1 class folder (only)"),
        ("loose", f"file://{loose}", "no class folders with images"),
        ("empty", f"file://{tmp_path / 'empty'}", "holds no files"),
        ("gone", f"file://{tmp_path / 'gone'}", "nothing there"),
        ("gone", str(tmp_path / "gone"), "does not exist"),
        ("web", "https://127.0.0.1:9/folder", "must be a .zip"),
        ("ftp", "ftp://127.0.0.1:9/photos", "cannot list ftp://127.0.0.1:9/photos: ConnectionRefusedError"),
        ("nothing", "", "no source given"),
    ]
    for name, source, message in cases:
        with pytest.raises(DatasetError, match=re.escape(message)):
            datasets.register(redis_conn, name, source)
    out = cli(["add", "Bad Name", str(single)], job_env)  # the CLI: one line, exit 2
    assert out.returncode == 2 and out.stderr.startswith("error: invalid dataset name 'Bad Name'")
    assert "Traceback" not in out.stderr
    # the upload cap is configurable; in-place sources have none
    folder = make_imagefolder(tmp_path / "shapes")
    monkeypatch.setenv("UPLOAD_MAX_BYTES", "1000")
    with pytest.raises(DatasetError, match="upload limit is 0.00 GB \\(UPLOAD_MAX_BYTES\\)"):
        datasets.register(redis_conn, "capped", str(folder))
    assert datasets.register(redis_conn, "inplace", f"file://{folder}").version.bytes > 1000
    datasets.remove(redis_conn, "inplace")
    assert datasets.list_datasets(redis_conn) == [] and stored_zips(job_env) == []
    assert redis_conn.keys(b"trainer:dataset*") == [b"trainer:dataset:inplace:seq"]  # numbers never reused


def test_submission_resolves_versions_and_rm_waits_for_queued_jobs(redis_conn: Any, job_env: dict[str, str],
                                                                    tmp_path: Path) -> None:
    folder = make_imagefolder(tmp_path / "shapes")
    datasets.register(redis_conn, "shapes", str(folder))
    v2 = datasets.register(redis_conn, "shapes", f"file://{folder}").version
    out = run_cli(["worker", "submit", str(DIGITS), *sets(["data.dataset=shapes:5", *FAST])], job_env)
    assert out.returncode == 2 and "data.dataset: dataset 'shapes' has no version 5; versions: 1, 2" in out.stderr
    with pytest.raises(SubmissionError, match="no dataset 'cats'; registered: shapes"):
        submit_job(DIGITS, ["data.dataset=cats", *FAST], connection=redis_conn)
    with pytest.raises(SubmissionError, match="data.path: leave data.path empty with data.dataset"):
        submit_job(DIGITS, ["data.dataset=shapes", f"data.path={tmp_path}", *FAST], connection=redis_conn)
    with pytest.raises(SubmissionError, match="train.batch_size"):  # checked against the version's counts
        submit_job(DIGITS, ["data.dataset=shapes", *FAST, "train.batch_size=64"], connection=redis_conn)
    assert api.list_jobs(redis_conn) == []

    job = submit_job(DIGITS, ["data.dataset=shapes", *FAST], connection=redis_conn).job_id  # latest: v2
    st = json.loads(run_cli(["worker", "status", job, "--json"], job_env).stdout)
    assert st["dataset"]["name"] == "shapes" and st["dataset"]["version"] == 2 and st["dataset"]["hash"] == v2.hash
    assert st["config"]["track"]["tags"]["dataset"] == "shapes:2"

    out = cli(["rm", "shapes"], job_env)  # queued: refused, nothing removed
    assert out.returncode == 2 and f"job {job} (queued)" in out.stderr
    assert [v.version for v in datasets.dataset_versions(redis_conn, "shapes")] == [1, 2]
    v3 = datasets.register(redis_conn, "shapes", str(make_imagefolder(tmp_path / "more", per_class=13))).version
    api.cancel_job(redis_conn, job)
    retried = api.retry_job(redis_conn, job)  # the recorded version, not the latest
    assert api.job_status(redis_conn, retried)["dataset"]["version"] == 2 and v3.version == 3
    api.cancel_job(redis_conn, retried)
    assert [j.id for j in datasets.version_jobs(redis_conn, "shapes", 2)] == [job, retried]
    assert cli(["rm", "shapes:2"], job_env).returncode == 0
    with pytest.raises(SubmissionError, match="has no version 2; versions: 1, 3"):
        api.retry_job(redis_conn, job)
    with pytest.raises(NoSuchDatasetError):
        datasets.get_version(redis_conn, "shapes:2")
    with pytest.raises(DatasetError, match="invalid dataset version"):
        datasets.get_version(redis_conn, "shapes:x")

    # a sweep's trials are jobs: each is pinned and recorded like any other
    from worker.sweeps import create_sweep, sweep_trials

    sweep = create_sweep(DIGITS, {"optim.lr": {"float": [1e-3, 1e-2]}}, connection=redis_conn, trials=2, parallel=2,
                         overrides=["data.dataset=shapes:3", *FAST])
    trial_jobs = [t["job"] for t in sweep_trials(redis_conn, sweep)]
    assert len(trial_jobs) == 2
    assert {api.job_status(redis_conn, j)["dataset"]["ref"] for j in trial_jobs} == {"shapes:3"}
    assert {j.id for j in datasets.version_jobs(redis_conn, "shapes", 3)} == set(trial_jobs)


# -------------------------------------------------------------------------------------------------------- S3
def test_s3_prefix_is_registered_in_place_from_a_sample(redis_conn: Any, job_env: dict[str, str], tmp_path: Path,
                                                       s3_server: S3Server) -> None:  # noqa: F811
    bucket = s3_server.bucket("photos")
    local = tmp_path / "split"
    make_imagefolder(local / "train", per_class=30)
    make_imagefolder(local / "val", per_class=6)
    upload_tree(s3_server, local, f"{bucket}/split")
    (local / "train" / "tri" / "000.png").write_bytes(b"\x89PNG broken")
    s3_server.fs().put_file(str(local / "train" / "tri" / "000.png"), "photos/split/train/tri/000.png")
    before = len(s3_server.object_gets("photos"))

    v = datasets.register(redis_conn, "photos", f"{bucket}/split/").version
    fetched = s3_server.object_gets("photos")[before:]
    assert v.source == "s3://photos/split" and v.kind == "in_place" and stored_zips(job_env) == []
    assert v.counts == {"circle": 36, "square": 36, "tri": 36} and v.num_images == 108
    assert v.counts_by_split == {"train": {"circle": 30, "square": 30, "tri": 30},
                                 "val": {"circle": 6, "square": 6, "tri": 6}}
    # nothing downloaded beyond the sample: per class and split at most DATASET_SAMPLE_PER_CLASS images
    assert len(fetched) == v.report["sampled"]["images"] <= 6 * DATASET_SAMPLE_PER_CLASS < 108
    assert len(set(fetched)) == len(fetched)
    assert [s["file"] for s in v.report["skipped_files"]] == ["train/tri/000.png"]
    assert any(w.startswith("sampled:") for w in v.report["warnings"])
    assert v.bytes == sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    again = datasets.register(redis_conn, "photos", f"{bucket}/split")
    assert not again.created and again.version.version == 1

    # a zip in the bucket is read through range requests: its directory and the sample, not the whole zip
    archive = Path(shutil.make_archive(str(tmp_path / "split-zip"), "zip", local))
    s3_server.fs().put_file(str(archive), "photos/split.zip")
    z = datasets.register(redis_conn, "photos-zip", f"{bucket}/split.zip").version
    assert z.counts == v.counts and z.bytes == archive.stat().st_size


def test_upload_into_an_s3_artifact_store(redis_conn: Any, job_env: dict[str, str], tmp_path: Path,
                                         s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("ARTIFACTS_DIR", s3_server.bucket("store") + "/artifacts")
    v = datasets.register(redis_conn, "shapes", str(make_imagefolder(tmp_path / "shapes"))).version
    fs = s3_server.fs()
    assert fs.exists(f"store/artifacts/datasets/{v.hash}.zip") and v.source.startswith("artifact:")
    datasets.remove(redis_conn, "shapes")
    assert not s3_server.fs().exists(f"store/artifacts/datasets/{v.hash}.zip")


def test_s3_refusals(redis_conn: Any, job_env: dict[str, str], tmp_path: Path, s3_server: S3Server,  # noqa: F811
                     monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.bucket("refused")
    make_imagefolder(tmp_path / "flat", classes=("x",))
    upload_tree(s3_server, tmp_path / "flat" / "x", f"{bucket}/flat")  # images, but no class folders
    upload_tree(s3_server, make_imagefolder(tmp_path / "one", classes=("only",)), f"{bucket}/one")
    cases = [("s3://refused/empty", "nothing there"), ("s3://no-such-bucket/x", "nothing there"),
             ("s3://refused/flat", "no class folders with images"), ("s3://refused/one", "found 1 class folder")]
    for url, message in cases:
        with pytest.raises(DatasetError, match=message):
            datasets.register(redis_conn, "refused", url)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {**job_env, **s3_server.env, "AWS_ENDPOINT_URL": closed, "AWS_ENDPOINT_URL_S3": closed,
           "AWS_MAX_ATTEMPTS": "1"}
    out = cli(["add", "unreachable", "s3://refused/one"], env)
    assert out.returncode == 2 and "cannot list s3://refused/one" in out.stderr and "endpoint" in out.stderr
    assert datasets.list_datasets(redis_conn) == []


def test_job_on_an_s3_dataset_trains_on_a_real_worker(redis_conn: Any, job_env: dict[str, str], tmp_path: Path,
                                                      s3_server: S3Server, spawn: Any) -> None:  # noqa: F811
    bucket = s3_server.bucket("train")
    upload_tree(s3_server, make_imagefolder(tmp_path / "shapes"), f"{bucket}/shapes")
    v = datasets.register(redis_conn, "shapes", f"{bucket}/shapes").version
    env = {**job_env, **s3_server.env}
    out = run_cli(["worker", "submit", str(DIGITS), *sets(["data.dataset=shapes", "train.epochs=2", *FAST])], env)
    assert out.returncode == 0, out.stderr
    job = out.stdout.split()[-1]
    shared = datasets.register(redis_conn, "shared", f"file://{tmp_path / 'shapes'}").version  # read in place
    local_job = submit_job(DIGITS, ["data.dataset=shared", "train.epochs=1", *FAST], connection=redis_conn).job_id

    worker = spawn.python(["worker", "run", "--cpu", "--slots", "1", "--burst"], env, name="worker")
    assert worker.wait(timeout=240) == 0, spawn.output(worker)
    st = json.loads(run_cli(["worker", "status", job, "--json"], env).stdout)
    assert st["state"] == "finished", explain_job(redis_conn, job, spawn)()
    assert {k: st["dataset"][k] for k in ("name", "version", "hash")} == {"name": "shapes", "version": 1,
                                                                          "hash": v.hash}
    report = json.loads(api.read_artifact(job, "report"))
    assert report["data"]["dataset"] == "shapes:1" and report["data"]["classes"] == ["circle", "square", "tri"]
    assert report["epochs_completed"] == 2
    cache = Path(env["TRAINER_VAR_DIR"]) / "cache" / "datasets"
    assert [p.name for p in cache.iterdir()] == [v.hash]  # synced once into the worker's cache, keyed by hash
    st = api.job_status(redis_conn, local_job)  # the file:// one trained from the folder itself (not in the cache)
    assert st["state"] == "finished", explain_job(redis_conn, local_job, spawn)()
    assert json.loads(api.read_artifact(local_job, "report"))["data"]["dataset"] == "shared:1" == shared.ref
    assert st["config"]["data"]["path"] == str(tmp_path / "shapes")
    assert [j.state for j in datasets.version_jobs(redis_conn, "shapes", 1)] == ["finished"]
    assert ArtifactStore().list_files(job)  # the run folder as for any job
    assert keys.dataset_jobs("shapes", 1).encode() in redis_conn.keys(b"trainer:dataset:*")

    # the bucket changed after registration: a job on the old version fails naming it, nothing is trained on
    s3_server.fs().pipe("train/shapes/tri/extra.png", (tmp_path / "shapes" / "tri" / "000.png").read_bytes())
    retried = api.retry_job(redis_conn, job)
    worker = spawn.python(["worker", "run", "--cpu", "--slots", "1", "--burst"], env, name="worker")
    assert worker.wait(timeout=120) == 0, spawn.output(worker)
    st = api.job_status(redis_conn, retried)
    assert st["state"] == "failed" and st["error_kind"] == "ArtifactError", st
    assert "shapes:1" in st["error"] and "changed since it was registered" in st["error"]
