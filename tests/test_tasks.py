"""Task generators: invariants checked by independent evaluators, determinism, lengths, metrics.

Every answer is recomputed here from the *inputs alone* with code that shares nothing with the
generators (string parsing, a recursive-descent evaluator, Python's own arithmetic), so a
generator bug cannot hide behind the same bug in its checker.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import SerializeAsAny, ValidationError

from hybridkit.errors import HybridkitError
from hybridkit.schema import StrictModel
from hybridkit.tasks import IGNORE_INDEX, Batch, Metrics, TaskSpec, score
from hybridkit.tasks.base import sample_distinct

ROOT = Path(__file__).resolve().parents[1]
TINY_NIAH = {"haystack_vocab": 64, "num_adjectives": 16, "num_nouns": 16, "uuid_length": 16}


def build(**spec):
    return TaskSpec.model_validate(spec).build()


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def scored_positions(batch: Batch, row: int) -> list[int]:
    return torch.nonzero(batch.targets[row] != IGNORE_INDEX).flatten().tolist()


# ------------------------------------------------------------------------------------------
# MQAR
# ------------------------------------------------------------------------------------------


def mqar_reference(inputs: list[int], d: int, passes: int, vocab: int) -> list[int]:
    """Targets recomputed from the inputs: the context block gives the key -> value map, every
    key token in the query region is a query whose target is its value."""
    ctx = inputs[: 2 * d]
    assert inputs[: 2 * d * passes] == ctx * passes
    keys, values = ctx[0::2], ctx[1::2]
    assert len(set(keys)) == d and len(set(values)) == d
    assert all(1 <= k < vocab // 2 for k in keys)
    assert all(vocab // 2 <= v < vocab for v in values)
    mapping = dict(zip(keys, values))
    out = [IGNORE_INDEX] * len(inputs)
    queried = []
    for t in range(2 * d * passes, len(inputs)):
        tok = inputs[t]
        if 1 <= tok < vocab // 2:
            out[t] = mapping[tok]  # KeyError = a query for a key not in the context
            queried.append(tok)
    assert sorted(queried) == sorted(keys), "each key must be queried exactly once"
    return out


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"passes": 2},
        {"random_filler": True},
        {"power_a": 1.0, "num_kv_pairs": 8},
    ],
)
def test_mqar_answers_recomputed(knobs):
    spec = {"kind": "mqar", "seq_len": 64, "vocab_size": 256, "num_kv_pairs": 4, **knobs}
    task = build(**spec)
    batch = task.sample(64, 64, rng())
    d, passes = spec["num_kv_pairs"], spec.get("passes", 1)
    for row in range(len(batch)):
        ref = mqar_reference(batch.inputs[row].tolist(), d, passes, 256)
        assert batch.targets[row].tolist() == ref
        pos = scored_positions(batch, row)
        assert all((p - 2 * d * passes) % 2 == 0 for p in pos), "queries sit on even offsets"
    assert task.vocab_size == 256 and task.chance == pytest.approx(1 / 128)


def test_mqar_power_law_front_loads_queries():
    def mean_slot(power_a: float) -> float:
        task = build(kind="mqar", seq_len=256, vocab_size=512, num_kv_pairs=8, power_a=power_a)
        batch = task.sample(200, 256, rng(1))
        pos = torch.nonzero(batch.targets != IGNORE_INDEX)[:, 1].double()
        return float(((pos - 16) / (256 - 16)).mean())

    front, uniform = mean_slot(0.01), mean_slot(1.0)
    assert front < 0.25 < 0.4 < uniform < 0.6


def test_mqar_kv_pairs_by_length():
    task = build(
        kind="mqar",
        seq_len=64,
        vocab_size=512,
        length_mixture=[{"length": 64}, {"length": 128}],
        kv_pairs_by_length={128: 16},
    )
    batch = task.sample(8, 128, rng())
    assert (batch.targets != IGNORE_INDEX).sum(1).tolist() == [16] * 8
    assert task.sample(8, 64, rng()).targets.ne(IGNORE_INDEX).sum().item() == 32


def test_sample_distinct_both_branches():
    for pool, k in [(10_000, 5), (20, 20), (100, 30)]:
        out = sample_distinct(rng(), 300, pool, k)
        assert out.shape == (300, k) and out.min() >= 0 and out.max() < pool
        assert all(len(set(r)) == k for r in out.tolist())


# ------------------------------------------------------------------------------------------
# NIAH
# ------------------------------------------------------------------------------------------

NEEDLE, QUERY, IS, DOT, BOS = 2, 3, 4, 5, 1


def niah_reference(inputs: list[int]) -> dict:
    """Parse one NIAH example: needles of the context, the queries, the reference targets."""
    first_query = inputs.index(QUERY)
    context, needles = inputs[:first_query], []
    assert context[0] == BOS
    t = 0
    while t < len(context):
        if context[t] == NEEDLE:
            assert context[t + 3] == IS
            end = context.index(DOT, t + 4)
            needles.append(
                {"pos": t, "key": tuple(context[t + 1 : t + 3]), "value": context[t + 4 : end]}
            )
            t = end
        t += 1
    # Rebuild the question part from the queried keys: QUERY adj noun IS (value DOT)* ...
    full = list(context)
    queries = []
    t = first_query
    while t < len(inputs) and inputs[t] == QUERY:
        key = tuple(inputs[t + 1 : t + 3])
        queries.append(key)
        answer = []
        for nd in needles:
            if nd["key"] == key:
                answer += nd["value"] + [DOT]
        full += [QUERY, *key, IS, *answer]
        t += 4 + len(answer)
    assert len(full) == len(inputs) + 1, "the last answer token is the final target only"
    targets = [IGNORE_INDEX] * len(inputs)
    t = first_query
    for key in queries:
        t += 4
        n_answer = sum(len(nd["value"]) + 1 for nd in needles if nd["key"] == key)
        for p in range(t - 1, t - 1 + n_answer):
            targets[p] = full[p + 1]
        t += n_answer
    assert inputs == full[:-1]
    return {"needles": needles, "queries": queries, "targets": targets}


@pytest.mark.parametrize(
    "variant,knobs,keys,values,queries,value_len",
    [
        ("single_1", {}, 1, 1, 1, 7),
        ("single_2", {}, 1, 1, 1, 7),
        ("single_3", {}, 1, 1, 1, 16),
        ("multikey", {}, 4, 1, 1, 7),
        ("multikey", {"haystack": "needles"}, 4, 1, 1, 7),
        ("multivalue", {}, 1, 4, 1, 7),
        ("multiquery", {"num_queries": 3}, 4, 1, 3, 7),
    ],
)
def test_niah_answers_recomputed(variant, knobs, keys, values, queries, value_len):
    task = build(kind="niah", seq_len=256, variant=variant, **TINY_NIAH, **knobs)
    batch = task.sample(40, 256, rng(2))
    for row in range(len(batch)):
        ref = niah_reference(batch.inputs[row].tolist())
        assert batch.targets[row].tolist() == ref["targets"]
        real = {}
        for nd in ref["needles"]:
            real.setdefault(nd["key"], []).append(nd)
        if knobs.get("haystack") != "needles":
            assert len(real) == keys
        # Every queried key is an inserted key with exactly `values` needles.
        for key in ref["queries"]:
            assert len(real[key]) == values
        assert len(ref["queries"]) == queries == len(set(ref["queries"]))
        for nd in real[ref["queries"][0]]:
            assert len(nd["value"]) == value_len
            if value_len == 7:
                assert min(nd["value"]) >= 6 and max(nd["value"]) <= 15 and nd["value"][0] != 6
            else:
                assert all(16 <= v <= 31 for v in nd["value"])
        # Multi-query: every query is answered and is its own answer group.
        groups = batch.meta["answer_group"][row]
        assert sorted(set(groups[groups >= 0].tolist())) == list(range(queries))
        assert 0.0 <= batch.meta["depth"][row] <= 1.0
        assert len(batch.meta["depths"][row]) == keys * values


@pytest.mark.parametrize("variant,slack", [("single_1", 24), ("single_2", 26)])
def test_niah_depth_matches_needle_position(variant, slack):
    length = 512
    task = build(kind="niah", seq_len=length, variant=variant, **TINY_NIAH)
    batch = task.sample(60, length, rng(3))
    filler = length - (4 + 8) - (5 + 7)  # question + answer, one needle
    for row in range(len(batch)):
        ref = niah_reference(batch.inputs[row].tolist())
        (needle,) = ref["needles"]
        rel = (needle["pos"] - 1) / filler
        assert abs(rel - float(batch.meta["depth"][row])) <= slack / filler
        # needles go to sentence boundaries: haystack start or end, or right after a DOT
        pos = needle["pos"]
        assert pos in (1, 1 + filler) or batch.inputs[row, pos - 1] == DOT
    grid = np.linspace(0, 1, 40)
    assert (np.abs(batch.meta["depth"].numpy()[:, None] - grid).min(axis=1) < 1e-6).all()


def test_niah_haystacks():
    hay0 = 32 + 16 + 16
    noise = build(kind="niah", seq_len=256, variant="single_1", **TINY_NIAH).sample(8, 256, rng())
    # the noise haystack is one fixed 24-token sentence (ending in DOT), the same everywhere
    sentence = None
    for seq in noise.inputs.tolist():
        ref = niah_reference(seq)
        (needle,) = ref["needles"]
        hay = seq[1 : needle["pos"]] + seq[needle["pos"] + 12 : seq.index(QUERY)]
        sentence = sentence or hay[:24]
        assert sentence[-1] == DOT and all(t >= hay0 for t in sentence[:-1])
        assert hay == (sentence * 20)[: len(hay)]
    essay = build(kind="niah", seq_len=512, variant="single_2", **TINY_NIAH).sample(4, 512, rng())
    tokens = essay.inputs[0, 1:200]
    hay = tokens[tokens >= hay0]
    assert len(set(hay.tolist())) > 20, "essay haystack should use many words"
    dots = torch.nonzero(tokens == DOT).flatten()
    gaps = (dots[1:] - dots[:-1]).double()
    assert 15 <= gaps.mean() <= 25
    assert not torch.equal(essay.inputs[0, 1:100], essay.inputs[1, 1:100])


def test_niah_mixed_and_vocab():
    task = build(kind="niah", seq_len=256, variant="mixed", **TINY_NIAH)
    assert task.vocab_size == 32 + 16 + 16 + 64
    batch = task.sample(90, 256, rng())
    assert set(batch.meta["variant"]) == {"single_1", "single_2", "single_3"}
    assert int(batch.inputs.max()) < task.vocab_size
    for row in range(len(batch)):
        assert batch.targets[row].tolist() == niah_reference(batch.inputs[row].tolist())["targets"]
    full = build(kind="niah")
    assert full.vocab_size == 32 + 256 + 256 + 2048


# ------------------------------------------------------------------------------------------
# induction, selective copy
# ------------------------------------------------------------------------------------------


def test_induction_target_is_token_after_first_trigger():
    task = build(kind="induction", seq_len=64)
    batch = task.sample(200, 64, rng())
    trigger = 16
    for seq, tgt in zip(batch.inputs.tolist(), batch.targets.tolist()):
        first = seq.index(trigger)
        assert seq.count(trigger) == 2 and seq[-1] == trigger and first <= 64 - 3
        assert tgt[:-1] == [IGNORE_INDEX] * 63 and tgt[-1] == seq[first + 1] < 16
    assert task.vocab_size == 17 and task.chance == 1 / 16


def test_selective_copy_answers_are_data_in_order():
    task = build(kind="selective_copy", seq_len=64, num_tokens=4)
    batch = task.sample(100, 64, rng())
    for seq, tgt in zip(batch.inputs.tolist(), batch.targets.tolist()):
        copy = seq.index(1)
        assert copy == 64 - 4 - 1 and seq[copy + 1 :] == [0] * 4
        data = [t for t in seq[:copy] if t >= 2]
        assert len(data) == 4
        assert tgt[copy + 1 :] == data and set(tgt[: copy + 1]) == {IGNORE_INDEX}
    # extrapolation: same number of tokens at a longer length
    assert (task.sample(3, 256, rng()).targets != IGNORE_INDEX).sum(1).tolist() == [4, 4, 4]


# ------------------------------------------------------------------------------------------
# parity, modular arithmetic
# ------------------------------------------------------------------------------------------


def test_parity_answers_recomputed():
    task = build(kind="parity", seq_len=12)
    batch = task.sample(300, 12, rng())
    assert batch.inputs.shape == (300, 14)
    for seq, tgt in zip(batch.inputs.tolist(), batch.targets.tolist()):
        assert seq[0] == 1 and seq[-1] == 2 and set(seq[1:-1]) <= {3, 4}
        ones = seq.count(4)
        assert tgt[-1] == (6 if ones % 2 else 5) and set(tgt[:-1]) == {IGNORE_INDEX}


SYMBOLS = {3: "+", 4: "-", 5: "*", 6: "(", 7: ")"}


class Parser:
    """Recursive-descent evaluator of the token expressions (integers, unreduced).

    expr := term (('+' | '-') term)* ; term := unary ('*' unary)* ;
    unary := '-' unary | atom ; atom := digit | '(' expr ')'
    """

    def __init__(self, tokens: list[int]):
        self.toks, self.i = tokens, 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self):
        self.i += 1
        return self.toks[self.i - 1]

    def expr(self) -> int:
        value = self.term()
        while self.peek() in (3, 4):
            op = self.take()
            rhs = self.term()
            value = value + rhs if op == 3 else value - rhs
        return value

    def term(self) -> int:
        value = self.unary()
        while self.peek() == 5:
            self.take()
            value *= self.unary()
        return value

    def unary(self) -> int:
        if self.peek() == 4:
            self.take()
            return -self.unary()
        return self.atom()

    def atom(self) -> int:
        tok = self.take()
        if tok == 6:
            value = self.expr()
            assert self.take() == 7, "unbalanced brackets"
            return value
        assert tok >= 8, f"expected a digit, got token {tok}"
        return tok - 8

    def parse(self) -> int:
        value = self.expr()
        assert self.i == len(self.toks), "trailing tokens"
        return value


def as_python(tokens: list[int]) -> str:
    return " ".join(SYMBOLS.get(t, str(t - 8)) for t in tokens)


@pytest.mark.parametrize(
    "knobs,length",
    [
        ({}, 15),
        ({}, 1),
        ({"brackets": True}, 1),
        ({"brackets": True}, 2),
        ({"brackets": True}, 4),
        ({"brackets": True}, 33),
        ({"brackets": True, "ops": "+-*"}, 40),
        ({"modulus": 7, "ops": "*-"}, 21),
    ],
)
def test_modarith_answers_recomputed(knobs, length):
    task = build(kind="modarith", seq_len=length, **knobs)
    modulus = knobs.get("modulus", 5)
    batch = task.sample(200, length, rng(4))
    assert batch.inputs.shape == (200, length + 2)
    for seq, tgt in zip(batch.inputs.tolist(), batch.targets.tolist()):
        assert seq[0] == 1 and seq[-1] == 2
        expr = seq[1:-1]
        value = Parser(expr).parse()
        assert value == eval(as_python(expr))  # cross-check with Python's precedence rules
        assert tgt[-1] == 8 + value % modulus and set(tgt[:-1]) == {IGNORE_INDEX}
        if not knobs.get("brackets"):
            assert 6 not in expr and 7 not in expr
    if knobs.get("brackets") and length >= 5:
        assert all(seq[1] == 6 and seq[-2] == 7 for seq in batch.inputs.tolist())
    assert task.chance == pytest.approx(1 / modulus)


# ------------------------------------------------------------------------------------------
# determinism, lengths, padding
# ------------------------------------------------------------------------------------------

ALL_KINDS = [
    {"kind": "mqar", "vocab_size": 256},
    {"kind": "niah", "seq_len": 128, "variant": "mixed", **TINY_NIAH},
    {"kind": "induction", "seq_len": 32},
    {"kind": "selective_copy", "seq_len": 32, "num_tokens": 4},
    {"kind": "parity", "seq_len": 8},
    {"kind": "modarith", "seq_len": 9},
    {"kind": "modarith", "seq_len": 9, "brackets": True},
]


def same(a: Batch, b: Batch) -> bool:
    return torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("spec", ALL_KINDS, ids=lambda s: s["kind"])
def test_determinism_and_fixed_eval_sets(spec):
    spec = {**spec, "eval_examples": 20}
    task = build(**spec)
    assert same(task.train_batch(0, 8, rng(7)), task.train_batch(0, 8, rng(7)))
    assert not same(task.train_batch(0, 8, rng(7)), task.train_batch(0, 8, rng(8)))
    length = task.eval_lengths[1]
    first = task.eval_set(length)
    for _ in range(3):  # training draws do not move the evaluation set
        task.train_batch(0, 8, rng(9))
    fresh = build(**spec)
    fresh.train_batch(0, 32, rng(10))
    assert same(first, task.eval_set(length)) and same(first, fresh.eval_set(length))
    assert len(first) == 20
    # a different eval seed gives a different set
    assert not same(first, build(**spec, eval_seed=99).eval_set(length))
    # eval lengths of the protocol: 0.5, 1, 2, 4, 8 x seq_len (snapped to valid lengths)
    seq_len = task.spec.seq_len
    assert task.eval_lengths[1] == seq_len and task.eval_lengths[-1] <= 8 * seq_len
    for n in task.eval_lengths[:2]:
        batch = task.eval_set(n)
        assert int(batch.inputs.max()) < task.vocab_size and int(batch.inputs.min()) >= 0
        assert (batch.targets != IGNORE_INDEX).any(dim=1).all()
        assert batch.meta["length"].tolist() == [n] * len(batch)


def test_curriculum_lengths_follow_stages():
    task = build(
        kind="parity",
        seq_len=10,
        curriculum=[
            {"steps": 5, "min_len": 3, "max_len": 6},
            {"steps": 5, "min_len": 3, "max_len": 12},
        ],
    )
    r = rng()
    early = np.concatenate([task.lengths_at(s, 256, r) for s in range(5)])
    late = np.concatenate([task.lengths_at(s, 256, r) for s in (5, 9, 10, 1000)])
    assert set(early.tolist()) == set(range(3, 7))
    assert set(late.tolist()) == set(range(3, 13))  # the last stage stays after its steps
    counts = np.bincount(late)[3:]
    assert counts.min() > 0.6 * counts.mean()  # roughly uniform
    assert task.stage_at(10_000).max_len == 12


def test_curriculum_draws_only_valid_lengths():
    task = build(kind="modarith", seq_len=9, curriculum=[{"steps": 1, "min_len": 3, "max_len": 10}])
    lengths = task.lengths_at(0, 500, rng())
    assert set(lengths.tolist()) == {3, 5, 7, 9}
    batch = task.train_batch(0, 64, rng())
    for row, n in enumerate(batch.meta["length"].tolist()):
        assert n % 2 == 1 and batch.targets[row, n + 1] >= 8  # answer after BOS + n + EQ


def test_reports_name_every_training_length():
    spec = TaskSpec.model_validate
    mixture = [{"length": 8, "weight": 3}, {"length": 16}]
    assert spec({"kind": "parity", "seq_len": 16}).train_lengths_text() == "16"
    text = spec({"kind": "parity", "seq_len": 16, "length_mixture": mixture}).train_lengths_text()
    assert text == "8, 16 (mixture)"
    stages = [{"min_len": 4, "max_len": 8, "steps": 10}, {"min_len": 8, "max_len": 32, "steps": 5}]
    curriculum = spec({"kind": "parity", "seq_len": 32, "curriculum": stages})
    assert curriculum.train_lengths_text() == "4-32 (curriculum)"


def test_mixture_lengths_and_padding():
    task = build(
        kind="parity",
        seq_len=8,
        length_mixture=[{"length": 8, "weight": 3}, {"length": 16, "weight": 1}],
    )
    lengths = task.lengths_at(0, 8000, rng())
    assert abs((lengths == 8).mean() - 0.75) < 0.03 and set(lengths.tolist()) == {8, 16}
    batch = task.train_batch(0, 64, rng(1))
    assert batch.inputs.shape == (64, 18)
    for row, n in enumerate(batch.meta["length"].tolist()):
        tokens = n + 2
        assert (batch.inputs[row, tokens:] == task.pad_id).all()
        assert (batch.targets[row, tokens:] == IGNORE_INDEX).all()
        assert batch.targets[row, tokens - 1] in (5, 6)  # the answer at EQ is still scored
    # right padding never changes the metrics of a padded row
    assert score(batch.targets.clamp_min(0), batch).ex_match == 1.0


def test_mixture_pads_position_meta():
    task = build(
        kind="niah",
        seq_len=128,
        variant="multiquery",
        length_mixture=[{"length": 128}, {"length": 192}],
        **TINY_NIAH,
    )
    batch = task.train_batch(0, 16, rng())
    groups = batch.meta["answer_group"]
    assert groups.shape == batch.inputs.shape
    assert ((groups >= 0) == (batch.targets != IGNORE_INDEX)).all()


# ------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------


def test_metrics_perfect_random_and_addition():
    task = build(kind="modarith", seq_len=9, eval_examples=4000)
    batch = task.eval_set(9)
    perfect = score(batch.targets.clamp_min(0), batch)
    assert perfect.tok_acc == perfect.ex_match == perfect.scaled_acc(task.chance) == 1.0
    logits = torch.zeros(*batch.inputs.shape, task.vocab_size)
    logits[..., 8:13] = torch.rand(
        *batch.inputs.shape, 5, generator=torch.Generator().manual_seed(0)
    )
    guess = score(logits, batch)  # argmax of random logits over the five digits
    assert abs(guess.scaled_acc(task.chance)) < 0.05
    parts = sum(
        (score(logits[i : i + 512], mb) for i, mb in zip(range(0, 4000, 512), batch.split(512))),
        Metrics(),
    )
    assert parts == guess and parts.examples == 4000
    out = guess.as_dict(task.chance)
    assert set(out) == {"tok_acc", "ex_match", "scaled_acc", "scored", "examples"}


def test_metrics_random_mqar_is_chance():
    task = build(kind="mqar", seq_len=64, vocab_size=128, eval_examples=2000)
    batch = task.eval_set(64)
    preds = torch.randint(64, 128, batch.inputs.shape, generator=torch.Generator().manual_seed(1))
    m = score(preds, batch)
    assert m.scored == 2000 * 4 and abs(m.scaled_acc(task.chance)) < 0.03


def test_metrics_answer_groups_count_queries_separately():
    task = build(kind="niah", seq_len=256, variant="multiquery", eval_examples=10, **TINY_NIAH)
    batch = task.eval_set(256)
    preds = batch.targets.clamp_min(0).clone()
    first = scored_positions(batch, 0)[0]
    preds[0, first] = (preds[0, first] + 1) % task.vocab_size  # break one answer of one example
    m = score(preds, batch)
    assert m.examples == 40 and m.exact == 39 and m.scored - m.correct == 1
    plain = score(preds, batch.targets)  # without groups: one answer per sequence
    assert plain.examples == 10 and plain.exact == 9


def test_metrics_ignore_unscored_positions():
    targets = torch.tensor([[IGNORE_INDEX, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 2]])
    preds = torch.tensor([[9, 3, 0], [9, 9, 2]])
    m = score(preds, targets)
    assert (m.correct, m.scored, m.exact, m.examples) == (2, 3, 1, 2)
    assert m.tok_acc == pytest.approx(2 / 3) and m.ex_match == 0.5
    assert m.scaled_acc(0.5) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------
# spec validation and registry
# ------------------------------------------------------------------------------------------


MIXED_LENGTHS = {
    "kind": "parity",
    "curriculum": [{"steps": 5, "min_len": 3, "max_len": 5}],
    "length_mixture": [{"length": 4}],
}


@pytest.mark.parametrize(
    "spec,loc,message",
    [
        # (other tests register kinds of their own, so only the built-in run is checked)
        ({"kind": "nope"}, ("kind",), "unknown task kind 'nope'; allowed kinds: "),
        ({"kind": "nope"}, ("kind",), "induction, modarith, mqar, niah, parity"),
        ({"kind": "nope"}, ("kind",), "Hint: a kind defined in your own code"),
        ({"kind": {"nested": 1}}, ("kind",), "kind must be a string naming a task kind"),
        ({"seq_len": 64}, ("kind",), "missing 'kind'"),
        ({"kind": "mqar", "vocab_size": 64}, ("vocab_size",), "vocab_size=64 must exceed"),
        ({"kind": "mqar", "seq_len": 63, "vocab_size": 512}, ("seq_len",), "must be even"),
        (
            {"kind": "mqar", "vocab_size": 512, "num_kv_pairs": 20},
            ("seq_len",),
            "too short for num_kv_pairs=20",
        ),
        ({"kind": "mqar", "vocab_size": 512, "eval_lengths": [64, 12]}, ("eval_lengths", 1), "16"),
        (
            {"kind": "parity", "curriculum": [{"steps": 5, "min_len": 9, "max_len": 3}]},
            ("curriculum", 0),
            "min_len=9 is larger than max_len=3",
        ),
        (
            {"kind": "parity", "curriculum": [{"steps": 0, "min_len": 1, "max_len": 3}]},
            ("curriculum", 0, "steps"),
            "greater than 0",
        ),
        ({"kind": "parity", "curriculum": []}, ("curriculum",), "must not be empty"),
        (MIXED_LENGTHS, ("curriculum",), "mutually exclusive"),
        (
            {"kind": "modarith", "curriculum": [{"steps": 1, "min_len": 2, "max_len": 2}]},
            ("curriculum", 0),
            "no valid length in [2, 2]",
        ),
        ({"kind": "modarith", "seq_len": 40}, ("seq_len",), "expression length must be odd"),
        ({"kind": "modarith", "ops": "+/"}, ("ops",), "ops must be"),
        ({"kind": "niah", "seq_len": 20}, ("seq_len",), "too short for single_1"),
        (
            {"kind": "niah", "variant": "multiquery", "num_queries": 5},
            ("num_queries",),
            "num_queries=5 exceeds",
        ),
        ({"kind": "selective_copy", "seq_len": 20}, ("seq_len",), "needs 2*T+1 = 33"),
        ({"kind": "parity", "bits": 3}, ("bits",), "Extra inputs are not permitted"),
    ],
)
def test_bad_specs_raise_clear_errors(spec, loc, message):
    with pytest.raises(ValidationError) as err:
        TaskSpec.model_validate(spec)
    first = err.value.errors()[0]
    assert first["loc"] == loc and message in first["msg"]


def test_errors_are_located_inside_a_recipe_section():
    class Recipe(StrictModel):
        task: SerializeAsAny[TaskSpec]

    with pytest.raises(ValidationError) as err:
        Recipe.model_validate({"task": {"kind": "mqar", "vocab_size": 32}})
    assert err.value.errors()[0]["loc"] == ("task", "vocab_size")
    recipe = Recipe.model_validate({"task": {"kind": "parity", "seq_len": 8}})
    assert Recipe.model_validate(recipe.model_dump()) == recipe
    assert recipe.model_dump()["task"]["kind"] == "parity"


def test_spec_roundtrip_and_assignment():
    spec = TaskSpec.model_validate({"kind": "mqar", "vocab_size": 512, "num_kv_pairs": 16})
    # 0.5 x 64 = 32 cannot hold 16 pairs: the derived default drops it instead of failing
    assert spec.eval_lengths == [64, 128, 256, 512]
    assert TaskSpec.model_validate(spec.model_dump()) == spec
    assert spec.model_dump()["eval_lengths"] is None  # derived, so not frozen into dumps
    spec.seq_len = 128
    assert spec.eval_lengths == [64, 128, 256, 512, 1024]
    # a boolean among a dict's numbers was read as 1
    with pytest.raises(ValidationError, match="got a boolean"):
        TaskSpec.model_validate(
            {"kind": "mqar", "vocab_size": 64, "seq_len": 16, "kv_pairs_by_length": {16: True}}
        )
    # derived lengths stop at MAX_LENGTH (2**24), as one the user writes must
    long = TaskSpec.model_validate({"kind": "parity", "seq_len": 2**23})
    assert long.eval_lengths == [2**22, 2**23, 2**24]
    with pytest.raises(ValidationError):
        spec.seq_len = 63
    assert spec.seq_len == 128  # a rejected assignment leaves the spec unchanged
    spec.eval_lengths = [64]
    spec.seq_len = 256
    assert spec.eval_lengths == [64]


def test_sample_rejects_invalid_length():
    task = build(kind="mqar", vocab_size=256)
    with pytest.raises(ValueError, match="must be even"):
        task.sample(2, 63, rng())


def load_example(name: str):
    module_name = f"_hybridkit_example_{name}"
    if module_name not in sys.modules:  # registering a kind twice would be an error
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def test_custom_task_example():
    example = load_example("custom_task")
    out = example.main()
    assert out["kind"] == "reverse" and out["train_shape"] == (4, 12)
    for metrics in out["metrics"].values():
        assert metrics["tok_acc"] == metrics["ex_match"] == metrics["scaled_acc"] == 1.0
    spec = TaskSpec.model_validate({"kind": "reverse", "seq_len": 3})
    assert type(spec).__name__ == "ReverseSpec"
    with pytest.raises(ValidationError, match="reverse"):
        TaskSpec.model_validate({"kind": "nope"})  # the user's kind is listed as allowed


# ------------------------------------------------------------------------------------------
# text and tokens
# ------------------------------------------------------------------------------------------


def test_text_task(tmp_path):
    text = "".join(f"line {i}: naïve café — ünïcödé {i * i}\n" for i in range(400))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    raw = text.encode("utf-8")
    task = build(kind="text", path=str(path), seq_len=32, eval_lengths=[32, 64], eval_fraction=0.2)
    assert task.vocab_size == 258 and task.pad_id == 256
    batch = task.train_batch(0, 16, rng())
    assert batch.inputs.shape == (16, 32) and (batch.targets != IGNORE_INDEX).all()
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    split = len(raw) - int(len(raw) * 0.2)
    for row, start in enumerate(batch.meta["start"].tolist()):
        assert bytes(batch.inputs[row].tolist()) == raw[start : start + 32]
        assert start + 33 <= split  # training windows stay in the head
    ev = task.eval_set(64)
    tail = raw[split:]
    for row in range(len(ev)):
        window = bytes(ev.inputs[row].tolist() + [ev.targets[row, -1].item()])
        assert window in tail
    assert same(ev, build(**task.spec.model_dump()).eval_set(64))
    with_bos = build(kind="text", path=str(path), seq_len=16, eval_lengths=[16], bos=True)
    assert (with_bos.sample(4, 16, rng()).inputs[:, 0] == 257).all()


def test_text_task_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe not utf-8")
    with pytest.raises(HybridkitError, match="not valid UTF-8"):
        build(kind="text", path=str(bad), seq_len=4, eval_lengths=[4])
    with pytest.raises(HybridkitError, match="does not exist"):
        build(kind="text", path=str(tmp_path / "missing.txt"))
    small = tmp_path / "small.txt"
    small.write_text("x" * 300)
    with pytest.raises(HybridkitError, match="held-out tail"):
        build(kind="text", path=str(small), seq_len=32)  # default eval lengths reach 256


@pytest.mark.parametrize("fmt", ["npy", "bin"])
def test_tokens_task(tmp_path, fmt):
    ids = np.arange(5000, dtype=np.uint16) % 997
    path = tmp_path / f"ids.{fmt}"
    if fmt == "npy":
        np.save(path, ids.astype(np.int32))
    else:
        ids.tofile(path)
    task = build(kind="tokens", path=str(path), vocab_size=1000, seq_len=64, eval_lengths=[64, 256])
    batch = task.train_batch(0, 8, rng())
    assert batch.inputs.shape == (8, 64) and (batch.targets != IGNORE_INDEX).all()
    for row, start in enumerate(batch.meta["start"].tolist()):
        assert batch.inputs[row].tolist() == ids[start : start + 64].tolist()
        assert batch.targets[row].tolist() == ids[start + 1 : start + 65].tolist()
    ev = task.eval_set(256)
    assert (ev.meta["start"] >= 0).all() and ev.inputs.shape == (500, 256)
    assert ev.inputs[0].tolist() == ids[4500 + int(ev.meta["start"][0]) :][:256].tolist()
    small_vocab = build(
        kind="tokens", path=str(path), vocab_size=500, seq_len=64, eval_lengths=[64]
    )
    with pytest.raises(HybridkitError, match="outside"):
        small_vocab.sample(64, 64, rng())
