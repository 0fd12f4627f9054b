"""A refused upload leaves nothing on disk: neither the zip nor its extraction (the dashboard's check and the CLI's
`dataset add`), while an accepted one keeps its extraction for training."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_worker import make_imagefolder, run_cli


def zipped(folder: Path) -> Path:
    return Path(shutil.make_archive(str(folder), "zip", folder.parent, folder.name))


def extractions(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def test_a_refused_zip_leaves_no_extraction(redis_conn: Any, job_env: dict[str, str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "extracted"
    env = {**job_env, "DATA_CACHE_DIR": str(cache)}
    monkeypatch.setenv("DATA_CACHE_DIR", str(cache))
    one_class = zipped(make_imagefolder(tmp_path / "one", ("only",)))
    res = run_cli(["worker", "dataset", "add", "one", str(one_class)], env)
    assert res.returncode == 2 and "found 1 class folder" in res.stderr, res.stderr
    assert extractions(cache) == []

    from app.upload import UploadError, check_upload, uploads_dir

    with pytest.raises(UploadError, match="found 1 class folder"):
        check_upload(one_class.read_bytes())
    assert extractions(cache) == [] and not list(uploads_dir().glob("*.zip"))

    good = check_upload(zipped(make_imagefolder(tmp_path / "good")).read_bytes())
    assert good.path.is_file() and len(extractions(cache)) == 1  # kept: the job will train from it
