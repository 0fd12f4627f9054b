"""A full disk loses nothing: a write that runs out of space fails with the system's reason, leaves no partial file
behind, and keeps the previous good file (checkpoints, run-folder JSON, the artifact store, a dataset upload).

The disk is real: a small tmpfs mounted by the test (root only; skipped elsewhere, a failure in CI) and unmounted at
the end, passed or failed.
"""
from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core import runfolder
from tests.fixtures_worker import make_imagefolder, run_cli
from worker.artifacts import ArtifactStore

DISK_KB = 256


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A DISK_KB tmpfs at tmp_path/disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_KB}k", "tmpfs", str(mount)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"a tmpfs is required in CI: {res.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name or ".part" in p.name]


def test_checkpoint_and_json_writes_keep_the_previous_file(small_disk: Path) -> None:
    ckpt, report = small_disk / "last.pt", small_disk / "report.json"
    runfolder.atomic_torch_save({"epoch": 1, "w": torch.ones(1000)}, ckpt)
    runfolder.write_json(report, {"epochs_completed": 1})
    with pytest.raises(OSError) as err:
        runfolder.atomic_torch_save({"epoch": 2, "w": torch.ones(200_000)}, ckpt)  # 800 kB > the disk
    assert err.value.errno == errno.ENOSPC or "No space left" in str(err.value)
    with pytest.raises(OSError):
        runfolder.write_json(report, {"epochs_completed": 2, "pad": "x" * (DISK_KB * 1024)})
    assert runfolder.load_checkpoint(ckpt)["epoch"] == 1
    assert runfolder.read_json(report) == {"epochs_completed": 1}
    assert leftovers(small_disk) == []


def test_the_artifact_store_keeps_no_torn_file(small_disk: Path, tmp_path: Path) -> None:
    store = ArtifactStore(str(small_disk / "store"))
    good, big = tmp_path / "good.bin", tmp_path / "big.bin"
    good.write_bytes(b"g" * 10_000)
    big.write_bytes(b"b" * (DISK_KB * 2 * 1024))
    store.put_file(good, "runs/x/report.json")
    with pytest.raises(OSError):
        store.put_file(big, "runs/x/report.json")
    assert Path(store.path("runs/x/report.json")).read_bytes() == good.read_bytes()
    assert leftovers(small_disk) == []


def test_a_dataset_upload_onto_a_full_store_registers_nothing(small_disk: Path, redis_conn: Any,
                                                              job_env: dict[str, str], tmp_path: Path) -> None:
    env = {**job_env, "ARTIFACTS_DIR": str(small_disk / "store"), "DISK_MIN_FREE_GB": "0"}  # the write itself fails
    big = make_imagefolder(tmp_path / "big", ("a", "b"), per_class=40, size=96)
    res = run_cli(["worker", "dataset", "add", "photos", str(big)], env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "No space left" in res.stderr and "Traceback" not in res.stderr
    assert run_cli(["worker", "dataset", "list", "--json"], env).stdout.strip() == "[]"
    assert leftovers(small_disk) == []
    small = make_imagefolder(tmp_path / "small", ("a", "b"), per_class=4, size=8)
    res = run_cli(["worker", "dataset", "add", "photos", str(small)], env)
    assert res.returncode == 0 and res.stdout.split()[-1] == "photos:1", res.stderr
