"""The model card names the registered dataset version and content hash a job trained on (README "Datasets")."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fixtures_worker import make_imagefolder

ROOT = Path(__file__).resolve().parents[1]


def test_the_model_card_names_the_dataset_version(tmp_path: Path) -> None:
    folder = make_imagefolder(tmp_path / "shapes", per_class=16, size=12)
    # what a worker runs for a job on `shapes:3`: submission pinned data.dataset, data.path and the tags
    sets = ["data.dataset=shapes:3", f"data.path={folder}", "track.tags={dataset: 'shapes:3', dataset_hash: abc123}",
            "train.epochs=1", "data.image_size=12", "train.batch_size=8", "export.int8=false", "track.tensorboard=false"]
    res = subprocess.run([sys.executable, "-m", "core.train", "configs/digits.yaml", "--out", str(tmp_path / "run"),
                          *[a for s in sets for a in ("--set", s)]], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    card = (tmp_path / "run" / "export" / "model_card.md").read_text()
    assert "Registered dataset: `shapes:3` (content hash `abc123`)" in card
