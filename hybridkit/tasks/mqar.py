"""MQAR: multi-query associative recall (Zoology, docs/tasks.md section 3.1 / T1, T2).

Vocabulary (``vocab_size`` = V, the model needs at least V ids):

* ``0`` filler (also the pad id),
* keys ``[1, V // 2)``, values ``[V // 2, V)``.

Example of ``seq_len`` = N input tokens with D key-value pairs and P passes::

    k1 v1 k2 v2 ... kD vD   (repeated P times)   | query region of N - 2DP tokens

Every key is queried exactly once, at an even offset ``2g`` of the query region; the slot index
``g`` is drawn without replacement with probability proportional to ``a * (g + 1) ** (a - 1)``
(``power_a`` = a; 0.01 puts most queries right after the context, 1 is uniform). The target at a
query position is the value paired with that key; nothing else is scored. Filler positions hold 0,
or with ``random_filler`` a random *value* token -- Zoology draws from the whole vocabulary; values
only keep every key appearing exactly once in the query region, so queries stay unambiguous.
The value itself is not written after the query (Zoology's layout), so the answer is never in the
input. Natural unit of length: input tokens. Chance per scored token: 1 / (V - V // 2).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, PositiveInt

from hybridkit.registry import register_task
from hybridkit.tasks.base import (
    IGNORE_INDEX,
    MAX_VOCAB,
    Batch,
    Task,
    TaskSpec,
    make_batch,
    sample_distinct,
    weighted_distinct,
)


@register_task
class MQARSpec(TaskSpec):
    """Recipe keys of the ``mqar`` task."""

    kind: Literal["mqar"] = "mqar"
    seq_len: int = Field(default=64, gt=0, description="input tokens N (even)")
    vocab_size: int = Field(
        default=8192, ge=4, le=MAX_VOCAB, description="V; keys [1, V/2), values [V/2, V)"
    )
    num_kv_pairs: int = Field(default=4, gt=0, description="D key-value pairs per example")
    kv_pairs_by_length: dict[PositiveInt, PositiveInt] = Field(
        default_factory=dict,
        description="D for specific lengths (Based-style (N, D) mixtures and test grids)",
    )
    power_a: float = Field(default=0.01, gt=0, description="power-law exponent of query slots")
    passes: int = Field(default=1, ge=1, description="times the context block is repeated")
    random_filler: bool = Field(default=False, description="random value tokens instead of 0")

    def pairs_at(self, length: int) -> int:
        return self.kv_pairs_by_length.get(length, self.num_kv_pairs)

    def check(self) -> list[tuple[str, str]]:
        train_max = self.max_train_length()
        if self.vocab_size <= train_max:
            return [
                (
                    "vocab_size",
                    f"vocab_size={self.vocab_size} must exceed the training length {train_max} "
                    "(Zoology's MQAR requires V > N)",
                )
            ]
        return []

    def length_problem(self, length: int) -> str | None:
        d = self.pairs_at(length)
        if length % 2:
            return f"MQAR length must be even, got {length}"
        need = 2 * d * (self.passes + 1)
        if length < need:
            return (
                f"length {length} is too short for num_kv_pairs={d} with passes={self.passes}: "
                f"needs 2*D*passes context + 2*D query tokens = {need}"
            )
        if d > self.vocab_size // 2 - 1 or d > self.vocab_size - self.vocab_size // 2:
            return (
                f"num_kv_pairs={d} needs that many distinct keys and values; "
                f"vocab_size={self.vocab_size} has {self.vocab_size // 2 - 1} keys"
            )
        return None

    def snap_length(self, length: int) -> int:
        return length - length % 2

    def build(self) -> MQARTask:
        return MQARTask(self)


class MQARTask(Task):
    """Generator of :class:`MQARSpec` examples."""

    spec: MQARSpec

    def __init__(self, spec: MQARSpec):
        super().__init__(spec)
        self.vocab_size = spec.vocab_size
        self.value_start = spec.vocab_size // 2
        self.chance = 1.0 / (spec.vocab_size - self.value_start)
        self.pad_id = 0

    def sample(self, n: int, length: int, rng: np.random.Generator) -> Batch:
        self.check_length(length)
        spec = self.spec
        d, v0 = spec.pairs_at(length), self.value_start
        keys = 1 + sample_distinct(rng, n, v0 - 1, d)
        values = v0 + sample_distinct(rng, n, spec.vocab_size - v0, d)
        context = np.empty((n, 2 * d), dtype=np.int64)
        context[:, 0::2], context[:, 1::2] = keys, values
        ctx_len = 2 * d * spec.passes

        region = length - ctx_len
        slots = region // 2
        g = np.arange(slots, dtype=np.float64)
        log_w = np.log(spec.power_a) + (spec.power_a - 1.0) * np.log1p(g)
        chosen = weighted_distinct(rng, log_w, n, d)  # (n, d) slot indices
        # Which key goes to which slot is a separate uniform permutation, so that the query
        # order is unrelated to the order of the pairs in the context.
        which = sample_distinct(rng, n, d, d)
        qpos = ctx_len + 2 * chosen

        if spec.random_filler:
            inputs = rng.integers(v0, spec.vocab_size, size=(n, length))
        else:
            inputs = np.zeros((n, length), dtype=np.int64)
        inputs[:, :ctx_len] = np.tile(context, (1, spec.passes))
        targets = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
        np.put_along_axis(inputs, qpos, np.take_along_axis(keys, which, axis=1), axis=1)
        np.put_along_axis(targets, qpos, np.take_along_axis(values, which, axis=1), axis=1)
        return make_batch(inputs, targets, length)
