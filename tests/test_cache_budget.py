"""Byte budgets of this machine's dataset caches (core/data/cache_budget.py, worker/caches.py), on real folders with
real processes: the least recently used entry goes first, an entry a running process holds never goes, and `python -m
worker storage` / `gc` show and apply the budgets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.fixtures_worker import ROOT, run_cli

ENTRY = 120_000
"""Bytes of each test zip's images (stored, not compressed)."""

HOLDER = ("import sys\nfrom pathlib import Path\nfrom core.data.imagefolder import scan_imagefolder\n"
          "scan = scan_imagefolder(sys.argv[1], max_image_pixels=10**8, hold=True)\n"
          "print('holding', flush=True)\nsys.stdin.read()\n")
"""What a training process does with its data: scans it holding it, then trains (here: waits for its stdin to close)."""


def make_zip(path: Path, seed: int) -> Path:
    """A zip of two class folders of PNG images, ENTRY bytes in all, distinct per seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for cls in ("a", "b"):
            for i in range(3):
                img = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
                img.save(path.parent / "tmp.png")
                zf.write(path.parent / "tmp.png", f"{cls}/{i}.png")
        zf.writestr("a/pad.png", rng.bytes(ENTRY - sum(i.file_size for i in zf.infolist())))  # unreadable: skipped
    return path


def start_holder(data: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(data)], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # waits for the process to hold its data
    assert line.strip() == "holding", line + proc.stdout.read()
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


def test_extractions_keep_to_their_budget_lru_first_never_one_in_use(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from core.data import archive

    cache = tmp_path / "extracted"
    monkeypatch.setenv("DATA_CACHE_DIR", str(cache))
    monkeypatch.setenv("EXTRACT_CACHE_GB", str(2.6 * ENTRY / 1e9))  # room for two extractions
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    zips = [make_zip(tmp_path / f"{i}.zip", i) for i in range(4)]

    holder = start_holder(zips[0], env)  # a running job trains from zip 0: its extraction is in use
    try:
        held = archive.extraction_folder(zips[0])
        second = archive.extract_zip(zips[1])
        assert archive.extraction_bytes(held) == ENTRY and held.is_dir() and second.is_dir()
        os.utime(held, ns=(0, 0))  # zip 0's extraction is the least recently used, and still it stays:
        third = archive.extract_zip(zips[2])
        assert held.is_dir() and third.is_dir() and not second.exists()  # the LRU one not in use went
        assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in (held, third))
    finally:
        stop(holder)
    archive.extract_zip(zips[3])  # the job ended: now its extraction, the least recently used, goes
    assert not held.exists() and third.is_dir()
    assert sum(archive.extraction_bytes(p) for p in cache.iterdir()) <= 2.6 * ENTRY


def test_storage_shows_the_budgets_and_gc_trims_the_download_cache(job_env: dict[str, str], tmp_path: Path) -> None:
    downloads = Path(job_env["TRAINER_VAR_DIR"]) / "cache" / "datasets"
    downloads.mkdir(parents=True)
    entries = [make_zip(downloads / f"{i:064x}.zip", i) for i in range(4)]
    (downloads / f"{5:064x}.part123").write_bytes(b"\0" * ENTRY)  # a download in progress: never an entry
    now = time.time()
    for age, path in zip((400, 300, 200, 100), entries):
        os.utime(path, (now - age, now - age))
    env = {**job_env, "DOWNLOAD_CACHE_GB": str(2.5 * ENTRY / 1e9), "EXTRACT_CACHE_GB": "7"}

    out = run_cli(["worker", "storage", "--json"], env)
    assert out.returncode == 0, out.stderr
    caches = {c["cache"]: c for c in json.loads(out.stdout)["caches"]}
    assert caches["dataset cache"]["budget"] == int(2.5 * ENTRY) and caches["dataset cache"]["bytes"] >= 4 * ENTRY
    assert caches["dataset cache"]["budget_env"] == "DOWNLOAD_CACHE_GB"
    assert (caches["extracted datasets"]["budget"], caches["extracted datasets"]["budget_env"]) == \
        (7 * 10**9, "EXTRACT_CACHE_GB")
    assert caches["prepared shards"]["budget_env"] == "DATASET_CACHE_GB"
    text = run_cli(["worker", "storage"], env).stdout
    assert "(DOWNLOAD_CACHE_GB)" in text and "(EXTRACT_CACHE_GB)" in text

    holder = start_holder(entries[0], {**env, "DATA_CACHE_DIR": str(tmp_path / "x")})  # a job reads the oldest
    try:
        plan = json.loads(run_cli(["worker", "gc", "--dry-run", "--json"], env).stdout)
        cached = [r for r in plan["removed"] if r["what"] == "cache"]
        assert [Path(r["target"]).name for r in cached] == [entries[1].name, entries[2].name]
        assert "over its budget of" in cached[0]["reason"] and "DOWNLOAD_CACHE_GB" in cached[0]["reason"]
        assert all(p.exists() for p in entries)  # a dry run removes nothing
        out = run_cli(["worker", "gc"], env)
        assert out.returncode == 0, out.stderr
    finally:
        stop(holder)
    assert [p.exists() for p in entries] == [True, False, False, True]  # the held one stays, the newest stays
    assert (downloads / f"{5:064x}.part123").exists()
    assert not [p for p in downloads.iterdir() if p.name.startswith(".evicting")]


def test_a_bad_budget_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.data.cache_budget import budget_bytes
    from core.errors import DataError

    for bad in ("0", "-1", "lots", "inf"):
        monkeypatch.setenv("EXTRACT_CACHE_GB", bad)
        with pytest.raises(DataError, match=f"EXTRACT_CACHE_GB='{bad}' is not a positive number of GB"):
            budget_bytes("EXTRACT_CACHE_GB", 40)
