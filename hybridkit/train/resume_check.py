"""Which recipe changes a run may resume across.

A checkpoint holds the weights and optimizer moments of one training trajectory: the data
(``task``), the model and the optimisation (``train``'s batch, learning-rate schedule, AdamW
settings, precision, seeds). Resuming it under another value of any of these continues a run
that its folder no longer describes (``recipe.yaml`` is rewritten with the new values) and whose
results no single recipe reproduces, so :func:`trajectory_changes` lists them and the trainer
refuses. What only decides how or how long the same trajectory is computed may change: the
step count (how a finished run is trained further), execution settings (device, compilation,
parallelism, checkpoint and log cadence) and the evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: recipe keys (dotted; a section name covers everything under it) a resume may change
MAY_CHANGE = frozenset(
    {
        "name",
        "description",
        "plugins",
        "eval",
        "task.eval_lengths",  # the task's test sets: the training data depends on neither
        "task.eval_examples",
        "task.eval_seed",
        "train.steps",
        "train.grad_accum",  # the same examples per step, in other micro-batches
        "train.compile",
        "train.compile_mode",
        "train.prefetch",
        "train.activation_checkpointing",
        "train.loss_chunk_tokens",
        "train.deterministic",
        "train.device",
        "train.parallel",
        "train.fsdp_mixed_precision",
        "train.checkpoint_format",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.tensorboard",
    }
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _may_change(key: str) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in MAY_CHANGE for i in range(1, len(parts) + 1))


def trajectory_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every recipe value outside :data:`MAY_CHANGE` that differs
    between two resolved recipes (``recipe_to_dict``); empty when they agree."""
    before, after = _flatten(dict(old)), _flatten(dict(new))
    missing = object()
    changes = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, missing), after.get(key, missing)
        if a != b and not _may_change(key):
            shown = ["(absent)" if v is missing else repr(v) for v in (a, b)]
            changes.append(f"{key}: {shown[0]} -> {shown[1]}")
    return changes
