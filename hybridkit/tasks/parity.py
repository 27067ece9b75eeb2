"""Parity (Deletang et al. / xLSTM semantics, Mamba-3 Table 5b; docs/tasks.md T9).

Vocabulary (size 7): ``PAD = 0, BOS = 1, EQ = 2, ZERO = 3, ONE = 4, EVEN = 5, ODD = 6``.

Example of ``seq_len`` = n *bits*: inputs ``BOS b1 ... bn EQ`` (n + 2 tokens), bits uniform.
The only scored position is EQ; its target is ODD if the number of ONE bits is odd, else EVEN.
Natural unit of length: bits (the curriculum of the paper runs from 3 to 40..160 bits).
Chance 0.5; report scaled accuracy.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from hybridkit.registry import register_task
from hybridkit.tasks.base import IGNORE_INDEX, Batch, Task, TaskSpec, make_batch

PAD, BOS, EQ, ZERO, ONE, EVEN, ODD = range(7)


@register_task
class ParitySpec(TaskSpec):
    """Recipe keys of the ``parity`` task."""

    kind: Literal["parity"] = "parity"
    seq_len: int = Field(default=40, gt=0, description="number of bits")

    def token_length(self, length: int) -> int:
        return length + 2

    def build(self) -> ParityTask:
        return ParityTask(self)


class ParityTask(Task):
    """Generator of :class:`ParitySpec` examples."""

    spec: ParitySpec
    vocab_size = 7
    chance = 0.5
    pad_id = PAD

    def sample(self, n: int, length: int, rng: np.random.Generator) -> Batch:
        self.check_length(length)
        bits = rng.integers(0, 2, size=(n, length))
        inputs = np.empty((n, length + 2), dtype=np.int64)
        inputs[:, 0], inputs[:, -1] = BOS, EQ
        inputs[:, 1:-1] = ZERO + bits
        targets = np.full_like(inputs, IGNORE_INDEX)
        targets[:, -1] = np.where(bits.sum(axis=1) % 2 == 1, ODD, EVEN)
        return make_batch(inputs, targets, length)
