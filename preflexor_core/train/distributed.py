"""Distributed helpers: torchrun init, DDP / FSDP2 wrapping, rank-0 I/O, object broadcast.

Run N processes with ``torchrun --nproc_per_node N train.py ...``: the backend is gloo on CPU
and nccl on CUDA (one GPU per local rank). A plain ``python train.py`` runs single-process and
every helper here degrades to a no-op.

Tests: ``python -m pytest -q tests/test_trainer.py -k torchrun``
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..infra import env


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; pick this rank's device."""
    world, rank, local = env.torchrun_ranks()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was requested but torch sees no CUDA device")
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to all ranks (identity when single-process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


@contextlib.contextmanager
def no_grad_sync(model: torch.nn.Module, enabled: bool = True):
    """Skip the gradient all-reduce of the backward passes inside the block (micro-batches before
    the last one of an accumulated step): DDP ``no_sync()``, FSDP2 ``set_requires_gradient_sync(False)``
    (gradients stay unsharded and accumulate locally). A no-op for a plain module or ``enabled=False``."""
    if not enabled:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def wrap_model(model: torch.nn.Module, info: DistInfo, fsdp: bool = False) -> torch.nn.Module:
    """DDP (default) or FSDP2 ``fully_shard`` (per transformer block, then the root) when world > 1."""
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard  # torch.distributed: only multi-process runs need it
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP  # torch.nn.parallel: as above
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on every rank; FSDP2 shards are all-gathered, so
    under FSDP2 this is collective. Plain tensors pass through (detached)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
            for k, v in model.state_dict().items()}


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
