"""Add your own task kind to hybridkit without editing hybridkit.

The task here is "reverse": read a short random sequence, a separator, then emit the sequence
backwards. A task kind is two classes:

* a pydantic spec deriving from ``TaskSpec`` with ``kind: Literal["<name>"]``; its fields are the
  recipe keys of the ``task`` section, validated with the same error messages as built-in tasks,
  and it inherits ``seq_len``, ``length_mixture``, ``curriculum``, ``eval_lengths``, ... ;
* a ``Task`` whose ``sample(n, length, rng)`` returns a ``Batch`` of inputs and targets, with
  ``IGNORE_INDEX`` on the positions that are not scored. Training batches (mixtures, curricula,
  padding) and the fixed evaluation sets come from the base class.

``@register_task`` on the spec makes the kind available to every recipe of a process that has
imported this module. From the command line that is what ``--plugin`` does::

    hybridkit train examples/custom_task.yaml -o runs/reverse --plugin examples/custom_task.py
    hybridkit eval runs/reverse      # the run directory records the plugin

Run ``python examples/custom_task.py`` for the task on its own (batches and a perfect score).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from hybridkit import register_task
from hybridkit.tasks import IGNORE_INDEX, Batch, Task, TaskSpec, make_batch, score

PAD, SEP, FIRST = 0, 1, 2


@register_task
class ReverseSpec(TaskSpec):
    """Recipe keys of the new kind. ``seq_len`` counts the items to reverse."""

    kind: Literal["reverse"] = "reverse"
    seq_len: int = Field(default=8, gt=0, description="items to reverse")
    num_symbols: int = Field(default=10, ge=2, description="distinct item tokens")

    def token_length(self, length: int) -> int:
        return 2 * length  # items, SEP, reversed items minus the last (it is only a target)

    def build(self) -> ReverseTask:
        return ReverseTask(self)


class ReverseTask(Task):
    """``x1 .. xn SEP xn .. x2`` -> after SEP predict ``xn``, then ``x(n-1)``, ... ``x1``."""

    spec: ReverseSpec

    def __init__(self, spec: ReverseSpec):
        super().__init__(spec)
        self.vocab_size = FIRST + spec.num_symbols
        self.chance = 1.0 / spec.num_symbols
        self.pad_id = PAD

    def sample(self, n: int, length: int, rng: np.random.Generator) -> Batch:
        self.check_length(length)  # the task contract: refuse a length it cannot generate
        items = rng.integers(FIRST, self.vocab_size, size=(n, length))
        full = np.concatenate([items, np.full((n, 1), SEP), items[:, ::-1]], axis=1)
        inputs, targets = full[:, :-1], full[:, 1:].copy()
        targets[:, :length] = IGNORE_INDEX  # only the reversed part is scored
        return make_batch(inputs, targets, length)


def oracle(inputs: torch.Tensor) -> torch.Tensor:
    """Perfect predictions computed from the inputs alone (what a solved model outputs)."""
    preds = torch.full_like(inputs, PAD)
    for row, seq in enumerate(inputs.tolist()):
        sep = seq.index(SEP)
        items = seq[:sep]
        preds[row, sep:] = torch.tensor(items[::-1][: len(seq) - sep])
    return preds


def main() -> dict:
    spec = TaskSpec.model_validate(
        {"kind": "reverse", "seq_len": 6, "num_symbols": 8, "eval_lengths": [6, 12]}
    )
    task = spec.build()
    train = task.train_batch(step=0, batch_size=4, rng=task.train_rng(step=0))
    evals = {n: score(oracle(task.eval_set(n).inputs), task.eval_set(n)) for n in task.eval_lengths}
    print(f"kind {spec.kind!r}: vocab {task.vocab_size}, chance {task.chance:.3f}")
    print(f"train batch inputs {tuple(train.inputs.shape)}; first row {train.inputs[0].tolist()}")
    for n, m in evals.items():
        print(f"eval length {n}: {m.as_dict(task.chance)}")
    return {
        "kind": spec.kind,
        "train_shape": tuple(train.inputs.shape),
        "metrics": {n: m.as_dict(task.chance) for n, m in evals.items()},
    }


if __name__ == "__main__":
    main()
