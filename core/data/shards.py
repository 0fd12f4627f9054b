"""The prepared form of an imagefolder dataset: WebDataset tar shards plus one index.json (README "Datasets").

Why WebDataset: plain POSIX tar files (readable by `tar`, by the `webdataset` library and by anything that reads
tar), one file per ~64 MB that the worker fetches, hashes, caches and evicts as a unit; it adds one small package
(docs/benchmarks.md "Shard format" has the measurement against LitData and MosaicML Streaming).

Layout under the form's URL (an artifact-store folder beside the dataset, or any fsspec URL):
- `index.json` (written last: present means complete): PreparedIndex below.
- `<split>-<nnnnn>.tar` per split (train, val, test): members `<jjjjjjj>.u8` (raw: the image as uint8 C×S×S bytes,
  channel-first so a batch needs no transpose) or `<jjjjjjj>.jpg` (JPEG of the S×S image), and `<jjjjjjj>.cls`
  (the label as ASCII digits), `jjjjjjj` the sample's position in its split.

Geometry: each image is stored at S×S with S the eval geometry's `resize_shorter` when the eval centre-crops (shorter
side to S, centre square): the eval image is then its centre `input_size` crop, exactly the PIL eval pipeline, and a
random crop has the context it needs; otherwise (small images) S is the input size itself (a straight resize).
Samples are written in a seeded random order per split, so every shard mixes the classes.
"""
from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from typing import Any

import numpy as np
from PIL import Image

from core.data.defaults import SHARD_FORMAT, SHARD_INDEX
from core.errors import DataError

ENCODINGS = ("raw", "jpeg")
"""How samples are stored: raw uint8 (no decoding per epoch) or JPEG (smaller, decoded per epoch)."""

_EXT = {"raw": "u8", "jpeg": "jpg"}


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One tar file of a split: its name beside index.json, content hash, size and the samples it holds."""

    name: str
    sha256: str
    bytes: int
    count: int
    first: int
    """Position (in its split) of the shard's first sample; samples are consecutive."""


@dataclasses.dataclass
class SplitShards:
    """One split of a prepared form, in stored order: labels and ids per position, and the shards holding them."""

    labels: list[int]
    ids: list[str]
    shards: list[ShardInfo]

    def __len__(self) -> int:
        return len(self.labels)

    def shard_of(self, position: int) -> int:
        """Index into `shards` of the shard holding `position`."""
        starts = [s.first for s in self.shards]
        return int(np.searchsorted(starts, position, side="right")) - 1


@dataclasses.dataclass
class PreparedIndex:
    """index.json: what a job needs to train from the shards without reading the source again."""

    encoding: str
    color_mode: str
    input_size: int
    stored_size: int
    """S: the stored images are S×S (see the module docstring)."""
    median_side: int
    """What build_datasets' crop rule needs of the source's median shorter side: larger than input_size exactly when
    the eval centre-crops."""
    classes: list[str]
    splits: dict[str, SplitShards]
    split_fractions: list[float]
    split_seed: int
    source: str
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    """seconds, images_per_sec, bytes, bytes_per_image of the prepare run."""
    format: str = SHARD_FORMAT

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    @property
    def sample_bytes(self) -> int:
        """Bytes of one raw sample (C × S × S)."""
        return self.channels * self.stored_size * self.stored_size

    @property
    def key(self) -> str:
        """The form's name among a dataset version's prepared forms: `<input size>-<colour mode>` (e.g. 224-RGB)."""
        return form_key(self.input_size, self.color_mode)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes, where: str = "index.json") -> PreparedIndex:
        try:
            data = json.loads(raw)
            if data.get("format") != SHARD_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {SHARD_FORMAT!r}")
            data["splits"] = {k: SplitShards(labels=v["labels"], ids=v["ids"],
                                             shards=[ShardInfo(**s) for s in v["shards"]])
                              for k, v in data["splits"].items()}
            return cls(**data)
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{where} is not a prepared-dataset index ({type(err).__name__}: {err})") from None


def form_key(input_size: int, color_mode: str) -> str:
    return f"{int(input_size)}-{color_mode}"


def open_fs(url: str) -> tuple[Any, str]:
    """(filesystem, path) of a URL or local path, as a fresh instance: fsspec's instance cache ignores the
    environment, where S3 endpoints and credentials come from (worker/datasets/sources.py does the same)."""
    import fsspec

    return fsspec.core.url_to_fs(url, skip_instance_cache=True)


def read_index(url: str) -> PreparedIndex:
    """The index.json of the form at `url` (a folder URL or path); DataError when missing or unreadable."""
    where = f"{url.rstrip('/')}/{SHARD_INDEX}"
    try:
        fs, path = open_fs(where)
        with fs.open(path, "rb") as fh:
            return PreparedIndex.from_json(fh.read(), where)
    except FileNotFoundError:
        raise DataError(f"no prepared dataset at {url} ({SHARD_INDEX} not found; prepare it with "
                        "python -m core.data.prepare)") from None
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 — fsspec back-ends raise their own
        raise DataError(f"cannot read {where}: {type(err).__name__}: {err}") from None


# ------------------------------------------------------------------------------------------------------ encoding
def encode_sample(img: Image.Image, encoding: str, quality: int) -> bytes:
    """The stored bytes of one S×S image in its final colour mode."""
    if encoding == "raw":
        arr = np.asarray(img, dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr).tobytes()
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_key(position: int) -> str:
    return f"{position:07d}"


def member_ext(encoding: str) -> str:
    return _EXT[encoding]


class LoadedShard:
    """One shard in memory: its bytes read once, samples addressed by tar member offsets (no per-sample parsing).

    Raw samples are numpy views into the shard's buffer, so a batch costs one copy (`gather`)."""

    def __init__(self, data: bytes | np.ndarray, info: ShardInfo, index: PreparedIndex) -> None:
        buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
        self.info, self.encoding = info, index.encoding
        self.shape = (index.channels, index.stored_size, index.stored_size)
        ext = "." + member_ext(index.encoding)
        spans: dict[int, tuple[int, int]] = {}
        with tarfile.open(fileobj=io.BytesIO(buf.data), mode="r:") as tf:  # headers only: data is sliced below
            for m in tf.getmembers():
                if m.name.endswith(ext):
                    spans[int(m.name[:-len(ext)])] = (m.offset_data, m.size)
        expected = range(info.first, info.first + info.count)
        if sorted(spans) != list(expected):
            raise DataError(f"shard {info.name} holds samples {min(spans, default=None)}..{max(spans, default=None)} "
                            f"({len(spans)}), the index says {info.first}..{info.first + info.count - 1}")
        self._buf = buf
        self._spans = [spans[p] for p in expected]

    def raw(self, position: int) -> np.ndarray:
        """Sample `position` (of its split) as uint8 C×S×S: a view for raw shards, a decode for JPEG ones."""
        off, size = self._spans[position - self.info.first]
        data = self._buf[off:off + size]
        if self.encoding == "raw":
            return data.reshape(self.shape)
        with Image.open(io.BytesIO(data.tobytes())) as img:
            arr = np.asarray(img.convert("L" if self.shape[0] == 1 else "RGB"), dtype=np.uint8)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def image(self, position: int) -> Image.Image:
        arr = self.raw(position)
        return Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
