"""The artifact store, local and behind an fsspec URL (file:// stands in for s3:// etc.: same code path):
artifacts are opened by (job id, listed name) only, remote syncs upload what changed, datasets are cached by hash."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from worker import keys
from worker.artifacts import ArtifactStore
from worker.errors import ArtifactError, NoSuchJobError


def fill_run(run: Path) -> None:
    (run / "checkpoints").mkdir(parents=True)
    (run / "export").mkdir()
    (run / "report.json").write_text('{"test": {"accuracy": 1.0}}')
    (run / "checkpoints" / "last.pt").write_bytes(b"ckpt-1")
    (run / "export" / "model.onnx").write_bytes(b"onnx")


def test_local_store_opens_only_listed_names(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    job_id = keys.new_job_id()
    fill_run(store.local_run_dir(job_id))
    (tmp_path / "secret.txt").write_text("not an artifact")

    assert store.list_files(job_id) == ["checkpoints/last.pt", "export/model.onnx", "report.json"]
    assert store.read_bytes(job_id, "onnx") == b"onnx"  # a short name
    assert store.read_bytes(job_id, "export/model.onnx") == b"onnx"
    for bad in ("../../secret.txt", "/etc/passwd", "export/../report.json", "int8", "missing.txt"):
        with pytest.raises(ArtifactError):
            store.open(job_id, bad)
    with pytest.raises(NoSuchJobError):
        store.list_files("../..")
    uris = store.artifact_uris(job_id)
    assert uris["report"].endswith(f"jobs/{job_id}/run/report.json") and "int8" not in uris

    store.delete_job(job_id)
    assert store.list_files(job_id) == []
    assert (tmp_path / "secret.txt").exists()


def test_remote_store_syncs_changes_and_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINER_VAR_DIR", str(tmp_path / "var"))
    store = ArtifactStore(f"file://{tmp_path / 'bucket'}")
    assert not store.is_local and store.uri("x").startswith("file://")
    job_id = keys.new_job_id()
    local = store.local_run_dir(job_id)
    assert str(local).startswith(str(tmp_path / "var" / "cache"))
    fill_run(local)

    state: dict[str, tuple[int, int]] = {}
    assert store.sync_up(job_id, local, state) == 3
    assert store.sync_up(job_id, local, state) == 0  # nothing changed, nothing uploaded
    (local / "checkpoints" / "last.pt").write_bytes(b"ckpt-2-longer")
    assert store.sync_up(job_id, local, state) == 1
    assert store.read_bytes(job_id, "last_checkpoint") == b"ckpt-2-longer"
    assert store.list_files(job_id) == ["checkpoints/last.pt", "export/model.onnx", "report.json"]

    elsewhere = tmp_path / "other-machine"
    assert store.sync_down(job_id, elsewhere) == 3
    assert (elsewhere / "checkpoints" / "last.pt").read_bytes() == b"ckpt-2-longer"
    store.delete_job(job_id)
    assert store.list_files(job_id) == []


def test_dataset_upload_is_content_addressed_and_fetched_into_the_cache(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINER_VAR_DIR", str(tmp_path / "var"))
    folder = tmp_path / "data"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        (folder / name / "x.png").write_bytes(b"png-" + name.encode())
    os.symlink("/etc/passwd", folder / "a" / "link.png")  # a symlink must not smuggle a file into the upload

    store = ArtifactStore(f"file://{tmp_path / 'bucket'}")
    first = store.upload_dataset(folder)
    second = store.upload_dataset(folder)
    assert first["ref"] == second["ref"] and first["ref"].startswith("artifact:datasets/")
    local = store.fetch_dataset(first["ref"])
    assert local.parent == tmp_path / "var" / "cache" / "datasets"
    with zipfile.ZipFile(local) as zf:
        assert sorted(zf.namelist()) == ["data/a/x.png", "data/b/x.png"]
    for bad in ("artifact:../x.zip", "artifact:datasets/../../etc.zip", "datasets/abc.zip"):
        with pytest.raises(ArtifactError):
            store.fetch_dataset(bad)


def test_unwritable_store_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="not writable"):
        ArtifactStore(blocker / "store").check_writable()
