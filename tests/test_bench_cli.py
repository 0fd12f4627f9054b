"""The benchmark's command line (`python -m tests.bench`, tests/bench/): its options, and the table and JSON rows
(tests/gpu_check.sh reads them) of the one family that runs in seconds (memory: two cache sizes computed without
training); and the harness's promise that a broken section becomes its n/a rows instead of losing the others.
Only `--help` runs as `python -m tests.bench` (the entry point itself); the memory run calls the same `main` in this
process, which spares a second start-up of torch (~15 s here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.__main__ import SECTIONS, main
from tests.bench.harness import DOCS, Row, guard, table

ROOT = Path(__file__).resolve().parents[1]


def test_help_names_every_section() -> None:
    res = subprocess.run([sys.executable, "-m", "tests.bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    flat = "".join(res.stdout.split())  # argparse wraps the list anywhere
    for option in ("--quick", "--json", "--no-docs", "--only"):
        assert option in res.stdout
    assert "comma-separatedsections:" + ",".join(s.name for s in SECTIONS) in flat
    assert {"training", "streaming", "submit", "multinode", "dashboard", "sweep", "viewers", "inference", "digits",
            "transfer", "memory", "shards", "serving", "gpu"} == {s.name for s in SECTIONS}


def test_only_memory_prints_the_table_and_writes_json_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    docs_before = DOCS.read_text(encoding="utf-8")
    out = tmp_path / "rows.json"
    assert main(["--only", "memory", "--no-docs", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert lines[0] == "| # | benchmark | value | target | unit | met | note |"
    assert lines[2].startswith("| 1 | memory: tensor cache of 50,000 CIFAR-sized (3×32×32) images | 154 | ≤ 154 | MB |")
    assert lines[3].startswith("| 2 | memory: feature cache of 10,000 images × 8 views (Lite0) |")
    assert "2 rows in" in stdout and "targets missed: none" in stdout
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert [r["name"] for r in rows] == ["memory: tensor cache of 50,000 CIFAR-sized (3×32×32) images",
                                         "memory: feature cache of 10,000 images × 8 views (Lite0)"]
    for r in rows:
        assert set(r) == {"name", "value", "target", "unit", "higher_is_better", "note"}
        assert isinstance(r["value"], float) and r["unit"] == "MB" and r["higher_is_better"] is False
    assert rows[0]["target"] == 154.0 and rows[1]["target"] is None
    assert DOCS.read_text(encoding="utf-8") == docs_before


def test_a_failing_section_becomes_its_na_rows() -> None:
    def broken() -> list[Row]:
        raise RuntimeError("no redis here")

    fallback = (Row("sweep: overhead per trial", None, 50.0, "ms", False), Row("another row", None, None, "s"))
    rows = guard("sweep rows", broken, fallback)
    assert [(r.name, r.target, r.unit, r.higher_is_better) for r in rows] == \
        [(r.name, r.target, r.unit, r.higher_is_better) for r in fallback]
    assert all(r.value is None and r.note == "failed: RuntimeError: no redis here" for r in rows)
    assert rows[0].met is None and rows[0].record()["value"] is None
    shown = table(rows).splitlines()
    assert shown[2] == "| 1 | sweep: overhead per trial | n/a | ≤ 50 | ms | - | failed: RuntimeError: no redis here |"
