"""The bad-input corpus: every case a user (or an attacker) can hand to submission, with the outcome it must get.

`python -m tests.corpus.make_cases OUT` writes one folder per case into OUT: `case.json` (name, kind, the regex
its message must match, or `accepted`), plus `dataset.zip` (dataset cases) or `config.yaml` (config cases). The
binary material is generated here rather than stored: it is small to describe and some of it (a 200,001-entry zip, a
PNG claiming 400 megapixels) is large or hostile to keep in git. tests/test_bad_inputs.py walks the cases through the
CLI (`python -m worker submit`) and the dashboard's upload/validation function.

A case is either refused (`expect`: a regex the message must match; nothing enqueued, nothing written) or accepted
(`accepted: true`, optionally `warning`: a regex one of the dataset report's warnings must match).
"""
from __future__ import annotations

import dataclasses
import io
import json
import stat
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

OK_BATCH = "train.batch_size=4"
"""Dataset cases train with a small batch, so that only what the case is about can refuse them."""


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str
    """`dataset` (a zip is built) or `config` (a YAML file is written; the dataset is digits)."""
    expect: str = ""
    """Regex the refusal message must match ("" for an accepted case)."""
    accepted: bool = False
    warning: str = ""
    """Accepted dataset cases: a regex one of the health report's warnings must match ("" for none required)."""
    classes: tuple[str, ...] = ()
    """Accepted dataset cases: the classes the report must list."""
    overrides: tuple[str, ...] = ()
    gpus: int = 1
    config: Any = None
    """Config cases: the YAML document (a dict, or a raw string written as-is)."""
    cli_only: bool = False
    """Only the CLI can be handed this (the dashboard's form never produces YAML text)."""

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in ("", (), None, False) or k == "name"}


# ----------------------------------------------------------------------------------------------------- material
def png(seed: int = 0, size: int = 12) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(seed: int = 0, size: int = 32) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bomb_png(side: int = 20_000) -> bytes:
    """A 200-byte PNG whose header claims side x side pixels (400 megapixels by default): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def good_entries(classes: tuple[str, ...] = ("a", "b"), per_class: int = 6, prefix: str = "ds/") -> dict[str, bytes]:
    return {f"{prefix}{c}/{i:02d}.png": png(seed=100 * k + i) for k, c in enumerate(classes) for i in range(per_class)}


def write_zip(path: Path, entries: dict[str, bytes], *, dirs: tuple[str, ...] = (),
              symlinks: dict[str, str] | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for d in dirs:
            zf.writestr(zipfile.ZipInfo(d if d.endswith("/") else d + "/"), b"")
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)


def declared_size_bomb(path: Path) -> None:
    """A small zip whose central directory declares ~8.6 GB of content (two entries of 4,294,967,280 bytes each):
    refused from the declared sizes, before a byte is inflated."""
    write_zip(path, {**good_entries(), "ds/a/big1.png": b"x", "ds/b/big2.png": b"y"})
    data = bytearray(path.read_bytes())
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) >= 0:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        name = bytes(data[pos + 46:pos + 46 + name_len])
        if name.endswith((b"big1.png", b"big2.png")):
            struct.pack_into("<I", data, pos + 24, 0xFFFFFFF0)  # uncompressed size
        pos += 46
    path.write_bytes(bytes(data))


def file_count_bomb(path: Path, n: int = 200_001) -> None:
    """n empty entries (one more than core.data's ZIP_MAX_FILES): refused from the entry count alone."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in good_entries().items():
            zf.writestr(name, data)
        for i in range(n):
            zf.writestr(zipfile.ZipInfo(f"ds/a/{i}.txt"), b"")


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


DatasetBuilder = Callable[[Path], None]

DATASETS: dict[str, DatasetBuilder] = {
    "zip_slip": lambda p: write_zip(p, {**good_entries(), "ds/a/../../../evil-corpus.png": png()}),
    "zip_slip_top": lambda p: write_zip(p, {**good_entries(), "../evil-corpus.png": png()}),
    "absolute_path": lambda p: write_zip(p, {**good_entries(), "/tmp/evil-corpus.png": png()}),
    "symlink": lambda p: write_zip(p, good_entries(), symlinks={"ds/a/link.png": "/etc/passwd"}),
    "zip_bomb_size": declared_size_bomb,
    "zip_bomb_count": file_count_bomb,
    "bomb_image_only": lambda p: write_zip(p, {**good_entries(("a",)), "ds/b/huge.png": bomb_png()}),
    "bomb_image_mixed": lambda p: write_zip(p, {**good_entries(), "ds/a/huge.png": bomb_png()}),
    "non_image_only": lambda p: write_zip(p, {**good_entries(("a",)), "ds/b/notes.txt": b"hello",
                                              "ds/b/labels.csv": b"a,b\n", "ds/b/script.py": b"print(1)"}),
    "truncated_only": lambda p: write_zip(p, {**good_entries(("a",)), "ds/b/1.png": truncated(png(1)),
                                              "ds/b/2.jpg": truncated(jpeg(2, 64))}),
    "truncated_mixed": lambda p: write_zip(p, {**good_entries(), "ds/b/broken.png": truncated(png(3))}),
    "zero_byte_only": lambda p: write_zip(p, {**good_entries(("a",)), "ds/b/1.png": b"", "ds/b/2.jpg": b""}),
    "zero_byte_mixed": lambda p: write_zip(p, {**good_entries(), "ds/a/empty.png": b""}),
    "empty_class_folder": lambda p: write_zip(p, good_entries(("a", "b")), dirs=("ds/c/",)),
    "single_class": lambda p: write_zip(p, good_entries(("only",))),
    "no_class_at_all": lambda p: write_zip(p, {"readme.txt": b"nothing here"}),
    "not_a_zip": lambda p: p.write_bytes(b"this is a text file with a .zip name\n" * 10),
    "encrypted_entry": lambda p: _encrypted(p),
    "spaces_and_unicode_names": lambda p: write_zip(p, good_entries(("red apple", "Äpfel grün", "猫 ねこ"))),
    "batch_larger_than_dataset": lambda p: write_zip(p, good_entries(per_class=3)),
}


def _encrypted(path: Path) -> None:
    """A zip whose entry has the 'encrypted' flag set (what `zip -e` makes)."""
    write_zip(path, good_entries())
    data = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = data.find(sig)
        flags = struct.unpack_from("<H", data, pos + off)[0]
        struct.pack_into("<H", data, pos + off, flags | 0x1)
    path.write_bytes(bytes(data))


CASES: list[Case] = [
    # ------------------------------------------------------------------------------------------ unsafe archives
    Case("zip_slip", "dataset", expect=r"contains '\.\.'; refusing to extract"),
    Case("zip_slip_top", "dataset", expect=r"contains '\.\.'; refusing to extract"),
    Case("absolute_path", "dataset", expect=r"has an absolute path; refusing to extract"),
    Case("symlink", "dataset", expect=r"is a symbolic link; refusing to extract"),
    Case("zip_bomb_size", "dataset", expect=r"expands to \d+ bytes, more than the limit of \d+ bytes"),
    Case("zip_bomb_count", "dataset", expect=r"has 200013 entries, more than the limit of 200000"),
    Case("encrypted_entry", "dataset", expect=r"is encrypted; re-create the zip without a password"),
    Case("not_a_zip", "dataset", expect=r"not a (readable zip file|\.zip archive)"),
    # -------------------------------------------------------------------------------------------- bad contents
    Case("bomb_image_only", "dataset",
         expect=r"class 'b' has no readable image .*(more than data\.max_image_pixels|decompression-bomb guard)"),
    Case("bomb_image_mixed", "dataset", accepted=True, warning=r"1 image file\(s\) could not be used",
         classes=("a", "b")),
    Case("non_image_only", "dataset", expect=r"class 'b' has no readable image \(its folder holds no image files\)"),
    Case("truncated_only", "dataset", expect=r"class 'b' has no readable image .*unreadable image"),
    Case("truncated_mixed", "dataset", accepted=True, warning=r"1 image file\(s\) could not be used",
         classes=("a", "b")),
    Case("zero_byte_only", "dataset", expect=r"class 'b' has no readable image .*empty file \(0 bytes\)"),
    Case("zero_byte_mixed", "dataset", accepted=True, warning=r"could not be used", classes=("a", "b")),
    Case("empty_class_folder", "dataset",
         expect=r"class 'c' has no readable image \(its folder holds no image files\)"),
    Case("single_class", "dataset", expect=r"found 1 class folder \(only\); need at least two folders of images"),
    Case("no_class_at_all", "dataset", expect=r"found 0 class folders; need at least two folders of images"),
    Case("spaces_and_unicode_names", "dataset", accepted=True, classes=("red apple", "Äpfel grün", "猫 ねこ")),
    Case("batch_larger_than_dataset", "dataset", overrides=("train.batch_size=64",),
         expect=r"train\.batch_size: 64 is larger than the train split \(about \d+ images"),
    # ------------------------------------------------------------------------------------------------- configs
    Case("unknown_key", "config", config={"train": {"epochs": 1, "epoch": 3}},
         expect=r"train\.epoch: unknown key"),
    Case("unknown_section", "config", config={"trian": {"epochs": 1}}, expect=r"trian: unknown key"),
    Case("wrong_type_epochs", "config", config={"train": {"epochs": "ten"}},
         expect=r"train\.epochs: .*integer.*'ten'"),
    Case("wrong_type_lr", "config", config={"optim": {"lr": "fast"}}, expect=r"optim\.lr: .*number.*'fast'"),
    Case("wrong_type_section", "config", config={"train": 5}, expect=r"train: .*(dictionary|mapping|object)"),
    Case("zero_lr", "config", config={"optim": {"lr": 0}}, expect=r"optim\.lr: .*greater than 0"),
    Case("negative_lr", "config", config={"optim": {"lr": -0.01}}, expect=r"optim\.lr: .*greater than 0"),
    Case("zero_epochs", "config", config={"train": {"epochs": 0}}, expect=r"train\.epochs: .*greater than or equal"),
    Case("negative_epochs", "config", config={"train": {"epochs": -3}},
         expect=r"train\.epochs: .*greater than or equal"),
    Case("batch_larger_than_digits", "config", config={"train": {"batch_size": 4096}},
         expect=r"train\.batch_size: 4096 is larger than the train split \(about 1258 images"),
    Case("batch_larger_than_synthetic_per_rank", "config", gpus=2,
         config={"data": {"name": "synthetic", "synthetic_size": 100}, "train": {"batch_size": 64}},
         expect=r"train\.batch_size: 64 is larger than the train split \(about 70 images over 2 ranks, 35 per rank"),
    Case("unknown_model", "config", config={"model": {"name": "resnet9000"}},
         expect=r"model\.name: unknown model 'resnet9000'; choose from .*simple_cnn"),
    Case("unknown_dataset", "config", config={"data": {"name": "imagenet"}},
         expect=r"data\.name: .*'digits'.*'imagenet'"),
    Case("too_many_gpus", "config", config={"train": {"epochs": 1}}, gpus=4,
         expect=r"gpus: no live worker can run 4 device\(s\); the largest has 2"),
    Case("gpus_out_of_range", "config", config={"train": {"epochs": 1}}, gpus=0,
         expect=r"gpus: must be a whole number from 1 to 16"),
    Case("not_a_mapping", "config", config="- just\n- a list\n", expect=r"top level must be a mapping"),
    Case("invalid_yaml", "config", config="train: [1, 2\n", expect=r"is not valid YAML", cli_only=True),
    Case("frozen_random_backbone", "config", config={"model": {"freeze": "backbone"}},
         expect=r"model\.freeze: 'backbone' needs model\.pretrained: true"),
    Case("bad_split", "config", config={"data": {"split": [0.5, 0.5, 0.5]}},
         expect=r"data\.split: .*summing to 1"),
]
"""Every case, in the order the test walks them."""


def digits_preset() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    return yaml.safe_load((root / "configs" / "digits.yaml").read_text(encoding="utf-8"))


def config_document(case: Case) -> Any:
    """The YAML document of a config case: the digits preset with the case's sections merged in (a raw string as
    it is)."""
    if isinstance(case.config, str):
        return case.config
    doc = digits_preset()
    doc["train"]["epochs"] = 1
    for section, values in (case.config or {}).items():
        if isinstance(values, dict) and isinstance(doc.get(section), dict):
            doc[section] = {**doc[section], **values}
        else:
            doc[section] = values
    return doc


def materialise(case: Case, folder: Path) -> Path:
    """Write the case into `folder` (case.json plus dataset.zip or config.yaml); returns the material's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "case.json").write_text(json.dumps(case.describe(), indent=2, ensure_ascii=False), encoding="utf-8")
    if case.kind == "dataset":
        path = folder / "dataset.zip"
        DATASETS[case.name](path)
        return path
    path = folder / "config.yaml"
    doc = config_document(case)
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False, allow_unicode=True),
                    encoding="utf-8")
    return path


def make_all(out: Path) -> dict[str, Path]:
    return {case.name: materialise(case, out / case.name) for case in CASES}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.corpus.make_cases OUT_DIR")
    for name, path in make_all(Path(sys.argv[1])).items():
        print(f"{name:<38} {path}")
