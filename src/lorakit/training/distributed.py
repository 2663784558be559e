"""Data-parallel set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

Without those variables everything degrades to a single process and no process group is created, so the
same trainer code runs under ``lorakit train`` and ``torchrun -m lorakit train``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lorakit.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this module created the process group (and so destroys it)

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def setup(requested_device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    owns_group = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A generous timeout: rank 0 evaluates and writes checkpoints while the others wait.
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
        owns_group = True
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns_group)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(info: DistInfo, tensor: Tensor) -> Tensor:
    """Sum over processes, in place (a no-op alone)."""
    if info.enabled:
        # nccl reduces CUDA tensors only; the trainer keeps its bookkeeping tensors on the CPU.
        work = tensor.to(info.device) if info.device.type == "cuda" else tensor
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work.cpu())
    return tensor


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's value on every rank (e.g. an error message, so all ranks stop together)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_tensors(info: DistInfo, tensor: Tensor) -> list[Tensor]:
    """Every rank's copy of a same-shaped tensor, on every rank (used for per-rank RNG states)."""
    if not info.enabled:
        return [tensor]
    # gloo/nccl move numbers, not bytes: widen uint8 RNG states so any backend accepts them.
    wide = tensor.to(torch.int64).to(info.device if info.device.type == "cuda" else "cpu")
    out = [torch.empty_like(wide) for _ in range(info.world_size)]
    dist.all_gather(out, wide)
    return [t.to("cpu", tensor.dtype) for t in out]


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Small JSON-like values from every rank (in memory only; nothing here is written with pickle)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, info: DistInfo, *, fsdp: bool = False) -> nn.Module:
    """DDP (or FSDP) around ``model`` when running with several processes; the model itself otherwise.

    DDP averages gradients over processes; the trainer scales each rank's loss so the average equals the
    single-process gradient of the global batch.
    """
    if fsdp:
        return _shard_fsdp(model, info)
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def _shard_fsdp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Shard parameters, gradients and optimizer state over processes with FSDP2 (``fully_shard``).

    Each transformer block is its own unit (its weights are gathered only for its forward/backward), then
    the root. FSDP2 keeps the model object and parameter names, accepts frozen and trainable tensors side
    by side (a frozen base with LoRA), and runs on CPU (gloo) as well as CUDA (nccl). Gradients are
    averaged over processes, like DDP.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise ConfigError("fsdp needs several processes: launch with torchrun (e.g. --nproc_per_node=2)")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextmanager
def no_grad_sync(model: nn.Module, info: DistInfo, skip: bool) -> Iterator[None]:
    """While ``skip``, accumulate gradients locally instead of averaging them over processes."""
    if not (skip and info.enabled):
        yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    else:
        with model.no_sync():  # type: ignore[operator]
            yield


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 shards the model in place, without a wrapper)."""
    return model.module if type(model).__name__ == "DistributedDataParallel" else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
