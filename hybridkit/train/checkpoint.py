"""Training checkpoints: weights, AdamW moments and trainer state, written so a kill never hurts.

Plain model weights (``save_weights``/``load_weights``/``find_weights``) live in
:mod:`hybridkit.weights`, which evaluation reads without importing the trainer; this module adds
what only training needs to resume exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from hybridkit.errors import CheckpointError
from hybridkit.fsutil import atomic_write_bytes
from hybridkit.weights import read_safetensors, untie

__all__ = ["CHECKPOINT_FILES", "read_checkpoint", "write_checkpoint"]


# --- training checkpoints (weights + optimizer + trainer state) --------------------------------
#
# checkpoints/step_000100/model.safetensors      the weights
# checkpoints/step_000100/optimizer.safetensors  AdamW moments, keyed "<param name>/<state key>"
# checkpoints/step_000100/trainer.json           step, RNG states, recipe, metrics so far
# checkpoints/latest                             name of the newest complete checkpoint
#
# A checkpoint directory is written under a temporary name and renamed when complete, and
# `latest` is replaced atomically afterwards, so a run killed at any moment (kill -9 included)
# leaves the previous checkpoint intact and resumable.

CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "trainer.json")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(untie(tensors), str(path))


def write_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, torch.Tensor],
    trainer_state: dict,
    keep: int,
) -> Path:
    """Write a complete checkpoint atomically and prune old ones; returns its directory."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_tensors(model_state, tmp / "model.safetensors")
        save_tensors(optim_state, tmp / "optimizer.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(root / "latest", name.encode())
    # Keep the newest `keep` checkpoints up to this one. Later steps belong to an abandoned
    # trajectory (a restart with --resume none, or a resume from an older checkpoint): drop them
    # rather than this one, which `latest` now names.
    others = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
    older = [p for p in others if p.name < name]
    stale = [p for p in others if p.name > name] + older[: max(0, len(older) - (keep - 1))]
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(model tensors, optimizer tensors, trainer state) of a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a hybridkit checkpoint: missing {', '.join(missing)}")
    try:
        state = json.loads((path / "trainer.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / 'trainer.json'} is corrupt ({err})") from None
    if not isinstance(state, dict) or "step" not in state or state.get("format") != "hybridkit-1":
        raise CheckpointError(f"{path} was not written by hybridkit's trainer")
    return (
        read_safetensors(path / "model.safetensors", "checkpoint file"),
        read_safetensors(path / "optimizer.safetensors", "checkpoint file"),
        state,
    )
