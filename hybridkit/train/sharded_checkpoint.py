"""Sharded training checkpoints (``torch.distributed.checkpoint``) that resume on any world size.

Why a second format: the full format (:mod:`hybridkit.train.checkpoint`) gathers every weight and
AdamW moment on rank 0 and writes them from there, which at 1.4B parameters is ~17 GB through one
process's memory and one writer. Here every rank writes only its own shards, in parallel, and
``torch.distributed.checkpoint`` (DCP) records where each slice of each tensor lives, so a
checkpoint written on N ranks loads on M ranks (or into a plain single-process model): DCP reads
exactly the slices the loading side's (sharded or whole) tensors cover.

Layout of one checkpoint directory (the same ``trainer.json`` as the full format)::

    step_0000100/shards/.metadata        DCP's index of the tensors and their slices
    step_0000100/shards/__<rank>_0.distcp  the slices each rank wrote
    step_0000100/trainer.json            step, RNG state, history, size + SHA-256 of every file

Atomicity is the full format's: all ranks write into a temporary directory; rank 0 adds
``trainer.json`` only after every rank's files are on disk (DCP fsyncs each), then renames the
directory into place and moves ``latest`` (:func:`~hybridkit.train.checkpoint.publish_checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from hybridkit.train.checkpoint import (
    SHARD_DIR,
    SHARDED_FORMAT,
    describe_file,
    fsync_path,
    publish_checkpoint,
)
from hybridkit.train.distributed import DistInfo, barrier

__all__ = ["load_sharded", "write_sharded_checkpoint"]


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it "assumes the intent is to save/load in a single process" whenever no
    process group exists: for a single-process run that is exactly the intent, so say nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*in a single process.*")
        yield


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The model and optimizer state as DCP sees it: keyed by parameter name, each tensor the
    local shard (a DTensor under FSDP2) or the whole tensor (single process, DDP)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def write_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    keep: int,
    info: DistInfo,
) -> Path:
    """Write a sharded checkpoint of ``model`` and ``optimizer`` (a collective: every rank calls
    it); returns the checkpoint directory. ``trainer_state`` is rank 0's (step, RNG, history)."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:07d}"
    # One name every rank can derive without talking; a leftover of a killed run is removed
    # first (by rank 0 alone, before anyone writes into it).
    tmp = root / f".{name}.partial"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SHARD_DIR).mkdir(parents=True)
    barrier(info)
    try:
        with _single_process_quiet():
            dcp.save(_state(model, optimizer), checkpoint_id=str(tmp / SHARD_DIR))
        barrier(info)  # every rank's shards are complete before they are described
        files = _describe_shards(tmp, info)
        if info.is_main:
            state = {
                **trainer_state,
                "format": SHARDED_FORMAT,
                "world_size": info.world_size,
                "files": files,
            }
            (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
            fsync_path(tmp / "trainer.json")
            fsync_path(tmp / SHARD_DIR)
            fsync_path(tmp)
            publish_checkpoint(tmp, root, name, keep)
    except BaseException:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(info)
    return root / name


def _describe_shards(tmp: Path, info: DistInfo) -> dict[str, dict]:
    """Size and SHA-256 of every file under ``tmp/SHARD_DIR``, hashed in parallel: each rank
    takes every N-th file, and the descriptions are gathered (on every rank; rank 0 uses them).

    Hashing ~17 GB of 1.4B-parameter state in one process would add tens of seconds to every
    checkpoint; spread over the ranks it costs about what writing them did."""
    names = sorted(
        p.relative_to(tmp).as_posix() for p in (tmp / SHARD_DIR).rglob("*") if p.is_file()
    )
    mine = {n: describe_file(tmp / n) for n in names[info.rank :: info.world_size]}
    if not info.enabled:
        return mine
    parts: list[dict | None] = [None] * info.world_size
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in (part or {}).items()}


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the sharded checkpoint at ``path`` into ``model`` and ``optimizer`` in place,
    whatever the world size that wrote it and the one reading it (see the module docstring).

    Call it on every rank of a distributed run (it is a collective there); in a single process
    DCP reads without a process group."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(Path(path) / SHARD_DIR))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
