"""Selective copying (Mamba-1 / MAD; docs/tasks.md section 4 and T6).

Vocabulary (``vocab_size`` = V, default 16 as in MAD): ``BLANK = 0`` (also the pad id),
``COPY = 1``, data tokens ``2 .. V-1``.

Example of ``seq_len`` = L input tokens with T = ``num_tokens`` tokens to copy::

    [ T data tokens scattered in order among blanks: L - T - 1 tokens ]  COPY  BLANK x T

The T positions after COPY are scored; their targets are the data tokens in order of
appearance. The answer slots stay blank in the input (no teacher forcing of earlier answers), as
in MAD, so one early mistake does not leak the next answer. For the extrapolation variant,
evaluate at larger L with the same T (more blanks). Natural unit of length: input tokens.
Chance per scored token: 1 / (V - 2).
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
    make_batch,
    sample_distinct,
)

BLANK, COPY, FIRST_DATA = 0, 1, 2


@register_task
class SelectiveCopySpec(TaskSpec):
    """Recipe keys of the ``selective_copy`` task."""

    kind: Literal["selective_copy"] = "selective_copy"
    seq_len: int = Field(default=256, gt=0, description="input tokens")
    # at least two data tokens: with one, every answer is known (chance 1 / (V - 2) = 1)
    vocab_size: int = Field(
        default=16, ge=4, le=MAX_VOCAB, description="blank + copy + data tokens (at least 2)"
    )
    num_tokens: int = Field(default=16, gt=0, description="T tokens to copy")

    def length_problem(self, length: int) -> str | None:
        need = 2 * self.num_tokens + 1
        if length < need:
            return (
                f"selective copy length {length} is too short for num_tokens={self.num_tokens}: "
                f"needs 2*T+1 = {need} (T data slots, COPY, T answer slots)"
            )
        return None

    def build(self) -> SelectiveCopyTask:
        return SelectiveCopyTask(self)


class SelectiveCopyTask(Task):
    """Generator of :class:`SelectiveCopySpec` examples."""

    spec: SelectiveCopySpec

    def __init__(self, spec: SelectiveCopySpec):
        super().__init__(spec)
        self.vocab_size = spec.vocab_size
        self.chance = 1.0 / (spec.vocab_size - FIRST_DATA)
        self.pad_id = BLANK

    def sample(self, n: int, length: int, rng: np.random.Generator) -> Batch:
        self.check_length(length)
        t = self.spec.num_tokens
        region = length - t - 1
        data = rng.integers(FIRST_DATA, self.spec.vocab_size, size=(n, t))
        pos = np.sort(sample_distinct(rng, n, region, t), axis=1)
        inputs = np.full((n, length), BLANK, dtype=np.int64)
        np.put_along_axis(inputs, pos, data, axis=1)
        inputs[:, region] = COPY
        targets = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
        targets[:, region + 1 :] = data
        return make_batch(inputs, targets, length)
