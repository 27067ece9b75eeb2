"""Modular arithmetic without / with brackets (Mamba-3 Table 5b; docs/tasks.md T10).

Vocabulary (M = ``modulus``, default 5; size 8 + M, the same with and without brackets so one
model can be scored on both)::

    PAD = 0, BOS = 1, EQ = 2, PLUS = 3, MINUS = 4, TIMES = 5, LPAREN = 6, RPAREN = 7,
    digits 0 .. M-1 = 8 .. 8+M-1

Inputs are ``BOS expression EQ`` (n + 2 tokens for an expression of n tokens); the only scored
position is EQ, whose target is the digit token of the value mod M. Natural unit of length:
expression tokens n. Chance 1 / M; report scaled accuracy.

* **Without brackets** (xLSTM semantics): n must be odd; (n + 1) / 2 uniform digits alternating
  with (n - 1) / 2 operators drawn from ``ops`` (default ``+-*``), evaluated with the usual
  precedence (``*`` before ``+``/``-``, left to right), result mod M. Curriculum draws of even n
  are snapped down to n - 1.
* **With brackets** (Grazzi et al. semantics): an expression of exactly n tokens is built
  recursively: n = 1 a digit; n = 2 ``- digit``; n = 3 ``( digit )``; n = 4 ``( - digit )``;
  n >= 5 ``( left op right )`` with the n - 3 inner tokens split uniformly at random between
  ``left`` and ``right`` (each at least 1 token) and ``op`` from ``ops`` (default ``+-``). The
  unary minus is the MINUS token. Every n >= 1 is valid.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from hybridkit.registry import register_task
from hybridkit.tasks.base import IGNORE_INDEX, MAX_VOCAB, Batch, Task, TaskSpec, make_batch

PAD, BOS, EQ, PLUS, MINUS, TIMES, LPAREN, RPAREN, DIGIT0 = range(9)
OP_TOKENS = {"+": PLUS, "-": MINUS, "*": TIMES}


@register_task
class ModArithSpec(TaskSpec):
    """Recipe keys of the ``modarith`` task."""

    kind: Literal["modarith"] = "modarith"
    seq_len: int = Field(default=39, gt=0, description="expression tokens n")
    brackets: bool = Field(default=False, description="recursive bracketed expressions")
    # vocabulary 8 + M; the bound also keeps products of two residues exact in int64
    modulus: int = Field(default=5, ge=2, le=MAX_VOCAB - 8, description="M; numbers are 0 .. M-1")
    ops: str | None = Field(
        default=None, description="operator characters from '+-*'; default '+-*' / '+-' (brackets)"
    )

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, value: str | None) -> str | None:
        if value is not None and (not value or set(value) - set(OP_TOKENS)):
            raise ValueError(
                f"ops must be a non-empty string of characters from '+-*', got {value!r}"
            )
        return value

    @property
    def resolved_ops(self) -> str:
        if self.ops is not None:
            return "".join(dict.fromkeys(self.ops))
        return "+-" if self.brackets else "+-*"

    def length_problem(self, length: int) -> str | None:
        if length < 1:
            return f"expression length must be positive, got {length}"
        if not self.brackets and length % 2 == 0:
            return f"without brackets the expression length must be odd, got {length}"
        return None

    def snap_length(self, length: int) -> int:
        if self.brackets or length % 2:
            return length
        return length - 1

    def token_length(self, length: int) -> int:
        return length + 2

    def build(self) -> ModArithTask:
        return ModArithTask(self)


class ModArithTask(Task):
    """Generator of :class:`ModArithSpec` examples."""

    spec: ModArithSpec

    def __init__(self, spec: ModArithSpec):
        super().__init__(spec)
        self.vocab_size = DIGIT0 + spec.modulus
        self.chance = 1.0 / spec.modulus
        self.pad_id = PAD
        self.op_tokens = np.array([OP_TOKENS[c] for c in spec.resolved_ops], dtype=np.int64)

    def sample(self, n: int, length: int, rng: np.random.Generator) -> Batch:
        self.check_length(length)
        if self.spec.brackets:
            exprs, values = self._bracketed(n, length, rng)
        else:
            exprs, values = self._flat(n, length, rng)
        inputs = np.empty((n, length + 2), dtype=np.int64)
        inputs[:, 0], inputs[:, 1:-1], inputs[:, -1] = BOS, exprs, EQ
        targets = np.full_like(inputs, IGNORE_INDEX)
        targets[:, -1] = DIGIT0 + values
        return make_batch(inputs, targets, length)

    def _flat(self, n: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        m = self.spec.modulus
        nums = rng.integers(0, m, size=(n, (length + 1) // 2))
        ops = self.op_tokens[rng.integers(0, len(self.op_tokens), size=(n, length // 2))]
        exprs = np.empty((n, length), dtype=np.int64)
        exprs[:, 0::2], exprs[:, 1::2] = DIGIT0 + nums, ops
        # Precedence by a running sum of finished terms plus the current signed product term,
        # vectorized over examples: '*' extends the term, '+'/'-' closes it and starts the next.
        total = np.zeros(n, dtype=np.int64)
        term = nums[:, 0] % m
        for i in range(ops.shape[1]):
            op, x = ops[:, i], nums[:, i + 1]
            is_mul = op == TIMES
            total = np.where(is_mul, total, (total + term) % m)
            term = np.where(is_mul, term * x, np.where(op == PLUS, x, -x)) % m
        return exprs, (total + term) % m

    def _bracketed(
        self, n: int, length: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        exprs = np.empty((n, length), dtype=np.int64)
        values = np.empty(n, dtype=np.int64)
        # Each node uses at most 2 random draws and there are at most `length` nodes.
        draws = rng.random((n, 2 * length + 2))
        for i in range(n):
            tokens, value = self._one_bracketed(length, draws[i].tolist())
            exprs[i], values[i] = tokens, value
        return exprs, values

    def _one_bracketed(self, length: int, draws: list[float]) -> tuple[list[int], int]:
        """Tokens and value of one expression; an explicit stack instead of recursion."""
        m, ops = self.spec.modulus, self.op_tokens.tolist()
        tokens: list[int] = []
        vals: list[int] = []
        k = 0
        stack: list[tuple[str, int]] = [("gen", length)]
        while stack:
            what, arg = stack.pop()
            if what == "emit":
                tokens.append(arg)
            elif what == "apply":
                b, a = vals.pop(), vals.pop()
                vals.append((a + b if arg == PLUS else a - b if arg == MINUS else a * b) % m)
            elif arg <= 4:
                d = int(draws[k] * m)
                k += 1
                neg = arg in (2, 4)
                inner = [MINUS, DIGIT0 + d] if neg else [DIGIT0 + d]
                tokens.extend([LPAREN, *inner, RPAREN] if arg >= 3 else inner)
                vals.append(-d % m if neg else d)
            else:
                left = 1 + int(draws[k] * (arg - 4))
                op = ops[int(draws[k + 1] * len(ops))]
                k += 2
                tokens.append(LPAREN)
                stack.extend(
                    [("emit", RPAREN), ("apply", op), ("gen", arg - 3 - left), ("emit", op)]
                )
                stack.append(("gen", left))
        return tokens, vals[0]
