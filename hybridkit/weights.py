"""Model weights on disk: safetensors only (never pickle), written atomically, found in a run.

A *run directory* holds ``recipe.yaml`` (the fully resolved recipe) and the weights, either as
``model.safetensors`` in the directory itself (a finished run) or in the newest checkpoint, whose
directory name the file ``checkpoints/latest`` holds. The trainer writes both; evaluation, the
CLI and studies only read them. Reading lives here, below ``train/`` and ``eval/``, so that an
evaluator does not have to import the trainer to find a model's weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hybridkit.errors import CheckpointError, describe_value
from hybridkit.fsutil import atomic_write

__all__ = [
    "find_weights",
    "latest_checkpoint",
    "load_weights",
    "read_safetensors",
    "save_weights",
    "untie",
]


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
    state = untie(model.state_dict() if isinstance(model, torch.nn.Module) else model)
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def read_safetensors(
    path: str | os.PathLike, what: str = "weights file"
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing or unreadable file is a CheckpointError.

    A run killed while copying, or a file from elsewhere, should say which file is broken rather
    than surface as a library traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no {what} at {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated"
        ) from None


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors weights into ``model``; a foreign or truncated file is a CheckpointError."""
    path = Path(path)
    state = read_safetensors(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _is_tied_alias(model, k, state)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    # integer or boolean tensors would be cast to the model's float dtype without a word
    wrong += [
        f"{k}: file dtype {v.dtype} (allowed: a floating-point dtype)"
        for k, v in state.items()
        if k in expected and expected[k].is_floating_point() and not v.is_floating_point()
    ]
    # a tied model has one embedding matrix: a file with its own head would overwrite it
    tied = getattr(getattr(model, "spec", None), "tie_embeddings", False)
    both = tied and "lm_head.weight" in state and "embedding.weight" in state
    if both and not torch.equal(state["lm_head.weight"], state["embedding.weight"]):
        wrong.append(
            "lm_head.weight: the file holds a head of its own, but the recipe ties it to the "
            "embedding (model.tie_embeddings: true)"
        )
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


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run, or None if it has none."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    named = latest.read_bytes().decode("utf-8", "replace").strip()  # damaged: a wrong name
    path = latest.parent / named
    if not (named.startswith("step_") and path.is_dir()):
        raise CheckpointError(
            f"{latest} names {describe_value(named)}, which is not a checkpoint directory"
        )
    return path


def find_weights(run_dir: str | os.PathLike) -> Path:
    """The weights file of a run directory (see the module docstring)."""
    run_dir = Path(run_dir)
    direct = run_dir / "model.safetensors"
    if direct.is_file():
        return direct
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        candidate = checkpoint / "model.safetensors"
        if candidate.is_file():
            return candidate
        if (checkpoint / "shards").is_dir():
            # a sharded (FSDP) checkpoint holds no single weights file: the finished run writes
            # model.safetensors next to checkpoints/, and training can resume from it
            raise CheckpointError(
                f"{checkpoint} is a sharded checkpoint (train.checkpoint_format: sharded) and "
                f"{run_dir} has no model.safetensors yet: finish the run (hybridkit train "
                "--resume auto writes it at the end), or train with train.checkpoint_format: "
                "full to get weights in every checkpoint"
            )
        raise CheckpointError(f"{checkpoint} is the newest checkpoint but {candidate} is missing")
    raise CheckpointError(
        f"{run_dir} holds no weights: expected model.safetensors or checkpoints/latest"
    )
