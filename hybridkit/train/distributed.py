"""Data parallelism under ``torchrun``: process-group setup and model wrapping (DDP or FSDP2).

The same trainer runs single-process when ``WORLD_SIZE`` is unset. Every rank draws the same
*global* batch from the seeded generator and keeps its own slice, so a run on N ranks sees exactly
the data of a single-process run with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            # naming the device binds NCCL's communicator to it: without it NCCL guesses the
            # device from the global rank (and warns that a heterogeneous mapping can hang)
            torch.cuda.set_device(local)
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(rank, world, local)


def wrap_model(model: nn.Module, info: DistInfo, mode: str, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on every block, then on the root)."""
    if not info.enabled:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # fully_shard swaps every parameter for a new (DTensor) one, which drops attributes such
        # as ``_no_weight_decay``; carry them over so the optimizer groups match DDP's.
        flagged = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", 0)}
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        for name, param in model.named_parameters():
            if name in flagged:
                param._no_weight_decay = True
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
