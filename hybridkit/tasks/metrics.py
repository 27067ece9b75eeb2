"""Task metrics: token accuracy, exact match and chance-corrected (scaled) accuracy.

:class:`Metrics` stores *counts*, not ratios, so evaluation can run in minibatches and add the
results (``sum(parts, Metrics())``) without weighting mistakes.

* ``tok_acc`` = correct scored tokens / scored tokens (argmax prediction).
* ``ex_match`` = answers whose scored tokens are all correct / answers. An answer is one example,
  except where ``batch.meta["answer_group"]`` splits a sequence into several (multi-query NIAH).
  Under teacher forcing this equals greedy-decoding exact match (docs/tasks.md section 0).
* ``scaled_acc(chance)`` = (tok_acc - chance) / (1 - chance): 0 is uniform guessing, 1 perfect.
  It is defined on ``tok_acc`` because ``chance`` is a per-token probability; for the
  single-answer-token tasks (parity, modular arithmetic, induction) ``tok_acc == ex_match``, which
  is the scaled accuracy convention of Deletang et al., Grazzi et al. and Mamba-3 Table 5b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkit.tasks.base import IGNORE_INDEX, Batch


@dataclass(frozen=True)
class Metrics:
    """Counts over scored positions; add two to merge minibatches."""

    correct: int = 0
    scored: int = 0
    exact: int = 0
    examples: int = 0

    def __add__(self, other: Metrics) -> Metrics:
        if not isinstance(other, Metrics):
            return NotImplemented
        return Metrics(
            self.correct + other.correct,
            self.scored + other.scored,
            self.exact + other.exact,
            self.examples + other.examples,
        )

    def __radd__(self, other: object) -> Metrics:
        # Lets the builtin sum() start from 0.
        if other == 0:
            return self
        return NotImplemented

    @property
    def tok_acc(self) -> float:
        return self.correct / self.scored if self.scored else float("nan")

    @property
    def ex_match(self) -> float:
        return self.exact / self.examples if self.examples else float("nan")

    def scaled_acc(self, chance: float) -> float:
        """Chance-corrected token accuracy: 0 = guessing uniformly, 1 = perfect."""
        if not 0.0 <= chance < 1.0:
            raise ValueError(f"chance must be in [0, 1), got {chance}")
        return (self.tok_acc - chance) / (1.0 - chance)

    def as_dict(self, chance: float | None = None) -> dict[str, float]:
        """Ratios (and the counts behind them) for logs; ``scaled_acc`` needs ``chance``."""
        out = {
            "tok_acc": self.tok_acc,
            "ex_match": self.ex_match,
            "scored": float(self.scored),
            "examples": float(self.examples),
        }
        if chance is not None:
            out["scaled_acc"] = self.scaled_acc(chance)
        return out


def score(logits_or_preds: torch.Tensor, batch: Batch | torch.Tensor) -> Metrics:
    """Metrics of predictions against a batch's targets.

    ``logits_or_preds`` is either logits ``(B, L, V)`` (argmax is taken) or predicted ids
    ``(B, L)``. ``batch`` is a :class:`Batch` or a bare targets tensor ``(B, L)``. Only positions
    whose target is not ``IGNORE_INDEX`` count.
    """
    if isinstance(batch, Batch):
        targets, groups = batch.targets, batch.meta.get("answer_group")
    else:
        targets, groups = batch, None
    preds = logits_or_preds
    if preds.dim() == targets.dim() + 1:
        preds = preds.argmax(dim=-1)
    if preds.shape != targets.shape:
        raise ValueError(
            f"predictions {tuple(preds.shape)} do not match targets {tuple(targets.shape)}"
        )
    preds = preds.detach()
    targets = targets.to(preds.device)
    scored = targets != IGNORE_INDEX
    hit = (preds == targets) & scored
    # One key per (row, answer group); an answer is exact when none of its positions is wrong.
    b = targets.shape[0]
    if groups is None:
        key = torch.arange(b, device=preds.device)[:, None].expand_as(targets)
    else:
        groups = groups.to(preds.device).long().clamp_min(0)
        width = int(groups.max().item()) + 1 if groups.numel() else 1
        key = torch.arange(b, device=preds.device)[:, None] * width + groups
    answers = torch.unique(key[scored]).numel()
    wrong = torch.unique(key[scored & ~hit]).numel()
    return Metrics(
        correct=int(hit.sum().item()),
        scored=int(scored.sum().item()),
        exact=answers - wrong,
        examples=answers,
    )
