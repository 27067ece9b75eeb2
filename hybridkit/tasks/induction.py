"""Induction heads / single associative recall (Mamba-1 Table 2; docs/tasks.md T5).

Vocabulary (``num_tokens`` = K, default 16): data tokens ``0 .. K-1``, ``TRIGGER = K``;
vocab size K + 1. Pad id 0 (right padding is invisible to a causal model).

Example of ``seq_len`` = L input tokens: i.i.d. uniform data tokens, except that the trigger is
written once at a uniform position ``p <= L - 3`` followed by a data token (the target), and again
at the last position ``L - 1``. The only scored position is the last one, whose target is the
token that followed the first trigger. Natural unit of length: input tokens. Chance 1 / K.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from hybridkit.registry import register_task
from hybridkit.tasks.base import (
    IGNORE_INDEX,
    MAX_VOCAB,
    Batch,
    Task,
    TaskSpec,
    long_tensor,
    make_batch,
)


@register_task
class InductionSpec(TaskSpec):
    """Recipe keys of the ``induction`` task."""

    kind: Literal["induction"] = "induction"
    seq_len: int = Field(default=256, gt=0, description="input tokens")
    num_tokens: int = Field(
        default=16, ge=2, le=MAX_VOCAB - 1, description="data vocabulary (trigger excluded)"
    )

    def length_problem(self, length: int) -> str | None:
        if length < 3:
            return f"induction length must be >= 3 (trigger, target, final trigger), got {length}"
        return None

    def build(self) -> InductionTask:
        return InductionTask(self)


class InductionTask(Task):
    """Generator of :class:`InductionSpec` examples."""

    spec: InductionSpec

    def __init__(self, spec: InductionSpec):
        super().__init__(spec)
        self.trigger = spec.num_tokens
        self.vocab_size = spec.num_tokens + 1
        self.chance = 1.0 / spec.num_tokens
        self.pad_id = 0

    def sample(self, n: int, length: int, rng: np.random.Generator) -> Batch:
        self.check_length(length)
        inputs = rng.integers(0, self.spec.num_tokens, size=(n, length))
        rows = np.arange(n)
        pos = rng.integers(0, length - 2, size=n)  # p in [0, L - 3]
        inputs[rows, pos] = self.trigger
        inputs[:, -1] = self.trigger
        targets = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
        targets[:, -1] = inputs[rows, pos + 1]
        return make_batch(inputs, targets, length, trigger_pos=long_tensor(pos))
