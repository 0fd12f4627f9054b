"""Bigger than the 2 GiB upload cap (issue 20): a generated photo dataset of more than 2 GB registered in place
(`file://`, nothing copied through the submitting process) and trained to the end by a real worker from prepared
shards. Slow (minutes) and disk-hungry: skipped when the disk has less than three times the dataset free."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.fixtures_worker import DIGITS, explain_job
from worker import api, datasets
from worker.artifacts import upload_max_bytes
from worker.submit import submit_job

TARGET_BYTES = int(2.2e9)
"""Bytes of JPEGs to write: more than UPLOAD_MAX_BYTES' default of 2 GiB (2.147e9)."""


def _write_photos(root: Path, target_bytes: int, classes: int = 4) -> tuple[int, int]:
    """Noisy 640×480 JPEGs (≈ 200 KB each, incompressible like a sensor's noise) until `target_bytes` are written."""
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(8)]
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)

    def one(i: int) -> int:
        arr = np.roll(tiles[i % len(tiles)], i * 7, axis=1)
        arr[..., i % classes % 3] |= 0xC0  # a class colour a model can learn
        path = root / f"class{i % classes}" / f"{i:06d}.jpg"
        Image.fromarray(arr).save(path, quality=95)
        return path.stat().st_size

    written, n = 0, 0
    with ThreadPoolExecutor(4) as pool:
        while written < target_bytes:
            sizes = list(pool.map(one, range(n, n + 256)))
            written += sum(sizes)
            n += len(sizes)
    return n, written


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_a_dataset_over_the_upload_cap_registered_in_place_trains_to_the_end(
        redis_conn: Any, job_env: dict[str, str], tmp_path: Path, spawn: Any) -> None:
    free = shutil.disk_usage(tmp_path).free
    if free < 3 * TARGET_BYTES:
        pytest.skip(f"needs {3 * TARGET_BYTES / 1e9:.1f} GB free in {tmp_path}, has {free / 1e9:.1f} GB")
    root = tmp_path / "big"
    try:
        n, written = _write_photos(root, TARGET_BYTES)
        assert written > 2 * 2**30 >= upload_max_bytes()  # beyond what an upload may be
        version = datasets.register(redis_conn, "big", f"file://{root}").version
        assert version.kind == "in_place" and version.num_images == n and version.bytes == written
        job = submit_job(DIGITS, ["data.dataset=big", "data.color_mode=RGB", "data.image_size=32", "data.cache=off",
                                  "train.epochs=1", "train.batch_size=128", "export.enabled=false",
                                  "track.tensorboard=false"], connection=redis_conn).job_id
        worker = spawn.python(["worker", "run", "--cpu", "--slots", "1", "--burst"], job_env, name="worker")
        assert worker.wait(timeout=2900) == 0, spawn.output(worker)
        st = api.job_status(redis_conn, job)
        assert st["state"] == "finished", explain_job(redis_conn, job, spawn)()
        report = json.loads(api.read_artifact(job, "report"))
        assert report["data_path"] == "shards" and report["epochs_completed"] == 1
        assert sum(report["data"]["counts"].values()) == n
        form = datasets.prepared_forms(redis_conn, "big", 1)[0]
        assert form["images"] == n and form["encoding"] == "raw"
    finally:
        shutil.rmtree(root, ignore_errors=True)
