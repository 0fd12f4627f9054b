"""Real image files and archives for the data tests: small, generated on the fly, deterministic."""
from __future__ import annotations

import io
import pickle
import stat
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
           ".tif": "TIFF", ".tiff": "TIFF"}


def noise_image(size: tuple[int, int] = (20, 16), mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels (so resizes and crops are visible in the numbers) in `mode`: RGB, RGBA, L or P."""
    w, h = size
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(rgb, mode="RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(np.random.default_rng(seed + 1).integers(0, 256, (h, w), dtype=np.uint8), mode="L")
        img = img.copy()
        img.putalpha(alpha)
        return img
    if mode == "P":
        pal = img.quantize(16)
        pal.info["transparency"] = 0
        return pal
    return img.convert(mode)


def write_image(path: Path, size: tuple[int, int] = (20, 16), mode: str = "RGB", seed: int = 0) -> Path:
    """Save a noise image; the format follows the suffix in any letter case."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = noise_image(size, mode, seed)
    fmt = FORMATS[path.suffix.lower()]
    if fmt in ("JPEG", "BMP") and img.mode in ("RGBA", "P"):
        img = img.convert("RGB")
    img.save(path, format=fmt)
    return path


def make_class_tree(root: Path, counts: dict[str, int], *, size: tuple[int, int] = (20, 16), suffix: str = ".png",
                    seed: int = 0) -> Path:
    """root/<class>/<class>_<i><suffix> for each class; returns root."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / name / f"{name}_{i:03d}{suffix}", size, seed=seed + 1000 * c + i)
    return root


def write_truncated_png(path: Path, size: tuple[int, int] = (20, 16)) -> Path:
    buf = io.BytesIO()
    noise_image(size).save(buf, format="PNG")
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_truncated_jpeg(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    buf = io.BytesIO()
    noise_image(size).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def zip_folder(folder: Path, zip_path: Path, *, prefix: str = "") -> Path:
    """Zip every file under `folder` (entries named prefix + relative path), like a user's "compress folder"."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, prefix + f.relative_to(folder).as_posix())
    return zip_path


def add_zip_entry(zip_path: Path, name: str, data: bytes, *, symlink: bool = False) -> None:
    """Append a raw entry (any name, optionally marked as a Unix symlink) that a normal zip tool would not make."""
    info = zipfile.ZipInfo(name)
    if symlink:
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(zip_path, "a") as zf:
        zf.writestr(info, data)


def png_bytes(size: tuple[int, int] = (20, 16), seed: int = 0) -> bytes:
    buf = io.BytesIO()
    noise_image(size, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def make_fake_cifar10(root: Path, *, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """root/cifar-10-batches-py/ in the official pickled format with tiny random batches; returns the arrays."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}

    def dump(name: str, n: int) -> None:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [i % 10 for i in range(n)]
        with (folder / name).open("wb") as fh:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]},
                        fh)
        arrays[name] = data

    for i in range(1, 6):
        dump(f"data_batch_{i}", per_batch)
    dump("test_batch", n_test)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, fh)
    return arrays


PHOTO_CLASSES = ("china_left", "china_right", "flower_left", "flower_right")
"""Classes of make_photo_tree: the left and right halves of scikit-learn's two packaged photos (427×640 JPEGs)."""


def make_photo_tree(root: Path, per_class: int, *, size: int = 256, seed: int = 0) -> Path:
    """root/<class>/<i>.jpg: photo-like images for transfer-learning tests and the benchmark, offline.

    Each image is a random crop (25-60 % of the half's shorter side, anywhere in that half) of one of
    scikit-learn's sample photos, resized to `size` px with a random brightness shift and JPEG-compressed: real
    photographic texture, four classes that share colours and content pairwise (two halves of one photo), so a
    linear head on ImageNet features does not reach 100 % at once.
    """
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg, flower.jpg as uint8 H×W×3
    rng = np.random.default_rng(seed)
    for c, name in enumerate(PHOTO_CLASSES):
        photo = photos[c // 2]
        h, w = photo.shape[:2]
        x0, x1 = (0, w // 2) if c % 2 == 0 else (w // 2, w)
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(rng.uniform(0.25, 0.6) * min(h, x1 - x0))
            top = int(rng.integers(0, h - side + 1))
            left = int(rng.integers(x0, x1 - side + 1))
            crop = photo[top:top + side, left:left + side].astype(np.float32) * rng.uniform(0.75, 1.25)
            img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
            img.save(root / name / f"{name}_{i:03d}.jpg", quality=90)
    return root
