"""Data parallelism under ``torchrun``: process-group setup and model wrapping (DDP or FSDP2).

The same trainer runs single-process when ``WORLD_SIZE`` is unset. Every rank draws the same
*global* batch from the seeded generator and keeps its own slice, so a run on N ranks sees exactly
the data of a single-process run with the same global batch.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from hybridkit.compat import fsdp_on_cpu_problem
from hybridkit.errors import HybridkitError


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


def fsdp_api() -> tuple[Callable[..., nn.Module], type]:
    """``(fully_shard, MixedPrecisionPolicy)`` from wherever this torch keeps them.

    FSDP2 became public as ``torch.distributed.fsdp.fully_shard`` in torch 2.6; torch 2.5 (the
    oldest we support) only has it under ``torch.distributed._composable.fsdp``."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def fsdp_param_dtype(setting: str, device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype FSDP2 gathers parameters in, for ``train.fsdp_mixed_precision``; None = fp32.

    ``auto`` gathers bf16 exactly when the step runs under bf16 autocast anyway (a GPU with
    ``precision`` auto or bf16): the matmuls then see the same bf16 weights, the all-gathers move
    half the bytes and the per-block unsharded copies take half the memory. On a CPU (fp32 runs
    that are meant to match a single-process run closely) it stays fp32. Gradients are always
    reduced in fp32 (see :func:`wrap_model`)."""
    if setting == "auto":
        bf16 = device.type == "cuda" and precision in ("auto", "bf16")
        return torch.bfloat16 if bf16 else None
    return torch.bfloat16 if setting == "bf16" else None


def wrap_model(
    model: nn.Module,
    info: DistInfo,
    mode: str,
    device: torch.device,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on every block, then on the root).

    Per-block sharding lets FSDP2 all-gather one block's weights just before it runs and free
    them right after (prefetching the next block's meanwhile), so peak memory holds one full
    block, not the whole model; the root call covers what is left (embedding, final norm,
    head). Activation checkpointing (``model.activation_checkpointing``) composes with it: the
    recomputed block forward all-gathers its weights again through the same hooks.

    ``param_dtype`` (FSDP only; see :func:`fsdp_param_dtype`) is the dtype the weights are
    gathered and computed in; the sharded master weights and the optimizer stay fp32, and
    gradients are reduce-scattered in fp32 so that summing N ranks' contributions does not
    lose bf16 precision.
    """
    if not info.enabled:
        return model
    if mode == "fsdp":
        return shard_model(model, param_dtype)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_model(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 over the default process group, in place (see :func:`wrap_model`); also usable on
    a one-rank group, which is how the GPU tests exercise the mixed-precision policy on a
    machine with a single GPU."""
    problem = fsdp_on_cpu_problem()
    if problem and next(model.parameters()).device.type == "cpu":
        raise HybridkitError(f"train.parallel 'fsdp': {problem}; allowed here: ddp")
    fully_shard, policy_cls = fsdp_api()
    policy = policy_cls(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # fully_shard swaps every parameter for a new (DTensor) one, which drops attributes such
    # as ``_no_weight_decay``; carry them over so the optimizer groups match DDP's.
    flagged = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", 0)}
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for name, param in model.named_parameters():
        if name in flagged:
            param._no_weight_decay = True
    return model


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


#: how long a rank waits for the others to finish tearing their process group down
SHUTDOWN_WAIT_S = 60.0


def shutdown(info: DistInfo) -> None:
    """Leave the process group together, twice over.

    First a barrier: a rank that tore gloo down while rank 0 was still writing its report
    aborted in gloo's threads ("terminate called without an active exception", SIGABRT) in the
    CPU test of ``bench train`` under torchrun. Then, after ``destroy_process_group``, a count
    on the launcher's key-value store (which outlives every rank): the CPU CI saw a rank abort
    the same way, and another hang inside its teardown, once its peer had already torn down and
    exited, closing the connections gloo was still shutting. So no rank exits before every rank
    has finished its teardown (or ``SHUTDOWN_WAIT_S`` has passed: a rank stuck for other reasons
    must not keep the others)."""
    if not (info.enabled and dist.is_initialized()):
        return
    dist.barrier()
    store = _default_store()
    dist.destroy_process_group()
    if store is None:
        return
    store.add(_LEFT_KEY, 1)
    deadline = time.monotonic() + SHUTDOWN_WAIT_S
    while store.add(_LEFT_KEY, 0) < info.world_size and time.monotonic() < deadline:
        time.sleep(0.01)


_LEFT_KEY = "hybridkit/ranks_torn_down"


def exit_rank(code: int) -> NoReturn:
    """End a torchrun rank now, with ``code``, skipping the interpreter's finalization.

    Call it last, after :func:`shutdown` and after every file is written and closed. Why: gloo's
    threads outlive ``destroy_process_group`` (on torch 2.13 CPU a rank still has its three gloo
    threads after it, even once the FSDP model is deleted), so they still run while the
    interpreter finalizes; a native thread that asks for the GIL then is ended by
    ``pthread_exit``, which aborts the process if it unwinds through C++ code that may not throw
    ("terminate called without an active exception", SIGABRT). The CPU CI still saw that abort
    now and then with the barrier and the teardown count of :func:`shutdown` in place; where in
    the rank it came from was not recorded (the test launches now enable ``faulthandler``).
    ``os._exit`` leaves without finalizing, which closes that window; the standard streams are
    flushed first."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing reaches it
            stream.flush()
    os._exit(code)


def _default_store() -> dist.Store | None:
    """The default group's key-value store (torchrun's rendezvous store), or None where this
    torch does not expose it."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None
