"""Bounds of recipe values that a fuzz found unbounded: each bad value is a recipe error naming
the key and the allowed value, found when the recipe is read -- not an out-of-memory error that
names no key, a plugin-contract message, or a model that trains silently broken.

* task sizes that allocate arrays when the task is built (NIAH's haystack vocabulary, depth grid
  and noise sentence) and every task's vocabulary knob (at most ``model.vocab_size``'s bound);
* vocabularies so small that every answer is known (chance 1): selective copy, tokens;
* ``eval.examples`` (``task.eval_examples``' bound);
* a Mamba-3 layer with no head (``int(expand * d_model) < headdim``);
* norm eps values that zero every norm's output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hybridkit import build_model
from hybridkit.errors import RecipeError
from hybridkit.recipe import load_recipe
from hybridkit.tasks.base import MAX_LENGTH, MAX_VOCAB
from hybridkit.tasks.niah import MAX_HAYSTACK_VOCAB, MAX_KEY_WORDS

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "hybridkit" / "recipes"
NIAH = RECIPES / "niah_tiny.yaml"
TINY = RECIPES / "tiny_hybrid.yaml"
HUGE = 10**12
MIXER = "model.blocks.m.mixer"  # tiny_hybrid's Mamba-3 template


def recipe_error(recipe: Path | dict, *overrides: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, list(overrides))
    return str(info.value)


def base_task(kind: str, **knobs) -> dict:
    """A small recipe dict of task ``kind`` (a one-layer attention model)."""
    model = {
        "d_model": 32,
        "vocab_size": 256,
        "layout": "a",
        "blocks": {"a": {"mixer": {"kind": "attention", "n_heads": 2, "head_dim": 16}}},
    }
    return {"model": model, "task": {"kind": kind, "eval_examples": 4, **knobs}}


# --- 1. task sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, bound",
    [
        ("haystack_vocab", MAX_HAYSTACK_VOCAB),
        ("num_depths", MAX_LENGTH),
        ("noise_sentence_len", MAX_LENGTH),
        ("sentence_len", MAX_LENGTH),
        ("num_adjectives", MAX_KEY_WORDS),
        ("num_nouns", MAX_KEY_WORDS),
    ],
)
def test_niah_sizes_are_bounded(key, bound):
    """They allocated e.g. a (10^12, 64) successor table when the task was built: an
    out-of-memory error naming no key."""
    err = recipe_error(NIAH, f"task.{key}={HUGE}")
    assert f"task.{key}: must be less than or equal to {bound}; got {HUGE}" in err, err
    assert load_recipe(NIAH, [f"task.{key}={bound}"]).task.model_dump()[key] == bound


def test_niah_vocabulary_at_the_bounds_fits_a_model():
    """The largest adjectives, nouns and haystack words together stay a trainable vocabulary."""
    assert 32 + 2 * MAX_KEY_WORDS + MAX_HAYSTACK_VOCAB <= MAX_VOCAB


def test_huge_task_knobs_fail_before_training_writes_anything(tmp_path, cli_error):
    run = tmp_path / "run"
    for key in ("haystack_vocab", "num_depths", "noise_sentence_len"):
        err = cli_error("train", str(NIAH), "-o", str(run), "--set", f"task.{key}={HUGE}")
        assert f"task.{key}: must be less than or equal to" in err, err
        assert "out of memory" not in err, err
        assert not run.exists()


@pytest.mark.parametrize(
    "kind, knobs, key, bound",
    [
        ("induction", {"seq_len": 32}, "num_tokens", MAX_VOCAB - 1),
        ("modarith", {"seq_len": 9}, "modulus", MAX_VOCAB - 8),
        ("mqar", {"seq_len": 64}, "vocab_size", MAX_VOCAB),
        ("selective_copy", {"seq_len": 64, "num_tokens": 4}, "vocab_size", MAX_VOCAB),
        ("tokens", {"path": "ids.npy", "seq_len": 32}, "vocab_size", MAX_VOCAB),
    ],
)
def test_task_vocabularies_are_bounded_by_the_model_vocabulary_bound(kind, knobs, key, bound):
    """A task vocabulary above ``model.vocab_size``'s bound could never be trained (and a huge
    ``modulus`` overflowed int64 products, giving wrong answers silently)."""
    recipe = base_task(kind, **knobs, **{key: HUGE})
    err = recipe_error(recipe)
    assert f"task.{key}: must be less than or equal to {bound}; got {HUGE}" in err, err
    recipe["task"][key] = bound
    load_recipe(recipe)


# --- 2. vocabularies with nothing to guess ---------------------------------------------------


def test_selective_copy_needs_two_data_tokens(tmp_path, cli_error):
    """vocab_size 3 leaves one data token: chance 1, which failed as the plugin contract's
    'must set chance' message naming no recipe key."""
    err = recipe_error(base_task("selective_copy", seq_len=32, num_tokens=4, vocab_size=3))
    assert "task.vocab_size: must be greater than or equal to 4; got 3" in err, err
    task = "task={kind: selective_copy, seq_len: 32, vocab_size: 3, num_tokens: 4}"
    run = tmp_path / "run"
    err = cli_error("train", str(RECIPES / "induction_tiny.yaml"), "-o", str(run), "--set", task)
    assert "task.vocab_size: must be greater than or equal to 4" in err, err
    assert "chance" not in err and not run.exists(), err


def test_a_token_file_needs_two_ids():
    err = recipe_error(base_task("tokens", path="ids.npy", seq_len=32, vocab_size=1))
    assert "task.vocab_size: must be greater than or equal to 2; got 1" in err, err


@pytest.mark.parametrize(
    "kind, knobs",
    [
        ("induction", {"seq_len": 8, "num_tokens": 2}),
        ("modarith", {"seq_len": 5, "modulus": 2}),
        ("modarith", {"seq_len": 5, "modulus": 2, "brackets": True}),
        ("mqar", {"seq_len": 4, "vocab_size": 5, "num_kv_pairs": 1}),
        ("selective_copy", {"seq_len": 9, "num_tokens": 4, "vocab_size": 4}),
        ("tokens", {"seq_len": 8, "vocab_size": 2}),
        ("parity", {"seq_len": 4}),
        ("niah", {"seq_len": 64, "haystack_vocab": 2, "num_adjectives": 1, "num_nouns": 1}),
    ],
)
def test_the_smallest_vocabularies_still_leave_something_to_guess(kind, knobs, tmp_path):
    """Every task at its smallest allowed vocabulary builds, keeps the task contract (chance
    below 1) and generates its evaluation set."""
    if kind == "tokens":
        path = tmp_path / "ids.npy"
        np.save(path, np.arange(400, dtype=np.int64) % 2)
        knobs = {**knobs, "path": str(path)}
    spec = load_recipe(base_task(kind, eval_lengths=[knobs["seq_len"]], **knobs)).task
    task = spec.build()
    task.check_attributes()
    assert 0 < task.chance < 1
    assert len(task.eval_set(spec.seq_len)) == 4


# --- 3. eval.examples -------------------------------------------------------------------------


def test_eval_examples_has_the_task_eval_examples_bound(cli_error):
    err = recipe_error(NIAH, f"eval.examples={HUGE}")
    assert f"eval.examples: must be less than or equal to 10000000; got {HUGE}" in err, err
    assert load_recipe(NIAH, ["eval.examples=10000000"]).eval.examples == 10**7
    err = cli_error("show", str(NIAH), "--set", f"eval.examples={HUGE}")
    assert "eval.examples: must be less than or equal to 10000000" in err, err


# --- 4. Mamba-3 layers without a head --------------------------------------------------------


@pytest.mark.parametrize("expand", [0.01, 0.4])
def test_a_mamba3_layer_needs_a_head(expand, cli_error):
    """int(expand * d_model) = 0 passed the 'multiple of headdim' check; the model then built
    (show / check / train succeeded) with no head."""
    err = recipe_error(TINY, f"{MIXER}.expand={expand}")
    d_inner = int(expand * 32)
    assert (
        f"{MIXER}.expand: d_inner = int(expand * d_model) = int({expand} * 32) = {d_inner}" in err
    )
    assert "below headdim 16" in err and "allowed: expand >= headdim / d_model = 0.5" in err, err
    err = cli_error("show", str(TINY), "--set", f"{MIXER}.expand={expand}")
    assert f"{MIXER}.expand: " in err, err


def test_a_mamba3_layer_of_one_head_builds():
    recipe = load_recipe(TINY, [f"{MIXER}.expand=0.5"])
    model = build_model(recipe, seed=0)
    assert [b.mixer.nheads for b in model.blocks if hasattr(b.mixer, "nheads")] == [1]


# --- 5. norm eps ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["model.norm_eps", f"{MIXER}.norm_eps"])
def test_norm_eps_is_bounded(key, cli_error):
    """1e300 made every RMSNorm output 0 (x / sqrt(mean(x^2) + eps)): a model that trains
    silently broken."""
    err = recipe_error(TINY, f"{key}=1e300")
    assert f"{key}: must be less than or equal to 1" in err, err
    assert f"{key}: must be greater than 0" in recipe_error(TINY, f"{key}=0")
    assert "must be" in cli_error("show", str(TINY), "--set", f"{key}=1e300")
    load_recipe(TINY, [f"{key}=1.0"])


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("train.eps", "1e300", "less than or equal to 1"),
        ("train.weight_decay", "1e300", "less than or equal to 10"),
        ("eval.decode_examples", "1000000", "less than or equal to 4096"),
        ("eval.decode_max_length", "100000000", "less than or equal to 16777216"),
    ],
)
def test_optimizer_and_decode_subset_bounds(key, value, needle):
    """The rest of the fuzz's unbounded knobs: an Adam eps of 1e300 zeroes every update, a
    weight decay of 1e300 every weight, and the decode subset is a check, not a second eval."""
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, [f"{key}={value}"])
    assert any(k == key and needle in msg for k, msg in info.value.problems), str(info.value)
