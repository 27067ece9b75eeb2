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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Save ``model.state_dict()`` (tied weights stored once) atomically as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride())
        if tensor.data_ptr() != 0 and key in seen:
            continue  # a tied parameter (e.g. lm_head.weight = embedding.weight)
        seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
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
