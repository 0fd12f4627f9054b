"""Constants of the data package, each with its unit. Change them here, nowhere else."""
from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""File suffixes (compared lower-cased) that imagefolder treats as images; every other file is ignored."""

SPLIT_FOLDER_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
"""Top-level folder names (compared lower-cased) that mark a pre-split imagefolder tree, mapped to our split names."""

ZIP_MAX_TOTAL_BYTES = 4 * 1024**3
"""Bytes: the most a dataset zip may expand to (sum of its entries' uncompressed sizes)."""

MAX_CLASSES = 10_000
"""Classes: the most an imagefolder dataset may have (the per-class report, the confusion pairs and the classifier
head grow with it; 10,000 covers ImageNet-1k and iNaturalist-scale sets)."""

ZIP_MAX_FILES = 200_000
"""Entries: the most a dataset zip may hold."""

CACHE_DIR_ENV = "DATA_CACHE_DIR"
"""Environment variable naming the folder where zips are extracted (one sub-folder per zip content hash)."""

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository root: default folders are resolved against it, not the working directory, so every command finds
the same ones (the worker's defaults too)."""

VAR_DIR = "var"
"""This machine's local state (caches; a worker's embedded Redis too), relative to REPO_ROOT."""

EXTRACTION_CACHE = "cache/extracted"
"""Where zips are extracted when DATA_CACHE_DIR is unset, relative to VAR_DIR: `python -m core.train` uses
REPO_ROOT/var/cache/extracted; a worker hands its training processes the same folder under its own var folder
(`worker.paths.extraction_cache_dir`, which follows TRAINER_VAR_DIR) as DATA_CACHE_DIR."""

EXTRACT_CACHE_GB_ENV = "EXTRACT_CACHE_GB"
"""Environment variable: the extraction cache's budget in GB (10**9 bytes); least recently used extractions that no
running job holds are removed to stay within it (core/data/cache_budget.py)."""

EXTRACT_CACHE_GB_DEFAULT = 40.0
"""GB: the extraction cache's budget when EXTRACT_CACHE_GB is unset (ten extractions of the largest zip allowed)."""

CIFAR_DEFAULT_ROOT = "data"
"""Folder holding cifar-10-batches-py/ or cifar-100-python/ when data.path is unset."""

IMAGEFOLDER_DEFAULT_SIZE = 224
"""Pixels: imagefolder input side when data.image_size is None and the images are not small."""

SMALL_IMAGE_SIDE = 64
"""Pixels: imagefolder images whose median shorter side is at most this keep their native side as input size."""

CENTER_CROP_MIN_SIZE = 96
"""Pixels: from this input side up, eval resizes the shorter side to side/CROP_RATIO and centre-crops (ImageNet style)."""

CROP_RATIO = 0.875
"""Fraction of the resized shorter side kept by the eval centre crop (224 / 256)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet per-channel statistics (RGB, pixels in [0, 1]): imagefolder and the pretrained fallback."""

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
"""The usual CIFAR training-set statistics (RGB, pixels in [0, 1])."""

STATS_MAX_IMAGES = 2048
"""Images: at most this many train images are read to compute mean/std (digits, synthetic, cifar in L mode)."""

SCAN_THREADS = 8
"""Threads that open and decode images while scanning a folder (Pillow releases the GIL while decoding)."""

THUMBNAIL_SIDE = 96
"""Pixels: longest side of the thumbnails inspect_dataset returns."""

IMBALANCE_WARNING_RATIO = 10.0
"""inspect_dataset warns when the largest class has more than this many times the images of the smallest."""

FEW_IMAGES_WARNING = 10
"""inspect_dataset warns about classes with fewer than this many readable images."""

# ----------------------------------------------------------------------------------------- prepared shards (issue 20)
SHARD_FORMAT = "webdataset-1"
"""The prepared form's format tag in its index.json: WebDataset tar shards (docs/benchmarks.md "Shard format")."""

SHARD_INDEX = "index.json"
"""File name of a prepared form's index (classes, per-sample labels/ids/splits, per-shard sha256); written last, so
its presence means the form is complete."""

SHARD_TARGET_BYTES = 64 * 2**20
"""Bytes: a shard is closed once it holds this much (a fetch is one request per shard; the reader holds a few)."""

SHUFFLE_WINDOW_SHARDS = 4
"""Shards whose samples are shuffled together per epoch (with the shard order shuffled too); the reader holds about
this many shards in memory, so a process's memory does not grow with the dataset."""

JPEG_QUALITY = 90
"""libjpeg quality of JPEG shards."""

RAW_MAX_FRACTION_OF_CACHE = 0.5
"""`encoding: auto` writes raw uint8 shards when they take at most this fraction of DATASET_CACHE_GB (a worker can
then keep the whole form on disk with room for another), else JPEG shards (about 6x smaller, decoded per epoch)."""

DATASET_CACHE_GB_ENV = "DATASET_CACHE_GB"
"""Environment variable: a worker's local shard cache budget in GB (10**9 bytes)."""

DATASET_CACHE_GB_DEFAULT = 20.0
"""GB: the shard cache budget when DATASET_CACHE_GB is unset."""

SHARD_CACHE = "cache/shards"
"""Where fetched shards are kept (one file per sha256), relative to VAR_DIR; DATASET_SHARD_DIR overrides it."""

SHARD_DIR_ENV = "DATASET_SHARD_DIR"
"""Environment variable naming the shard cache folder (a worker hands its training processes its own)."""

PREPARE_THREADS = 8
"""Threads decoding images while preparing (Pillow releases the GIL while decoding and resizing)."""

PREPARED_SPLIT_SEED = 0
"""The seed of a prepared form's stratified split when the folder is not pre-split: the split is a property of the
prepared form (every job on it trains and tests on the same images), not of each job's train.seed."""
