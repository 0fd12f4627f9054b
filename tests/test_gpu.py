"""CUDA code paths, run only on a machine with a GPU: `python -m pytest -m gpu` (tests/gpu_check.sh runs them with
the GPU benchmark rows). Without CUDA every test here is skipped; none of them has run on this project's CPU machines.

- digits on CUDA with `train.amp` in bf16 and in fp16 + GradScaler (fp16 is forced by reporting bf16 unsupported);
- the tensor cache held on the device; the feature cache held on the device;
- the batch augmentation on the GPU (one gather, tensor clamps) equal to the CPU's (slice copies, per-channel clamps);
- the shard loader feeding a GPU (pinned batches, augmentation on the device) equal to its CPU path; a job on CUDA
  from prepared shards;
- a worker started with `--gpus 0` running a job end to end;
- ONNX export of a CUDA-trained model: parity checked on the CPU (ONNX Runtime) against the PyTorch model;
- TensorRT timing where TensorRT is installed (skipped otherwise, with the export's own reason).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from core.config import config_from_dict, load_config
from core.events import read_jsonl
from tests.fixtures_images import make_photo_tree
from tests.fixtures_worker import DIGITS, explain_job, wait_for

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (python -m pytest -m gpu)")]

CUDA = ["train.device=cuda", "train.epochs=4", "export.enabled=false"]
"""Every run here trains on the GPU; digits reaches ≥ 0.9 test accuracy in 4 epochs (≥ 0.95 in 6 on CPU)."""


def _start(run: Path) -> dict[str, Any]:
    return next(r["data"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "start")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_digits_on_cuda_with_amp(precision: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.train import train

    if precision == "fp16":  # the path of GPUs without bf16 (V100, T4): fp16 autocast + GradScaler
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    elif not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    report = train(load_config(DIGITS, [*CUDA, "train.amp=true"]), tmp_path / "run")
    assert report["device"].startswith("cuda") and report["amp"] == precision, (report["device"], report["amp"])
    assert report["test"]["accuracy"] >= 0.9, report["test"]["accuracy"]
    ckpt = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert (ckpt["scaler"] is not None) == (precision == "fp16")  # the GradScaler state is checkpointed


def test_tensor_cache_lives_on_the_device(tmp_path: Path) -> None:
    from core import distributed as D
    from core.data import build_datasets
    from core.train import make_loaders, train

    cfg = load_config(DIGITS, [*CUDA, "data.cache=on"])
    loaders = make_loaders(cfg, build_datasets(cfg), D.DistInfo(), torch.device("cuda", 0))
    assert loaders.kind == "tensor_cache"
    x, y = next(iter(loaders.train))
    assert loaders.train.images.device.type == "cuda" and x.device.type == "cuda" and y.device.type == "cuda"
    report = train(cfg, tmp_path / "run")
    assert _start(tmp_path / "run")["data_path"] == "tensor_cache" and report["test"]["accuracy"] >= 0.9


@pytest.mark.parametrize("brightness_first", [True, False])
def test_batch_augmentation_on_the_gpu_equals_the_cpus(brightness_first: bool) -> None:
    """The same uint8 batch and drawn parameters give the same floats on both devices (core/data/fast.py: the CPU
    crops by slice copies and clamps per channel, the GPU by one gather and tensor bounds)."""
    from core.data.fast import classic_augment, draw_classic_params

    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (32, 3, 72, 64), dtype=torch.uint8, generator=gen)[:, :, 4:68]  # strided, like shards
    params = draw_classic_params(len(x), gen, pad=8, hflip=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    cpu = classic_augment(x, gen, pad=8, hflip=True, params=params, brightness_first=brightness_first,
                          normalize=(mean, std))
    cuda = classic_augment(x.cuda(), gen, pad=8, hflip=True, params={k: v.cuda() for k, v in params.items()},
                           brightness_first=brightness_first, normalize=(mean.cuda(), std.cuda()))
    assert torch.allclose(cuda.cpu(), cpu, atol=1e-5), (cuda.cpu() - cpu).abs().max()


SHARD_DATA = {"name": "imagefolder", "image_size": 64, "cache": "off", "augment": "classic"}
"""A prepared form of 64 px read from its shards (the tensor cache turned off: it would hold these few images)."""


def _shard_epoch(form: Path, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One augmented train epoch of the shard loader on `device`, batches brought back to the CPU."""
    from core import distributed as D
    from core.data import build_datasets
    from core.train import make_loaders

    cfg = config_from_dict({"data": {**SHARD_DATA, "prepared": str(form)}, "train": {"batch_size": 8, "seed": 3}})
    loaders = make_loaders(cfg, build_datasets(cfg), D.DistInfo(), device)
    assert loaders.kind == "shards", loaders.kind
    batches = []
    for x, y in loaders.train:
        assert x.device.type == device.type and y.device.type == device.type
        batches.append((x.cpu(), y.cpu()))
    return batches


def test_shard_batches_are_augmented_on_the_gpu_as_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """The shard loader's path to a GPU (pinned uint8 batches, a non-blocking copy, the augmentation on the device)
    gives the batches the CPU's path gives, in the same order; then a job trains from the shards on CUDA."""
    from core.data.prepare import prepare
    from core.train import train
    from tests.fixtures_images import make_class_tree

    monkeypatch.setenv("DATASET_SHARD_DIR", str(tmp_path / "cache"))
    folder = make_class_tree(tmp_path / "photos", {"ant": 20, "bee": 20}, size=(80, 64), suffix=".jpg")
    prepare(str(folder), str(tmp_path / "form"), size=64, encoding="raw", shard_bytes=40_000)
    cpu, cuda = _shard_epoch(tmp_path / "form", torch.device("cpu")), _shard_epoch(tmp_path / "form",
                                                                                  torch.device("cuda", 0))
    assert len(cpu) == len(cuda) > 1
    for (xc, yc), (xg, yg) in zip(cpu, cuda, strict=True):
        assert torch.equal(yc, yg) and torch.allclose(xc, xg, atol=1e-5), (xc - xg).abs().max()
    cfg = config_from_dict({"data": {**SHARD_DATA, "prepared": str(tmp_path / "form")}, "model": {"name": "simple_cnn"},
                            "train": {"device": "cuda", "epochs": 2, "batch_size": 8}, "export": {"enabled": False}})
    report = train(cfg, tmp_path / "run")
    assert report["data_path"] == "shards" and report["device"].startswith("cuda"), report["data_path"]
    assert report["epochs_completed"] == 2


def test_feature_cache_lives_on_the_device(tmp_path: Path) -> None:
    from core.train import train

    photos = make_photo_tree(tmp_path / "photos", 30, size=64)
    cfg = load_config(None, ["data.name=imagefolder", f"data.path={photos}", "data.image_size=64",
                             "model.name=efficientnet_lite0", "model.pretrained=true", "model.freeze=backbone",
                             "train.feature_cache=on", "data.feature_views=2", "train.device=cuda", "train.epochs=20",
                             "train.batch_size=16", "export.enabled=false"])
    report = train(cfg, tmp_path / "run")
    start = _start(tmp_path / "run")
    assert start["data_path"] == "feature_cache" and start["device"].startswith("cuda")
    assert report["feature_cache"]["views"] == 2 and report["feature_cache"]["images_embedded"] > 0
    assert report["test"]["accuracy"] > 0.5, report["test"]  # 4 classes: well above chance


def test_worker_with_gpus_0_runs_a_job(redis_conn: Any, job_env: dict[str, str], spawn: Any) -> None:
    from worker import api
    from worker.submit import submit_job

    job_id = submit_job(DIGITS, ["train.epochs=2", "export.enabled=false"], connection=redis_conn,
                        allow_local_paths=True)
    worker = spawn.python(["worker", "run", "--gpus", "0", "--burst"], job_env, name="gpu-worker")
    assert worker.wait(timeout=300) == 0, spawn.output(worker)
    wait_for(lambda: api.job_status(redis_conn, job_id)["final"], 30, "the job to end",
             explain=explain_job(redis_conn, job_id, spawn))
    st = api.job_status(redis_conn, job_id)
    assert st["state"] == "finished", explain_job(redis_conn, job_id, spawn)()
    assert str(st.get("device", "")).startswith("cuda"), st.get("device")
    assert json.loads(api.read_artifact(job_id, "report"))["device"].startswith("cuda")


@pytest.fixture(scope="module")
def cuda_exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from core.train import train

    out = tmp_path_factory.mktemp("cuda-export") / "run"
    return train(load_config(DIGITS, ["train.device=cuda", "train.epochs=4", "train.amp=true", "export.int8=false"]),
                 out)


def test_onnx_export_of_a_cuda_trained_model_passes_parity_on_the_cpu(cuda_exported: dict[str, Any]) -> None:
    onnx = cuda_exported["export"]["onnx"]
    assert cuda_exported["device"].startswith("cuda")
    assert onnx["max_abs_diff"] <= 1e-3 and onnx["top1_agreement"] == 1.0, onnx
    assert onnx["accuracy"] == pytest.approx(cuda_exported["test"]["accuracy"], abs=0.01)


def test_tensorrt_timing_where_present(cuda_exported: dict[str, Any]) -> None:
    trt = cuda_exported["export"]["tensorrt"]
    if not trt.get("available"):
        pytest.skip(f"TensorRT: {trt.get('reason')}")
    assert trt.get("latency_ms_batch1", 0) > 0, trt
    assert trt.get("max_abs_diff_vs_cpu", 0.0) <= 1e-2, trt
