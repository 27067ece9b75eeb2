"""Synthetic needle-in-a-haystack (RULER analog; docs/tasks.md section 2.1, T3, T4).

Vocabulary (A = ``num_adjectives``, N = ``num_nouns``, H = ``haystack_vocab``)::

    PAD = 0, BOS = 1, NEEDLE = 2, QUERY = 3, IS = 4, DOT = 5,
    digits 0-9 = 6 .. 15, hex 0-f = 16 .. 31,
    adjectives = 32 .. 32+A-1, nouns = 32+A .. 32+A+N-1, haystack words = 32+A+N .. 32+A+N+H-1

    vocab_size = 32 + A + N + H   (defaults 256/256/2048: 2592; tiny 16/16/64: 128)

A key is an (adjective, noun) pair; a value is ``value_digits`` digits with a non-zero first
digit ("number") or ``uuid_length`` hex tokens ("uuid"). Example of ``seq_len`` = L input tokens::

    BOS  haystack with needles  QUERY adj noun IS  value DOT   [QUERY ... for multi-query]
    needle = NEEDLE adj noun IS value DOT

Targets are scored on the answer only: the value tokens and the closing DOT of each answer (the
model emits the value after reading ``IS``, then DOT). With ``num_values`` values for one key
(multivalue) the answer is every value in order of appearance, each followed by DOT. In
multi-query each query is its own answer for ``ex_match`` (``meta["answer_group"]``).

Haystacks (fixed per ``haystack_seed``, so training and evaluation share them):

* ``noise``: one fixed ``noise_sentence_len``-token sentence (random haystack words, last token
  DOT) repeated and cut to length -- the repeated passage of RULER's NIAH-single-1.
* ``essay``: a first-order Markov chain over the H haystack words whose rows put Zipf weights
  (1 / rank) on 64 random successors, with DOT overwriting one token every ``sentence_len``
  tokens on average (sentences of 0.75x-1.25x that length) -- stands in for Paul Graham essays.
* ``needles``: made only of distractor needles with other keys (RULER multikey-2), cut at the
  front so that no truncated needle runs into the question.

Needles go to the sentence boundary nearest to depth d * haystack length, with d drawn from
``num_depths`` evenly spaced depths in [0, 1]; ``meta["depth"]`` holds d of the (first) queried
needle and ``meta["depths"]`` the depths of all needles in order of appearance.

Variants (``haystack`` / ``value_type`` override the haystack and value kind of any variant):

=========== ========= ====== ============================ ===========
variant     haystack  value  needles                      queries
=========== ========= ====== ============================ ===========
single_1    noise     number 1                            1
single_2    essay     number 1                            1
single_3    essay     uuid   1                            1
multikey    essay     number num_needles distinct keys    1
multivalue  essay     number 1 key x num_values values    1
multiquery  essay     number num_needles distinct keys    num_queries
mixed       one of single_1/2/3 per example, uniformly
=========== ========= ====== ============================ ===========

Natural unit of length: input tokens. Chance per scored token: 1/10 for number answers and 1/16
for uuid answers (the DOT is counted like a value token; averaged by answer tokens for
``mixed``), which makes scaled accuracy slightly conservative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from hybridkit.registry import register_task
from hybridkit.tasks.base import (
    IGNORE_INDEX,
    MAX_LENGTH,
    MAX_VOCAB,
    Batch,
    Task,
    TaskSpec,
    long_tensor,
    sample_distinct,
)

PAD, BOS, NEEDLE, QUERY, IS, DOT = range(6)
DIGIT0, HEX0, ADJ0 = 6, 16, 32
MIN_FILLER = 8  # haystack tokens an example must keep besides needles and questions
MARKOV_BRANCHING = 64  # successors per Markov state (Zipf weights over them)
SINGLES = ("single_1", "single_2", "single_3")
MAX_HAYSTACK_VOCAB = 2**18
"""Most haystack words: the essay's successor table is H x 64 int64 ids (128 MiB here, built
when the task is); larger than the vocabularies of real tokenizers (32K-256K)."""
MAX_KEY_WORDS = MAX_VOCAB // 4
"""Most adjectives, and most nouns: 32 + A + N + H then stays within the bound of
``model.vocab_size``."""

Variant = Literal[
    "single_1", "single_2", "single_3", "multikey", "multivalue", "multiquery", "mixed"
]


@dataclass(frozen=True)
class Layout:
    """Resolved structure of one (non-mixed) variant."""

    name: str
    haystack: str
    value_type: str
    n_keys: int
    n_values: int  # values per key
    n_queries: int
    value_len: int

    @property
    def needle_len(self) -> int:
        return 5 + self.value_len

    @property
    def needles_len(self) -> int:
        return self.n_keys * self.n_values * self.needle_len

    @property
    def answer_len(self) -> int:
        """Scored tokens of one query."""
        return self.n_values * (self.value_len + 1)

    @property
    def question_len(self) -> int:
        return self.n_queries * (4 + self.answer_len)

    def filler_len(self, length: int) -> int:
        # Full sequence: BOS + filler + needles + questions = length + 1 tokens.
        return length - self.question_len - self.needles_len


@register_task
class NIAHSpec(TaskSpec):
    """Recipe keys of the ``niah`` task."""

    kind: Literal["niah"] = "niah"
    seq_len: int = Field(default=512, gt=0, description="input tokens")
    variant: Variant = Field(default="single_1", description="RULER-style task variant")
    haystack: Literal["auto", "noise", "essay", "needles"] = Field(
        default="auto", description="override the variant's haystack"
    )
    value_type: Literal["auto", "number", "uuid"] = Field(
        default="auto", description="override the variant's value kind"
    )
    haystack_vocab: int = Field(
        default=2048, ge=2, le=MAX_HAYSTACK_VOCAB, description="H haystack words"
    )
    num_adjectives: int = Field(default=256, ge=1, le=MAX_KEY_WORDS, description="A key adjectives")
    num_nouns: int = Field(default=256, ge=1, le=MAX_KEY_WORDS, description="N key nouns")
    value_digits: int = Field(default=7, ge=1, description="digits of a number value")
    uuid_length: int = Field(default=32, ge=1, description="hex tokens of a uuid value")
    num_needles: int = Field(default=4, ge=1, description="keys of multikey / multiquery")
    num_values: int = Field(default=4, ge=1, description="values of the multivalue key")
    num_queries: int = Field(default=4, ge=1, description="queries of multiquery")
    # Sizes along the sequence (the depth grid and the noise sentence are arrays built with the
    # task): past the longest length a task may generate, they cannot change an example.
    num_depths: int = Field(
        default=40, ge=1, le=MAX_LENGTH, description="evenly spaced needle depths in [0, 1]"
    )
    sentence_len: int = Field(
        default=20, ge=2, le=MAX_LENGTH, description="mean essay sentence length"
    )
    noise_sentence_len: int = Field(
        default=24, ge=2, le=MAX_LENGTH, description="noise sentence length"
    )
    haystack_seed: int = Field(default=0, ge=0, description="seed of the fixed haystack sources")

    def layouts(self) -> dict[str, Layout]:
        """Layouts of the variants an example can take (three for ``mixed``)."""
        names = SINGLES if self.variant == "mixed" else (self.variant,)
        return {name: self._layout(name) for name in names}

    def _layout(self, name: str) -> Layout:
        haystack = "noise" if name == "single_1" else "essay"
        value_type = "uuid" if name == "single_3" else "number"
        keys, values, queries = 1, 1, 1
        if name in ("multikey", "multiquery"):
            keys = self.num_needles
        if name == "multivalue":
            values = self.num_values
        if name == "multiquery":
            queries = self.num_queries
        haystack = haystack if self.haystack == "auto" else self.haystack
        value_type = value_type if self.value_type == "auto" else self.value_type
        vlen = self.value_digits if value_type == "number" else self.uuid_length
        return Layout(name, haystack, value_type, keys, values, queries, vlen)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        n_pairs = self.num_adjectives * self.num_nouns
        for lay in self.layouts().values():
            if lay.n_queries > lay.n_keys:
                problems.append(
                    ("num_queries", f"num_queries={lay.n_queries} exceeds the {lay.n_keys} keys")
                )
            spare = 1 if lay.haystack == "needles" else 0
            if lay.n_keys + spare > n_pairs:
                problems.append(
                    (
                        "num_adjectives",
                        f"{lay.n_keys} distinct keys{' plus distractors' if spare else ''} need "
                        f"more than num_adjectives * num_nouns = {n_pairs} pairs",
                    )
                )
        return problems

    def length_problem(self, length: int) -> str | None:
        for lay in self.layouts().values():
            if lay.filler_len(length) < MIN_FILLER:
                need = lay.question_len + lay.needles_len + MIN_FILLER
                return (
                    f"NIAH length {length} is too short for {lay.name}: needles and questions "
                    f"take {lay.question_len + lay.needles_len} tokens; needs at least {need}"
                )
        return None

    def build(self) -> NIAHTask:
        return NIAHTask(self)


class NIAHTask(Task):
    """Generator of :class:`NIAHSpec` examples."""

    spec: NIAHSpec

    def __init__(self, spec: NIAHSpec):
        super().__init__(spec)
        a, n, h = spec.num_adjectives, spec.num_nouns, spec.haystack_vocab
        self.noun0 = ADJ0 + a
        self.hay0 = ADJ0 + a + n
        self.vocab_size = self.hay0 + h
        self.pad_id = PAD
        self.layouts = spec.layouts()
        weights = {
            name: lay.n_queries * lay.answer_len * (0.1 if lay.value_type == "number" else 1 / 16)
            for name, lay in self.layouts.items()
        }
        scored = sum(lay.n_queries * lay.answer_len for lay in self.layouts.values())
        self.chance = sum(weights.values()) / scored
        self.depth_grid = np.linspace(0.0, 1.0, spec.num_depths)

        # The haystack sources are part of the task definition: drawn once from haystack_seed.
        hay = np.random.default_rng(np.random.SeedSequence([spec.haystack_seed, 0x4E1A4]))
        self.noise_sentence = np.append(
            self.hay0 + hay.integers(0, h, size=spec.noise_sentence_len - 1), DOT
        )
        k = min(MARKOV_BRANCHING, h)
        self.successors = self.hay0 + sample_distinct(hay, h, h, k)  # (H, k) token ids
        zipf = 1.0 / np.arange(1, k + 1)
        self.rank_cdf = np.cumsum(zipf / zipf.sum())

    # --- haystacks ----------------------------------------------------------------------------
    def _noise(self, n: int, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
        tokens = np.tile(np.resize(self.noise_sentence, size), (n, 1))
        bounds = np.unique(np.append(np.arange(0, size + 1, len(self.noise_sentence)), size))
        return tokens, [bounds] * n

    def _essay(
        self, n: int, size: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        h = self.spec.haystack_vocab
        tokens = np.empty((n, size), dtype=np.int64)
        ranks = np.searchsorted(self.rank_cdf, rng.random((n, size)), side="right")
        ranks = np.minimum(ranks, self.successors.shape[1] - 1)
        state = rng.integers(0, h, size=n)
        for t in range(size):
            tok = self.successors[state, ranks[:, t]]
            tokens[:, t] = tok
            state = tok - self.hay0
        s = self.spec.sentence_len
        lo, hi = max(1, round(0.75 * s)), max(1, round(1.25 * s))
        lens = rng.integers(lo, hi + 1, size=(n, size // lo + 1))
        dots = np.cumsum(lens, axis=1) - 1  # sentence = words + closing DOT
        bounds = []
        for i in range(n):
            row = dots[i][dots[i] < size]
            tokens[i, row] = DOT
            bounds.append(np.unique(np.concatenate([[0], row + 1, [size]])))
        return tokens, bounds

    def _distractors(
        self, n: int, size: int, keys: np.ndarray, lay: Layout, rng: np.random.Generator
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        count = size // lay.needle_len + 1
        n_pairs = self.spec.num_adjectives * self.spec.num_nouns
        dkeys = rng.integers(0, n_pairs, size=(n, count))
        clash = (dkeys[:, :, None] == keys[:, None, :]).any(axis=2)
        while clash.any():  # distractor keys must differ from every real key
            dkeys[clash] = rng.integers(0, n_pairs, size=int(clash.sum()))
            clash = (dkeys[:, :, None] == keys[:, None, :]).any(axis=2)
        values = self._values(rng, (n, count), lay)
        needles = self._needle_tokens(dkeys, values)  # (n, count, needle_len)
        # Cut from the front: the partial needle then lacks its NEEDLE marker, instead of a
        # truncated needle running into the question at the end.
        tokens = needles.reshape(n, -1)[:, -size:] if size else needles.reshape(n, -1)[:, :0]
        bounds = np.unique(
            np.concatenate([[0], np.arange(size % lay.needle_len, size + 1, lay.needle_len)])
        )
        return tokens, [bounds] * n

    # --- pieces ---------------------------------------------------------------------------------
    def _values(self, rng: np.random.Generator, shape: tuple[int, ...], lay: Layout) -> np.ndarray:
        """Value token arrays of shape ``shape + (value_len,)``."""
        if lay.value_type == "uuid":
            return HEX0 + rng.integers(0, 16, size=(*shape, lay.value_len))
        digits = rng.integers(0, 10, size=(*shape, lay.value_len))
        digits[..., 0] = rng.integers(1, 10, size=shape)
        return DIGIT0 + digits

    def _key_tokens(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nouns = self.spec.num_nouns
        return ADJ0 + keys // nouns, self.noun0 + keys % nouns

    def _needle_tokens(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """NEEDLE adj noun IS value DOT for keys (...) and values (..., value_len)."""
        adj, noun = self._key_tokens(keys)
        shape = keys.shape
        return np.concatenate(
            [
                np.full((*shape, 1), NEEDLE),
                adj[..., None],
                noun[..., None],
                np.full((*shape, 1), IS),
                values,
                np.full((*shape, 1), DOT),
            ],
            axis=-1,
        )

    # --- sampling -------------------------------------------------------------------------------
    def sample(self, n: int, length: int, rng: np.random.Generator) -> Batch:
        self.check_length(length)
        names = list(self.layouts)
        if len(names) == 1:
            choice = np.zeros(n, dtype=np.int64)
        else:
            choice = rng.integers(0, len(names), size=n)
        inputs = np.empty((n, length), dtype=np.int64)
        targets = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
        groups = np.full((n, length), -1, dtype=np.int64)
        depth = np.zeros(n)
        depths: list[list[float]] = [[] for _ in range(n)]
        for v, name in enumerate(names):
            rows = np.flatnonzero(choice == v)
            if rows.size:
                self._fill(
                    self.layouts[name], rows, length, rng, inputs, targets, groups, depth, depths
                )
        return Batch(
            long_tensor(inputs),
            long_tensor(targets),
            {
                "length": long_tensor(np.full(n, length)),
                "depth": torch.from_numpy(depth.astype(np.float32)),
                "depths": depths,
                "variant": [names[c] for c in choice],
                "answer_group": long_tensor(groups),
            },
        )

    def _fill(
        self,
        lay: Layout,
        rows: np.ndarray,
        length: int,
        rng: np.random.Generator,
        inputs: np.ndarray,
        targets: np.ndarray,
        groups: np.ndarray,
        depth: np.ndarray,
        depths: list[list[float]],
    ) -> None:
        m, spec = rows.size, self.spec
        size = lay.filler_len(length)
        keys = sample_distinct(rng, m, spec.num_adjectives * spec.num_nouns, lay.n_keys)
        values = self._values(rng, (m, lay.n_keys, lay.n_values), lay)
        needles = self._needle_tokens(np.repeat(keys[:, :, None], lay.n_values, axis=2), values)
        if lay.haystack == "noise":
            filler, bounds = self._noise(m, size)
        elif lay.haystack == "essay":
            filler, bounds = self._essay(m, size, rng)
        else:
            filler, bounds = self._distractors(m, size, keys, lay, rng)
        n_needles = lay.n_keys * lay.n_values
        depth_idx = rng.integers(0, spec.num_depths, size=(m, n_needles))
        tiebreak = rng.random((m, n_needles))
        queries = sample_distinct(rng, m, lay.n_keys, lay.n_queries)
        q_adj, q_noun = self._key_tokens(np.take_along_axis(keys, queries, axis=1))

        flat_needles = needles.reshape(m, n_needles, lay.needle_len)
        for i, row in enumerate(rows):
            d = self.depth_grid[depth_idx[i]]
            b = bounds[i]
            at = b[np.abs(b[None, :] - d[:, None] * size).argmin(axis=1)]
            order = np.lexsort((tiebreak[i], at)).tolist()  # by boundary, ties in random order
            pieces, start = [np.array([BOS])], 0
            for j in order:
                pieces += [filler[i, start : at[j]], flat_needles[i, j]]
                start = at[j]
            pieces.append(filler[i, start:])
            full = [np.concatenate(pieces)]
            pos = len(full[0])
            # Needle j holds value j % n_values of key j // n_values; a query is answered by its
            # key's values in order of appearance.
            scored, group = [], []
            for q in range(lay.n_queries):
                key = queries[i, q]
                full.append(np.array([QUERY, q_adj[i, q], q_noun[i, q], IS]))
                pos += 4
                for j in order:
                    if j // lay.n_values == key:
                        answer = np.append(values[i, key, j % lay.n_values], DOT)
                        full.append(answer)
                        scored.extend(range(pos, pos + len(answer)))
                        group.extend([q] * len(answer))
                        pos += len(answer)
            seq = np.concatenate(full)
            assert seq.shape[0] == length + 1, "layout arithmetic out of sync"
            inputs[row] = seq[:-1]
            idx = np.asarray(scored) - 1  # target t predicts full-sequence token t + 1
            targets[row, idx] = seq[idx + 1]
            groups[row, idx] = group
            first = next(j for j in order if j // lay.n_values == queries[i, 0])
            depth[row] = d[first]
            depths[row] = [float(d[j]) for j in order]
