"""Model weights on disk: safetensors only (never pickle), written atomically.

A *run directory* holds ``recipe.yaml`` (the fully resolved recipe) and the weights, either as
``model.safetensors`` in the directory itself or in the newest checkpoint named by the file
``checkpoints/latest``. Writes go to a temporary file in the same directory followed by
``os.replace``, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hybridkit.errors import CheckpointError
from hybridkit.fsutil import atomic_write_bytes


def untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the second name of tensors that share storage (``lm_head.weight`` tied to the
    embedding): safetensors stores each tensor once and refuses aliases."""
    out, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if tensor.data_ptr() != 0 and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save ``model.state_dict()`` (or a state dict; tied weights stored once) atomically as
    safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = untie(model.state_dict() if isinstance(model, torch.nn.Module) else model)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors weights into ``model``; a foreign or truncated file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated"
        ) from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _is_tied_alias(model, k, state)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong[:3]))
        raise CheckpointError(f"{path} does not match this model: " + ", ".join(parts))
    model.load_state_dict(state, strict=False)


def _is_tied_alias(model: torch.nn.Module, key: str, state: dict) -> bool:
    if key != "lm_head.weight":
        return False
    return (
        getattr(getattr(model, "spec", None), "tie_embeddings", False)
        and "embedding.weight" in state
    )


def find_weights(run_dir: str | os.PathLike) -> Path:
    """The weights file of a run directory (see the module docstring)."""
    run_dir = Path(run_dir)
    direct = run_dir / "model.safetensors"
    if direct.is_file():
        return direct
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        candidate = run_dir / "checkpoints" / name / "model.safetensors"
        if candidate.is_file():
            return candidate
        raise CheckpointError(f"{latest} names {name!r} but {candidate} does not exist")
    raise CheckpointError(
        f"{run_dir} holds no weights: expected model.safetensors or checkpoints/latest"
    )


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


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated"
        ) from None


def write_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, torch.Tensor],
    trainer_state: dict,
    keep: int,
) -> Path:
    """Write a complete checkpoint atomically and prune old ones; returns its directory."""
    import json
    import shutil

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


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None if it has none."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    path = latest.parent / latest.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{latest} names {path.name!r}, which does not exist")
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(model tensors, optimizer tensors, trainer state) of a checkpoint directory."""
    import json

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
        load_tensors(path / "model.safetensors"),
        load_tensors(path / "optimizer.safetensors"),
        state,
    )
