"""Task specs, batches and the generator base class shared by every task kind.

A recipe's ``task`` section names a kind; :class:`TaskSpec` validates it against the spec class
registered for that kind (:data:`hybridkit.registry.TASKS`), exactly like ``LayerSpec`` does for
layers. The union stays open: a user's own kind registered with ``@register_task`` from another
package is validated, built and trained like the built-in ones (``examples/custom_task.py``).

Conventions shared by every task (``docs/tasks.md`` section 0):

* A generator returns ``inputs`` and ``targets`` of the same length. ``targets[t]`` is the token the
  model must emit after reading ``inputs[0..t]``; positions that are not scored hold
  :data:`IGNORE_INDEX`, so ``F.cross_entropy(..., ignore_index=IGNORE_INDEX)`` trains on the answer
  only and :func:`hybridkit.tasks.metrics.score` scores the answer only.
* ``length`` is measured in the task's *natural unit* (documented per task): total input tokens for
  most tasks, number of bits / expression tokens for the state-tracking tasks, whose prompts add a
  fixed number of framing tokens (see :meth:`TaskSpec.token_length`).
* All randomness comes from ``numpy.random.Generator`` objects passed in (training) or derived from
  ``eval_seed`` and the length (evaluation), never from a global RNG, so runs are reproducible and
  evaluation sets do not depend on how much training data was drawn before.
"""

from __future__ import annotations

import functools
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, NoReturn

import numpy as np
import torch
from pydantic import (
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from hybridkit.errors import HybridkitError, RecipeError
from hybridkit.registry import TASKS, dispatch_kind
from hybridkit.schema import StrictModel, get_path, split_path

IGNORE_INDEX = -100
"""Target value of unscored positions (PyTorch's default ``ignore_index``)."""

MAX_LENGTH = 2**24
"""Longest length any task may be asked for (16M tokens): past it a recipe is a typo, and the
generators would allocate more memory than any machine has."""

MAX_VOCAB = 2**24
"""Largest vocabulary a task may ask for: the bound of ``model.vocab_size`` (``hybridkit/spec.py``),
so a larger one could never be trained; vocabulary knobs are bounded to stay within it."""

POSITION_META = ("answer_group",)
"""Meta keys holding one value per position ``(B, L)``; padded with -1 like the inputs."""


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


class LengthWeight(StrictModel):
    """One component of a training length mixture."""

    length: int = Field(gt=0, description="length in the task's natural unit")
    weight: float = Field(default=1.0, gt=0, description="relative sampling weight")


class CurriculumStage(StrictModel):
    """A stage of a length curriculum: for ``steps`` optimizer steps each example's length is
    drawn uniformly from the lengths in [min_len, max_len] the task can generate (e.g. only the
    even ones for MQAR, the odd ones for modular arithmetic without brackets)."""

    steps: int = Field(gt=0, description="optimizer steps spent in this stage")
    min_len: int = Field(gt=0)
    max_len: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> CurriculumStage:
        if self.min_len > self.max_len:
            raise ValueError(f"min_len={self.min_len} is larger than max_len={self.max_len}")
        return self


class TaskSpec(StrictModel):
    """Base of every task spec. Subclasses set ``kind: Literal["..."]`` and implement ``build``.

    Length fields are in the task's natural unit. ``eval_lengths`` defaults to
    ``[seq_len // 2, seq_len, 2, 4, 8 x seq_len]`` (the length-generalization protocol), each
    snapped down to a valid length of the task and dropped if the task cannot generate it; after
    validation it is always a list. The derived default is dumped as null, so changing
    ``seq_len`` later (or in a reloaded recipe) re-derives it.

    Problems are reported as pydantic errors located at the offending key (``seq_len``,
    ``curriculum.0``, ``eval_lengths.2``, a knob), so a recipe loader can print ``task.<key>``.
    """

    kind: str
    seq_len: int = Field(default=128, gt=0, description="training length (natural unit)")
    length_mixture: list[LengthWeight] | None = Field(
        default=None, description="train on several lengths, drawn per example by weight"
    )
    curriculum: list[CurriculumStage] | None = Field(
        default=None, description="length stages; the last stage stays after its steps run out"
    )
    eval_lengths: list[Annotated[int, Field(gt=0)]] | None = Field(
        default=None, description="fixed evaluation lengths; default 0.5/1/2/4/8 x seq_len"
    )
    eval_examples: int = Field(
        default=500, gt=0, le=10**7, description="examples per evaluation length"
    )
    eval_seed: int = Field(default=1234, ge=0, description="seed of the fixed evaluation sets")
    seed: int | None = Field(
        default=None,
        ge=0,
        description="seed of the training data stream only; null = train.seed, else the recipe's",
    )

    def __setattr__(self, name: str, value: Any) -> None:
        # pydantic applies an assignment before the model validators run, so a rejected value
        # would otherwise stay on the spec; restore the previous state instead.
        saved = (dict(self.__dict__), set(self.__pydantic_fields_set__))
        try:
            super().__setattr__(name, value)
        except ValidationError:
            self.__dict__.clear()
            self.__dict__.update(saved[0])
            self.__pydantic_fields_set__.clear()
            self.__pydantic_fields_set__.update(saved[1])
            raise

    @model_validator(mode="wrap")
    @classmethod
    def _dispatch_on_kind(cls, data: Any, handler: Any) -> Any:
        return dispatch_kind(cls, TaskSpec, data, handler, TASKS, lambda entry: entry)

    @field_validator("length_mixture", "curriculum")
    @classmethod
    def _not_empty(cls, value: list | None) -> list | None:
        if value is not None and not value:
            raise ValueError("must not be empty; leave it out (null) to train at seq_len")
        return value

    @field_validator("length_mixture")
    @classmethod
    def _weights_sum(cls, value: list | None) -> list | None:
        """Each weight is positive; their sum must be a finite number too (1e308 twice is not),
        or the sampling probabilities are not defined."""
        if value is not None and not math.isfinite(sum(item.weight for item in value)):
            raise ValueError("the weights must have a finite sum (they are relative: try 1, 2, 3)")
        return value

    @field_validator("eval_lengths")
    @classmethod
    def _eval_lengths_positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and not value:
            raise ValueError("must be a non-empty list of positive lengths")
        return value

    @model_validator(mode="after")
    def _check_lengths(self) -> TaskSpec:
        if type(self) is TaskSpec:
            return self
        if "eval_lengths" not in self.model_fields_set or self.eval_lengths is None:
            # Written to __dict__ and marked unset: re-derived if seq_len changes later, and
            # dumped as null (see _dump_eval_lengths) so a reloaded recipe derives it again.
            self.__dict__["eval_lengths"] = self._default_eval_lengths()
            self.__pydantic_fields_set__.discard("eval_lengths")
        problems: list[tuple[str, str]] = []
        if self.length_mixture is not None and self.curriculum is not None:
            problems.append(
                ("curriculum", "length_mixture and curriculum are mutually exclusive; set one")
            )
        too_long = [
            (key, f"length {length} is too long; allowed: at most {MAX_LENGTH}")
            for key, length in self._lengths_to_check()
            + [
                (f"curriculum.{i}.max_len", stage.max_len)
                for i, stage in enumerate(self.curriculum or [])
            ]
            if length > MAX_LENGTH
        ]
        if too_long:  # the checks below would compute with these lengths
            raise self._error(problems + too_long)
        problems += self.check()
        for key, length in self._lengths_to_check():
            problem = self.length_problem(length)
            if problem is not None:
                problems.append((key, problem))
        for i, stage in enumerate(self.curriculum or []):
            if not self._any_valid(stage.min_len, stage.max_len):
                problems.append(
                    (f"curriculum.{i}", f"no valid length in [{stage.min_len}, {stage.max_len}]")
                )
        if problems:
            raise self._error(problems)
        return self

    def _error(self, problems: list[tuple[str, str]]) -> ValidationError:
        """One error per (dotted key, message), located at the key so that a recipe loader
        reports e.g. ``task.vocab_size`` instead of just ``task``."""
        details = []
        for key, message in dict.fromkeys(problems):
            loc = split_path(key)
            details.append(
                InitErrorDetails(
                    type=PydanticCustomError("task_spec", "{message}", {"message": message}),
                    loc=loc,
                    input=get_path(self, loc),
                )
            )
        return ValidationError.from_exception_data(type(self).__name__, details)

    @field_serializer("eval_lengths")
    def _dump_eval_lengths(self, value: list[int] | None) -> list[int] | None:
        return value if "eval_lengths" in self.model_fields_set else None

    def _default_eval_lengths(self) -> list[int]:
        # Derived lengths the task cannot generate (e.g. 0.5 x seq_len leaving no room for the
        # MQAR queries) are dropped rather than reported: the user never wrote them.
        raw = [max(1, self.seq_len // 2), self.seq_len] + [f * self.seq_len for f in (2, 4, 8)]
        snapped = dict.fromkeys(self.snap_length(n) for n in raw)
        # ... as are those past MAX_LENGTH, which an eval length the user wrote may not be
        valid = [n for n in snapped if 0 < n <= MAX_LENGTH and self.length_problem(n) is None]
        return valid or [self.seq_len]

    def _lengths_to_check(self) -> list[tuple[str, int]]:
        """Every fixed length a run will generate, with the key it comes from."""
        out = [("seq_len", self.seq_len)]
        for i, item in enumerate(self.length_mixture or []):
            out.append((f"length_mixture.{i}.length", item.length))
        if "eval_lengths" in self.model_fields_set:
            for i, length in enumerate(self.eval_lengths or []):
                out.append((f"eval_lengths.{i}", length))
        return out

    def _any_valid(self, lo: int, hi: int) -> bool:
        """Whether [lo, hi] holds a length the task can generate.

        Valid lengths are a lower bound plus a parity or step in every task we know, so the
        ends of a wide range and a sample of its middle decide; a range of millions is never
        walked length by length (validation must stay fast for any input).
        """
        if hi - lo <= 4096:
            candidates: Iterable[int] = range(lo, hi + 1)
        else:
            middle = range(lo + 2048, hi - 2048, max(1, (hi - lo) // 1024))
            candidates = itertools.chain(range(lo, lo + 2048), range(hi - 2047, hi + 1), middle)
        return any(self.length_problem(n) is None for n in candidates)

    def valid_lengths(self, lo: int, hi: int) -> list[int]:
        """The lengths in [lo, hi] this task can generate (curriculum draws pick among them)."""
        return [n for n in range(lo, hi + 1) if self.length_problem(n) is None]

    def max_train_length(self) -> int:
        """Longest length training can draw (for vocabulary, memory and positional limits)."""
        if self.length_mixture is not None:
            return max(item.length for item in self.length_mixture)
        if self.curriculum is not None:
            return max(stage.max_len for stage in self.curriculum)
        return self.seq_len

    def train_lengths_text(self) -> str:
        """The lengths training draws, for reports: ``64``, ``32, 64 (mixture)``, ``8-64
        (curriculum)`` (``seq_len`` alone says only the longest of a mixture)."""
        if self.length_mixture is not None:
            return ", ".join(str(item.length) for item in self.length_mixture) + " (mixture)"
        if self.curriculum is not None:
            lo = min(stage.min_len for stage in self.curriculum)
            return f"{lo}-{self.max_train_length()} (curriculum)"
        return str(self.seq_len)

    def unreached_curriculum(self, steps: int) -> str | None:
        """Why a run of ``steps`` optimizer steps never reaches the last curriculum stages (None
        when it reaches every stage or has no curriculum): such a run stops at shorter lengths
        than the recipe reads as its training length."""
        stages = self.curriculum or []
        start = 0
        for i, stage in enumerate(stages):
            if start >= steps:
                longest = max(s.max_len for s in stages[:i])
                total = sum(s.steps for s in stages[:-1]) + 1
                last = len(stages) - 1
                never = f"stage {i} never runs" if i == last else f"stages {i}..{last} never run"
                return (
                    f"train.steps {steps} ends before task.curriculum.{i} (from step {start}): "
                    f"{never}, so training stops at length "
                    f"{longest}, not {self.max_train_length()}; at least {total} steps reach "
                    "every stage"
                )
            start += stage.steps
        return None

    # --- hooks for task kinds -----------------------------------------------------------------
    def check(self) -> list[tuple[str, str]]:
        """Cross-field problems of the knobs as ``[(dotted key, message), ...]`` (the
        ``LayerSpec.check`` convention); lengths are checked separately by ``length_problem``."""
        return []

    def length_problem(self, length: int) -> str | None:
        """Why ``length`` cannot be generated (``None`` if it can); checked for every length."""
        return None if length >= 1 else f"length must be positive, got {length}"

    def snap_length(self, length: int) -> int:
        """Nearest valid length <= ``length`` (e.g. even for MQAR); used for derived defaults."""
        return length

    def token_length(self, length: int) -> int:
        """Number of input tokens of an example of natural length ``length``."""
        return length

    def build(self) -> Task:
        """Instantiate the generator of this task kind."""
        raise NotImplementedError(f"task kind {self.kind!r} does not implement build()")


# --------------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """``inputs`` and ``targets`` (B, L) int64, plus per-example ``meta``.

    ``meta`` values are tensors whose first dimension is B, or lists of length B. Every task sets
    ``meta["length"]`` (natural length per example). ``meta["answer_group"]`` (B, L), when present,
    splits the scored positions of one sequence into several answers that ``ex_match`` counts
    separately (multi-query NIAH); without it a sequence is one answer.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    meta: dict[str, torch.Tensor | list] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """Copy tensors (including tensor meta) to ``device``."""
        meta = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.meta.items()}
        return Batch(self.inputs.to(device), self.targets.to(device), meta)

    def select(self, index: slice) -> Batch:
        """Rows ``index`` of the batch (meta sliced alike)."""
        meta = {k: v[index] for k, v in self.meta.items()}
        return Batch(self.inputs[index], self.targets[index], meta)

    def split(self, size: int) -> list[Batch]:
        """Minibatches of at most ``size`` examples, e.g. to evaluate a large eval set."""
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    @staticmethod
    def concat(batches: Sequence[Batch], pad_id: int) -> Batch:
        """Stack batches of possibly different lengths, right-padding to the longest.

        Right padding is invisible to a causal model (no real position attends to or is updated
        by a later one) and padded targets are IGNORE_INDEX, so padding never affects loss or
        metrics.
        """
        if len(batches) == 1:
            return batches[0]
        width = max(b.inputs.shape[1] for b in batches)

        def pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        inputs = torch.cat([pad(b.inputs, pad_id) for b in batches])
        targets = torch.cat([pad(b.targets, IGNORE_INDEX) for b in batches])
        meta: dict[str, torch.Tensor | list] = {}
        for key in batches[0].meta:
            parts = [b.meta[key] for b in batches]
            if key in POSITION_META:
                meta[key] = torch.cat([pad(p, -1) for p in parts])
            elif torch.is_tensor(parts[0]):
                meta[key] = torch.cat(parts)
            else:
                meta[key] = [x for p in parts for x in p]
        return Batch(inputs, targets, meta)


def make_batch(
    inputs: np.ndarray, targets: np.ndarray, length: int, **meta: torch.Tensor | list
) -> Batch:
    """Wrap numpy arrays into a :class:`Batch` with ``meta["length"]`` filled in."""
    n = inputs.shape[0]
    meta = {"length": torch.full((n,), length, dtype=torch.long), **meta}
    return Batch(
        torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64)),
        meta,
    )


# --------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------


class TaskError(HybridkitError):
    """A task's generator broke the Task API contract (docs/tasks.md section 9): a bad batch or
    a missing attribute. Caught where batches are made, it names the task and what is wrong,
    instead of an ``IndexError`` from the embedding or a shape error from the loss."""


def check_model_vocab(task: Task, model_vocab: int, kind: str, source: str = "<recipe>") -> None:
    """Refuse a model whose embedding cannot hold every token ``task`` emits: training, ``eval``
    and ``generate --task-examples`` would otherwise stop in the embedding with an index error
    (a ``--set task...`` override can grow a trained run's task past its model)."""
    if task.vocab_size > model_vocab:
        raise RecipeError(
            source,
            [
                (
                    "model.vocab_size",
                    f"{model_vocab} is smaller than the vocabulary of task {kind!r} "
                    f"({task.vocab_size}); allowed: >= {task.vocab_size}",
                )
            ],
        )


class Task(ABC):
    """A seeded generator of one task kind.

    Subclasses set ``vocab_size`` (the model's vocabulary must be at least this), ``chance`` (the
    probability that a uniform guess of one scored token is right, for ``scaled_acc``) and
    ``pad_id``, and implement :meth:`sample`. Generators never look at a model: answers are a
    function of the inputs alone, which the tests recompute with independent evaluators.

    Every batch a subclass's ``sample`` (or an overridden ``eval_set``) returns is checked
    against the contract by :meth:`check_batch` on its way out (the wrapping is installed by
    ``__init_subclass__``, so a user's task gets it without calling anything).
    """

    vocab_size: int
    chance: float
    pad_id: int = 0

    def __init__(self, spec: TaskSpec):
        # A private copy: later edits of the recipe cannot change a running generator.
        self.spec = spec.model_copy(deep=True)
        self._eval_cache: dict[int, Batch] = {}
        self._stage_lengths: dict[int, np.ndarray] = {}
        self._checked_lengths: set[int] = set()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "sample" in cls.__dict__:
            cls.sample = _checked_sample(cls.__dict__["sample"])  # type: ignore[method-assign]
        if "eval_set" in cls.__dict__:
            cls.eval_set = _checked_eval_set(cls.__dict__["eval_set"])  # type: ignore[method-assign]

    # --- the contract -------------------------------------------------------------------------
    def check_attributes(self) -> None:
        """``vocab_size``, ``chance`` and ``pad_id`` are set and sensible (raises TaskError)."""
        name = f"task {self.spec.kind!r} ({type(self).__qualname__})"
        vocab = getattr(self, "vocab_size", None)
        if isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)) or vocab < 1:
            raise TaskError(
                f"{name} must set vocab_size to a positive int (ids are in [0, vocab_size)); "
                f"got {vocab!r}"
            )
        chance = getattr(self, "chance", None)
        if not isinstance(chance, (int, float, np.floating)) or not 0 <= chance < 1:
            raise TaskError(
                f"{name} must set chance, the probability in [0, 1) that a uniform guess of one "
                f"scored token is right; got {chance!r}"
            )
        pad = getattr(self, "pad_id", None)
        if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or not 0 <= pad < vocab:
            raise TaskError(f"{name} must set pad_id to an id in [0, {vocab}); got {pad!r}")

    def check_batch(self, batch: Any, *, n: int, length: int, where: str = "") -> None:
        """Raise :class:`TaskError` unless ``batch`` keeps the contract for ``n`` examples of
        natural length ``length`` (docs/tasks.md section 9.3).

        The first batch of each length gets every check; later ones the cheap ones (type,
        shapes, dtypes, the id ranges and that something is scored: a few element-wise passes,
        far below the cost of a forward pass). ``where`` names the call in the message.
        """
        first = length not in getattr(self, "_checked_lengths", set())
        if first:
            self.check_attributes()
        prefix = f"task {self.spec.kind!r} returned a bad batch from {where or 'sample'}: "

        def fail(problem: str) -> NoReturn:
            raise TaskError(prefix + problem)

        if not isinstance(batch, Batch):
            fail(f"expected a Batch (see make_batch), got {type(batch).__name__}")
        inputs, targets = batch.inputs, batch.targets
        for name, t in (("inputs", inputs), ("targets", targets)):
            if not torch.is_tensor(t):
                fail(f"{name} is a {type(t).__name__}, not a torch tensor (make_batch converts)")
            if t.dtype != torch.int64:
                fail(f"{name} are {t.dtype}; ids must be torch.int64 (make_batch converts)")
            if t.dim() != 2:
                fail(f"{name} have shape {tuple(t.shape)}; expected (n, tokens) = ({n}, T)")
        if inputs.shape != targets.shape:
            fail(
                f"targets have shape {tuple(targets.shape)} but inputs {tuple(inputs.shape)}; "
                "targets[i, t] is the token expected after inputs[i, :t+1], so the shapes match"
            )
        if inputs.shape[0] != n:
            fail(f"{inputs.shape[0]} examples were returned for n={n}")
        width = self.spec.token_length(length)
        if inputs.shape[1] != width:
            fail(
                f"{inputs.shape[1]} tokens per example, but token_length({length}) = {width}; "
                "every row is token_length(length) wide (pad on the right: pad_id inputs, "
                "IGNORE_INDEX targets), or fix token_length"
            )
        vocab = int(self.vocab_size)
        outside = (inputs < 0) | (inputs >= vocab)
        if outside.any():
            row, pos = outside.nonzero()[0].tolist()
            fail(
                f"input id {int(inputs[row, pos])} at row {row}, position {pos} is outside the "
                f"task's vocabulary [0, {vocab}) (vocab_size {vocab})"
            )
        scored = targets != IGNORE_INDEX
        outside = scored & ((targets < 0) | (targets >= vocab))
        if outside.any():
            row, pos = outside.nonzero()[0].tolist()
            fail(
                f"target {int(targets[row, pos])} at row {row}, position {pos} is neither an id "
                f"in [0, {vocab}) nor IGNORE_INDEX ({IGNORE_INDEX})"
            )
        if not first:
            if n and not scored.any():
                fail(f"no position is scored (every target is IGNORE_INDEX = {IGNORE_INDEX})")
            return
        empty = (~scored.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            fail(
                f"row {empty[0]} has no scored position (every target is IGNORE_INDEX = "
                f"{IGNORE_INDEX}); each example needs at least one ({len(empty)} rows have none)"
            )
        if "length" not in batch.meta:
            fail('meta["length"] is missing (make_batch fills it in)')
        for key, value in batch.meta.items():
            rows = len(value) if isinstance(value, list) else None
            if torch.is_tensor(value) and value.dim():
                rows = value.shape[0]
            if rows != n:
                fail(f"meta[{key!r}] must be a tensor with first dimension {n} or a list of {n}")
            if key in POSITION_META and tuple(value.shape) != tuple(inputs.shape):
                fail(f"meta[{key!r}] has shape {tuple(value.shape)}, not the inputs' shape")
        self._checked_lengths.add(length)

    @abstractmethod
    def sample(self, n: int, length: int, rng: np.random.Generator) -> Batch:
        """``n`` examples of natural length ``length``."""

    # --- training -----------------------------------------------------------------------------
    def train_rng(self, step: int, default_seed: int = 0) -> np.random.Generator:
        """RNG of the training batch of ``step``: a function of the data seed and ``step`` only.

        The data seed is ``spec.seed`` when set, else ``default_seed`` (the trainer passes its
        init seed). Keeping it apart from the init seed lets a study vary the initialisation on
        the same data stream, or the data on the same initialisation; deriving it per step is
        what lets a resumed run draw exactly the batches an uninterrupted one would have.
        """
        seed = self.spec.seed if self.spec.seed is not None else default_seed
        return np.random.default_rng(np.random.SeedSequence([seed, step]))

    def lengths_at(self, step: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Natural length of each example of the training batch at ``step``."""
        spec = self.spec
        if spec.length_mixture is not None:
            lengths = np.array([m.length for m in spec.length_mixture])
            weights = np.array([m.weight for m in spec.length_mixture], dtype=np.float64)
            return rng.choice(lengths, size=batch_size, p=weights / weights.sum())
        if spec.curriculum is not None:
            index = self.stage_index(step)
            if index not in self._stage_lengths:
                stage = spec.curriculum[index]
                self._stage_lengths[index] = np.array(
                    spec.valid_lengths(stage.min_len, stage.max_len)
                )
            return rng.choice(self._stage_lengths[index], size=batch_size)
        return np.full(batch_size, spec.seq_len)

    def stage_index(self, step: int) -> int:
        """Curriculum stage of ``step`` (0-based); the last stage stays once all have run."""
        stages = self.spec.curriculum
        if not stages:
            raise ValueError("this task has no curriculum")
        end = 0
        for i, stage in enumerate(stages):
            end += stage.steps
            if step < end:
                return i
        return len(stages) - 1

    def stage_at(self, step: int) -> CurriculumStage:
        """The curriculum stage (its steps and length range) active at ``step``."""
        return self.spec.curriculum[self.stage_index(step)]

    def train_batch(self, step: int, batch_size: int, rng: np.random.Generator) -> Batch:
        """A fresh training batch; lengths follow the mixture/curriculum (else ``seq_len``).

        Examples of different lengths are right-padded with ``pad_id`` inputs and IGNORE_INDEX
        targets. Examples are grouped by length (so the order within the batch is by length);
        the order does not matter for a loss averaged over the batch.
        """
        lengths = self.lengths_at(step, batch_size, rng)
        values, counts = np.unique(lengths, return_counts=True)
        parts = [self.sample(int(c), int(v), rng) for v, c in zip(values, counts)]
        return Batch.concat(parts, self.pad_id)

    # --- evaluation ---------------------------------------------------------------------------
    @property
    def eval_lengths(self) -> list[int]:
        return list(self.spec.eval_lengths or [])

    def eval_rng(self, length: int) -> np.random.Generator:
        """RNG of the evaluation set at ``length``: a function of ``eval_seed`` and ``length``."""
        return np.random.default_rng(np.random.SeedSequence([self.spec.eval_seed, length]))

    def eval_set(self, length: int) -> Batch:
        """The fixed evaluation set at ``length`` (``eval_examples`` examples).

        Depends only on the spec, ``eval_seed`` and ``length`` -- not on training draws or call
        order -- so every run and every arm is scored on the same examples. Cached per length;
        treat the returned batch as read-only.
        """
        if length not in self._eval_cache:
            self.check_length(length)
            self._eval_cache[length] = self.sample(
                self.spec.eval_examples, length, self.eval_rng(length)
            )
        return self._eval_cache[length]

    # --- helpers ------------------------------------------------------------------------------
    def check_length(self, length: int) -> None:
        """Raise ``ValueError`` if the task cannot generate ``length``."""
        problem = self.spec.length_problem(length)
        if problem is not None:
            raise ValueError(f"task {self.spec.kind!r}: {problem}")


def _checked_sample(sample: Any) -> Any:
    """``sample`` of a task class, with its batches checked against the contract."""

    @functools.wraps(sample)
    def checked(self: Task, n: int, length: int, rng: np.random.Generator) -> Batch:
        batch = sample(self, n, length, rng)
        where = f"{type(self).__qualname__}.sample(n={n}, length={length})"
        self.check_batch(batch, n=n, length=length, where=where)
        return batch

    return checked


def _checked_eval_set(eval_set: Any) -> Any:
    """An overridden ``eval_set`` (file tasks read their held-out tail), checked alike."""

    @functools.wraps(eval_set)
    def checked(self: Task, length: int) -> Batch:
        batch = eval_set(self, length)
        where = f"{type(self).__qualname__}.eval_set({length})"
        self.check_batch(batch, n=self.spec.eval_examples, length=length, where=where)
        return batch

    return checked


# --------------------------------------------------------------------------------------------
# Sampling helpers shared by the generators
# --------------------------------------------------------------------------------------------


def sample_distinct(rng: np.random.Generator, n: int, pool: int, k: int) -> np.ndarray:
    """(n, k) ints in [0, pool), distinct within each row, in uniformly random order.

    Small samples from a large pool (k * k <= pool) use rejection: draw with replacement and
    redraw the rows that repeat a value (rare by the birthday bound), which costs O(n * k)
    memory. Otherwise take the k smallest of ``pool`` uniforms per row (argpartition) ordered by
    their uniform, which makes both the subset and its order uniform. The branch depends only on
    the shape, so results stay deterministic for a given generator state.
    """
    if k > pool:
        raise ValueError(f"cannot draw {k} distinct values from {pool}")
    if k <= 1 or k * k <= pool:
        out = rng.integers(0, pool, size=(n, k))
        while k > 1:
            s = np.sort(out, axis=1)
            bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
            if bad.size == 0:
                break
            out[bad] = rng.integers(0, pool, size=(bad.size, k))
        return out.astype(np.int64)
    u = rng.random((n, pool))
    idx = np.argpartition(u, k - 1, axis=1)[:, :k] if k < pool else np.tile(np.arange(pool), (n, 1))
    order = np.argsort(np.take_along_axis(u, idx, axis=1), axis=1)
    return np.take_along_axis(idx, order, axis=1).astype(np.int64)


def weighted_distinct(rng: np.random.Generator, log_weights: np.ndarray, n: int, k: int):
    """(n, k) distinct indices per row, drawn without replacement with P proportional to weights.

    Gumbel-top-k: adding Gumbel noise to the log-weights and keeping the k largest is equivalent
    to drawing k times without replacement proportionally to the weights.
    """
    keys = log_weights[None, :] + rng.gumbel(size=(n, log_weights.shape[0]))
    idx = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    return idx.astype(np.int64)


def long_tensor(values: np.ndarray | Sequence[int]) -> torch.Tensor:
    """int64 tensor from a numpy array or list (for ``meta`` entries)."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64).copy())
