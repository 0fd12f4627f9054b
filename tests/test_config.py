"""The config schema: presets load, --set overrides, and every bad value fails early with key, value and allowed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.config import config_from_dict, load_config
from core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_starts_with_a_measured_comment(preset: Path) -> None:
    cfg = load_config(preset)
    assert cfg.train.epochs >= 1
    assert preset.read_text().startswith("#"), "each preset starts with a comment giving expected accuracy and time"


def test_set_overrides_parse_yaml_scalars_and_lists() -> None:
    cfg = load_config(ROOT / "configs/digits.yaml",
                      ["train.epochs=3", "optim.lr=1e-2", "train.amp=true", "data.split=[0.8,0.1,0.1]"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == pytest.approx(0.01) and cfg.train.amp is True
    assert cfg.data.split == [0.8, 0.1, 0.1]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.epocs=3"], "train.epocs: unknown key"),
        (["bogus.x=1"], "bogus: unknown key"),
        (["train.epochs=abc"], "train.epochs"),
        (["train.epochs=0"], "train.epochs"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=-0.1"], "optim.lr"),
        (["data.split=[0.5,0.2,0.2]"], "data.split"),
        (["data.augment=heavy"], "data.augment"),
        (["optim.name=adam"], "optim.name"),
        (["data.name=mnist"], "data.name"),
        (["model.name=vgg99"], "unknown model 'vgg99'; choose from"),
        (["data.name=imagefolder"], "data.path: required"),
        (["model.freeze=backbone"], "model.freeze"),
        (["train.batch_size=0"], "train.batch_size"),
    ],
)
def test_bad_values_name_the_key_and_value(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(ROOT / "configs/digits.yaml", overrides)
    assert expected in str(exc.value)


def test_unknown_model_lists_known_models() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"model": {"name": "nope"}})
    for known in ("simple_cnn", "dsconv_cnn", "resnet18", "efficientnet_lite0"):
        assert known in str(exc.value)


def test_cli_bad_config_exits_2_before_touching_data(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "core.train", str(ROOT / "configs/digits.yaml"), "--out", str(out),
         "--set", "optim.lr=-1"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "optim.lr" in proc.stderr and "-1" in proc.stderr
    assert not out.exists(), "a bad config must not create the run folder"


def test_cli_missing_config_file_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "core.train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr
