"""Distributed mode is read from the environment (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE).

One `DistInfo.is_primary` gates every file write and event; nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


DEFAULT_DIST_TIMEOUT = 1800.0
"""Seconds a collective waits for the other ranks before failing (PyTorch's own default: 30 minutes)."""


def dist_timeout() -> float:
    """The process group's timeout: env CORE_DIST_TIMEOUT (seconds; multi-node workers set it short, so a lost node
    stops the others instead of hanging them) or DEFAULT_DIST_TIMEOUT."""
    raw = os.environ.get("CORE_DIST_TIMEOUT", "").strip()
    try:
        return max(1.0, float(raw)) if raw else DEFAULT_DIST_TIMEOUT
    except ValueError:
        return DEFAULT_DIST_TIMEOUT


def init_distributed(device_pref: str = "auto") -> tuple[DistInfo, torch.device]:
    """Initialise the process group when launched by torchrun and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        from core.errors import ConfigError

        raise ConfigError.on("train.device", "cuda",
                             "'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'")
    if use_cuda:
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=dist_timeout()))
    return info, device


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sum a few scalars over ranks (one collective; a host sync point)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's parameters and buffers, in place (one broadcast per tensor of the state dict)."""
    if not info.enabled:
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
