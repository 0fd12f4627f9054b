"""A registered model version loaded for serving: its ONNX Runtime session, labels and preprocessing.

The session reads the version's recommended file (`ModelVersion.deploy`) from the artifact store, with the CUDA (and
TensorRT, where present) execution providers when the machine has them, else the CPU.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import numpy as np

from core.images import ImageRejected, open_image
from core.predict_template import preprocess_image, top_labels
from worker.artifacts import ArtifactStore
from worker.models import ModelVersion

ACCELERATED = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
"""Execution providers preferred over the CPU when ONNX Runtime has them (in this order)."""


class BadInput(ValueError):
    """A request the model cannot take (wrong shape or datatype, not an image, too big); the message says why."""


def providers(use_gpu: bool) -> list[str]:
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    chosen = [p for p in ACCELERATED if use_gpu and p in have]
    if use_gpu and not chosen:  # said in the server's log (a deployment's: var/deployments/ID-REPLICA.log)
        print(f"warning: --gpu, but this ONNX Runtime ({ort.__version__}) has neither the CUDA nor the TensorRT "
              "execution provider (the onnxruntime-gpu package has them): serving on the CPU", file=sys.stderr,
              flush=True)
    return [*chosen, "CPUExecutionProvider"]


@dataclasses.dataclass
class LoadedModel:
    version: ModelVersion
    session: Any
    input_name: str
    output_name: str
    input_shape: tuple[int, int, int]
    """C, H, W of one sample."""

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def labels(self) -> list[str]:
        return self.version.labels

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits of an N×C×H×W float32 batch."""
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def check_input(self, x: np.ndarray) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise BadInput(f"input shape {list(x.shape)} does not match the model's [-1, "
                           f"{', '.join(map(str, self.input_shape))}] (preprocess.json: input_size, color_mode)")

    def image_tensor(self, data: bytes, filename: str, max_pixels: int) -> np.ndarray:
        """One uploaded image as the model's C×H×W input (predict.py's preprocessing, decoded as Try it decodes:
        core.images.open_image); BadInput naming the file when unusable."""
        try:
            img = open_image(data, max_pixels=max_pixels, preprocess=self.version.preprocess)
        except ImageRejected as err:
            raise BadInput(f"{filename}: {err}") from None
        return preprocess_image(img, self.version.preprocess)

    def top_k(self, logits: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        return top_labels(logits, self.labels, k)


def session_options(instances: int = 1) -> Any:
    """ONNX Runtime's options for a served model run by `instances` threads at once: `intra_op_threads(instances)`
    threads per run, which sleep between runs instead of spinning.

    Spinning (ORT's default) keeps every core busy-waiting after each run; in a server those cores are the ones the
    HTTP side needs to parse the next requests, and on a shared machine they are other programs' too. Measured on
    2 loaded cores with ResNet-18 at 16 px (FP32, batch 1): 23.7 ms per run spinning, 11.8 ms not (docs/benchmarks.md
    "Serving")."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads = intra_op_threads(instances)
    return opts


def usable_cores() -> int:
    """Physical cores this process may run on."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(psutil.cpu_count(logical=False) or usable, usable))


def instances(use_gpu: bool) -> int:
    """Model runs a server lets happen at once (`serve --instances`, default): Triton's instance count.

    On the CPU two, when there are two cores or more: two single-thread runs of ResNet-18 at 16 px used the 2 cores
    of this project's machine far better than one run with both (458 against 400 samples/s at batch 16, 267 against
    194 at batch 1; one single-thread run: 233 and 141; docs/benchmarks.md "Serving"), and a second run keeps a core
    busy while the first one's batch is answered. On a GPU one: the device runs one batch at a time."""
    return 1 if use_gpu or usable_cores() < 2 else 2


def intra_op_threads(instances: int = 1) -> int:
    """ONNX Runtime threads of each of `instances` concurrent runs: the cores this process may use, less one that the
    HTTP side keeps to parse the next requests, shared out (at least one each). Measured on 2 loaded cores at 32
    clients, ResNet-18 16 px FP32 with batching, one run at a time: 157 vs 111 requests/s with ORT's default of one
    thread per core (docs/benchmarks.md "Serving")."""
    return max(1, (usable_cores() - 1) // max(1, instances))


def load(version: ModelVersion, store: ArtifactStore, *, use_gpu: bool = False, instances: int = 1) -> LoadedModel:
    """The version's session, for `instances` runs at once (ONNX Runtime's `run` may be called from several threads)."""
    import onnxruntime as ort

    session = ort.InferenceSession(store.read_key(version.key(version.deploy)),
                                   sess_options=session_options(instances),
                                   providers=providers(use_gpu))
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    channels = 1 if version.preprocess.get("color_mode") == "L" else 3
    h, w = version.preprocess["input_size"]
    return LoadedModel(version, session, inp.name, out.name, (channels, int(h), int(w)))
