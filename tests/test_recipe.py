"""Recipe DSL: layouts, overrides, defaults, error messages (key path + allowed values), dumps."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from hybridkit.errors import RecipeError
from hybridkit.layers import AttentionSpec, Mamba3Spec, MLPSpec
from hybridkit.recipe import RecipeSpec, dump_recipe, load_recipe, recipe_to_dict
from hybridkit.spec import BlockSpec, ModelSpec

EXAMPLE = Path(__file__).parent / "data" / "recipe_hybrid_tiny.yaml"

M = {"mixer": {"kind": "mamba3", "d_state": 16, "headdim": 16}, "mlp": {"kind": "mlp", "d_ff": 128}}
A = {"mixer": {"kind": "attention", "n_heads": 4, "head_dim": 16}, "mlp": {"kind": "mlp"}}


def recipe(layout: Any = "m m a", **model: Any) -> dict[str, Any]:
    """A small valid recipe dict; ``model`` keys replace the defaults below."""
    base: dict[str, Any] = {
        "d_model": 64,
        "vocab_size": 32,
        "blocks": copy.deepcopy({"m": M, "a": A}),
        "layout": layout,
    }
    base.update(model)
    return {"name": "t", "model": base}


def error_of(data: Any, overrides: tuple[str, ...] = ()) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(data, overrides)
    return info.value


def problem(err: RecipeError, key: str) -> str:
    """The message reported for ``key`` (fails with the full report if there is none)."""
    found = [msg for k, msg in err.problems if k == key]
    assert found, f"no problem for {key!r} in:\n{err}"
    return found[0]


def with_block(part: str, template: str, **fields: Any) -> dict[str, Any]:
    data = recipe()
    data["model"]["blocks"][template][part].update(fields)
    return data


# --- valid recipes -----------------------------------------------------------------------------
def test_example_recipe_loads_with_defaults_and_override() -> None:
    spec = load_recipe(EXAMPLE)
    assert isinstance(spec, RecipeSpec) and spec.name == "hybrid-tiny"
    model = spec.model
    assert model.n_layer == 6
    assert model.layer_names() == ["m", "m", "a", "m", "m", "a"]
    layers = model.layers()
    assert all(isinstance(b, BlockSpec) for b in layers)
    m0, a2, a5 = layers[0].mixer, layers[2].mixer, layers[5].mixer
    assert isinstance(m0, Mamba3Spec) and isinstance(a5, AttentionSpec)
    assert isinstance(layers[0].mlp, MLPSpec) and layers[0].mlp.d_ff == 128
    # defaults filled in
    assert (m0.expand, m0.mimo_rank, m0.rope_fraction, m0.chunk_size) == (2.0, 1, 0.5, 64)
    assert m0.outproj_norm == "grouped_pregate" and m0.a_activation == "heavy_tail"
    assert (model.tie_embeddings, model.norm_eps, model.init_std) == (True, 1e-5, 0.02)
    # the override touches only layer 5, not the template or the other attention layer
    assert a5.window == 32 and a2.window is None and model.blocks["a"].mixer.window is None


def test_a_file_read_again_is_a_fresh_copy_of_its_current_text(tmp_path: Path) -> None:
    """Parsed files are cached by content (a study reads its base once per run): a caller that
    changes what it got must not change the next read, and an edited file is read anew."""
    from hybridkit.recipe import read_yaml_mapping

    path = tmp_path / "r.yaml"
    path.write_text(EXAMPLE.read_text())
    first = read_yaml_mapping(path)
    first["model"]["d_model"] = -1
    first["model"].clear()
    assert read_yaml_mapping(path) == yaml.safe_load(EXAMPLE.read_text())
    path.write_text(EXAMPLE.read_text().replace("name:", "name: edited #", 1))
    assert read_yaml_mapping(path)["name"].startswith("edited")
    assert load_recipe(path, ["model.d_model=96"]).model.d_model == 96
    assert load_recipe(path).model.d_model != 96


def test_layers_are_independent_copies() -> None:
    model = load_recipe(EXAMPLE).model
    layers = model.layers()
    layers[0].mixer.d_state = 32
    assert layers[1].mixer.d_state == 16
    assert model.blocks["m"].mixer.d_state == 16 and model.layers()[0].mixer.d_state == 16


@pytest.mark.parametrize(
    ("layout", "names"),
    [
        ("(m m m m m a) x 4", (["m"] * 5 + ["a"]) * 4),
        ("m x 3 a", ["m", "m", "m", "a"]),
        ("(m x 2 a) x 2 m", ["m", "m", "a", "m", "m", "a", "m"]),
        ("((m a) x 2 m) x 2", ["m", "a", "m", "a", "m"] * 2),
        ("(m a)x3", ["m", "a"] * 3),
        ("m * 2 a*2", ["m", "m", "a", "a"]),
        ("m x3 a", ["m", "m", "m", "a"]),
        ("a", ["a"]),
        ("mamba attention mlp", ["mamba", "attention", "mlp"]),
        ("MMMMM*", ["mamba"] * 5 + ["attention"]),
        ("M-M-M*-", ["mamba", "mlp", "mamba", "mlp", "mamba", "attention", "mlp"]),
        (["m", "a", "m"], ["m", "a", "m"]),
    ],
)
def test_layout_forms(layout: Any, names: list[str]) -> None:
    model = load_recipe(recipe(layout, d_model=128)).model
    assert model.layer_names() == names
    assert model.n_layer == len(model.layers()) == len(names)


def test_builtin_templates_and_user_redefinition() -> None:
    model = load_recipe(recipe("M-*")).model
    mamba, mlp, attn = model.layers()
    assert mamba.mlp is None and mamba.mixer.kind == "mamba3" and mamba.mixer.d_state == 128
    assert mlp.mixer is None and mlp.mlp.kind == "mlp"
    assert attn.mixer.kind == "attention"
    blocks = {"mamba": {"mixer": {"kind": "mamba3", "d_state": 16, "headdim": 16}}}
    model = load_recipe(recipe("MM", blocks=blocks)).model
    assert [b.mixer.d_state for b in model.layers()] == [16, 16]


def test_custom_symbols() -> None:
    model = load_recipe(recipe("SSA", symbols={"S": "m", "A": "a"})).model
    assert model.layer_names() == ["m", "m", "a"]


def test_list_layout_with_inline_block() -> None:
    inline = {"mixer": {"kind": "attention", "n_heads": 2, "head_dim": 32, "window": 8}}
    model = load_recipe(recipe(["m", inline, "a"])).model
    assert model.layer_names() == ["m", "inline", "a"]
    layer = model.layers()[1]
    assert layer.mlp is None and layer.mixer.window == 8 and layer.mixer.position == "rope"


def test_override_forms_negative_nested_and_kind_swap() -> None:
    flat = load_recipe(recipe(overrides={-1: {"mixer.window": 16}})).model
    nested = load_recipe(recipe(overrides={2: {"mixer": {"window": 16}}})).model
    assert flat.layers() == nested.layers()
    assert [b.mixer.window for b in flat.layers() if b.mixer.kind == "attention"] == [16]
    swap = {0: {"mixer": {"kind": "attention", "n_heads": 2, "head_dim": 32}, "mlp": None}}
    model = load_recipe(recipe(overrides=swap)).model
    first, second = model.layers()[:2]
    assert first.mixer.kind == "attention" and first.mlp is None
    assert second.mixer.kind == "mamba3" and second.mlp.d_ff == 128
    assert model.layer_names()[0] == "m"


# --- errors: every one names the dotted key and what is allowed ---------------------------------
def test_unknown_keys_list_the_allowed_keys() -> None:
    err = error_of({"modle": {}, "model": recipe()["model"]})
    assert "name, description, seed, model" in problem(err, "modle")
    data = recipe(dlayers=3)
    msg = problem(error_of(data), "model.dlayers")
    assert "allowed keys" in msg and "d_model" in msg and "layout" in msg
    msg = problem(error_of(with_block("mixer", "m", dstate=8)), "model.blocks.m.mixer.dstate")
    assert "allowed keys" in msg and "d_state" in msg and "mimo_rank" in msg
    msg = problem(error_of(with_block("mixer", "a", heads=8)), "model.blocks.a.mixer.heads")
    assert "n_heads" in msg and "n_kv_heads" in msg and "d_state" not in msg
    msg = problem(
        error_of(recipe(["m", {"mixer": {"kind": "mlp", "dff": 3}}])), "model.layout.1.mixer.dff"
    )
    assert "d_ff" in msg and "multiple_of" in msg


def test_an_empty_unknown_key_is_named() -> None:
    """``'': 1`` was reported with no key at all, like a problem of the whole file."""
    err = error_of({"": 1, "model": recipe(**{"": 2})["model"]})
    assert "allowed keys" in problem(err, "''") and "d_model" in problem(err, "model.''")
    assert "\n  '': unknown key (value 1)" in str(err)


def test_error_text_names_file_key_value_and_allowed(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_block("mixer", "m", outproj_norm="grouped")))
    text = str(error_of(path))
    assert str(path) in text and "model.blocks.m.mixer.outproj_norm" in text
    assert "'grouped'" in text and "'grouped_pregate'" in text and "'postgate'" in text


@pytest.mark.parametrize(
    ("data", "key", "needles"),
    [
        (recipe(d_model="big"), "model.d_model", ["valid integer", "'big'"]),
        (recipe(tie_embeddings="maybe"), "model.tie_embeddings", ["boolean", "'maybe'"]),
        (recipe(vocab_size=0), "model.vocab_size", ["greater than 0", "got 0"]),
        (
            with_block("mixer", "m", kind="mamba4"),
            "model.blocks.m.mixer.kind",
            ["'mamba4'", "attention, mamba3, mlp"],
        ),
        (
            with_block("mixer", "m", headdim=24),
            "model.blocks.m.mixer.headdim",
            ["headdim 24", "divisors of 128"],
        ),
        (
            with_block("mixer", "a", n_kv_heads=3),
            "model.blocks.a.mixer.n_kv_heads",
            ["n_kv_heads 3", "divisors of 4"],
        ),
        (
            with_block("mixer", "m", chunk_size=48),
            "model.blocks.m.mixer.chunk_size",
            ["power of two", "48"],
        ),
        (with_block("mixer", "m", d_state=15), "model.blocks.m.mixer.d_state", ["even", "15"]),
        (
            with_block("mixer", "m", rope_fraction=0.3),
            "model.blocks.m.mixer.rope_fraction",
            ["0.5 or 1", "0.3"],
        ),
        (with_block("mixer", "m", mimo_rank=0), "model.blocks.m.mixer.mimo_rank", [">= 1", "0"]),
        (
            with_block("mixer", "a", causal=False),
            "model.blocks.a.mixer.causal",
            ["always causal", "delete this key", "False"],
        ),
        (
            with_block("mixer", "a", causal=True),
            "model.blocks.a.mixer.causal",
            ["always causal", "delete this key", "True"],
        ),
        (
            with_block("mixer", "a", position="alibi"),
            "model.blocks.a.mixer.position",
            ["'rope'", "'nope'", "'alibi'"],
        ),
        (recipe(blocks={"e": {}}, layout="e"), "model.blocks.e", ["mixer, mlp"]),
        (
            recipe(d_model=80, layout="mamba"),
            "model.blocks.mamba.mixer.headdim",
            ["divisors of 160", "built-in"],
        ),
    ],
)
def test_field_and_shape_errors(data: dict[str, Any], key: str, needles: list[str]) -> None:
    msg = problem(error_of(data), key)
    for needle in needles:
        assert needle in msg, msg


def test_missing_required_keys() -> None:
    err = error_of({"model": {"d_model": 64}})
    assert "required" in problem(err, "model.vocab_size")
    assert "required" in problem(err, "model.layout")


def test_long_repetition_chains_multiply_instead_of_nesting() -> None:
    """``m x 1 x 1 ...`` (a thousand times) used to nest a thousand groups and overflow the
    recursion that walks them; counts now multiply, so it is one layer and ``(m a) x 2 x 3``
    twelve."""
    assert len(load_recipe(recipe("m" + " x 1" * 1000)).model.layer_names()) == 1
    assert len(load_recipe(recipe("m" + "*1" * 1000)).model.layer_names()) == 1
    assert load_recipe(recipe("(m a) x 2 x 3")).model.layer_names() == ["m", "a"] * 6
    assert (
        load_recipe(recipe("((m a) x 2 m) x 2")).model.layer_names()
        == ["m", "a", "m", "a", "m"] * 2
    )


@pytest.mark.parametrize(
    ("layout", "needles"),
    [
        ("m q a", ["unknown template 'q'", "known templates: a, attention, m, mamba, mlp"]),
        ("MMX*", ["unknown Megatron symbol", "'X'", "'M' (mamba)", "'*' (attention)"]),
        ("", ["layout is empty"]),
        ("   ", ["layout is empty"]),
        ([], ["layout is empty"]),
        ("m x 0", ["bad repetition count 0", "positive integer"]),
        ("m x 1.5", ["bad repetition count 1.5", "positive integer"]),
        ("m x", ["repetition count", "positive integer"]),
        ("x 2 m", ["needs a name or a group before it"]),
        ("(m a x 2", ["unbalanced parentheses", "never closed"]),
        ("m a) x 2", ["unbalanced parentheses", "without a matching '('"]),
        ("m () a", ["empty group"]),
        ("m + a", ["unexpected character '+'", "allowed"]),
        ("m 3", ["unexpected number 3"]),
        (["m", "zz"], ["unknown template 'zz'", "known templates"]),
        ("(" * 33 + "m" + ")" * 33, ["nested more than 32 deep", "at most 32 levels"]),
        ("(" * 5000 + "m" + ")" * 5000, ["nested more than 32 deep"]),  # was a RecursionError
    ],
)
def test_layout_errors(layout: Any, needles: list[str]) -> None:
    err = error_of(recipe(layout))
    key = "model.layout.1" if isinstance(layout, list) and layout else "model.layout"
    msg = problem(err, key)
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize(
    ("overrides", "key", "needles"),
    [
        ({3: {"mixer.window": 8}}, "model.overrides.3", ["out of range", "-3..2"]),
        ({-4: {"mixer.window": 8}}, "model.overrides.-4", ["out of range", "-3..2"]),
        (
            {2: {"mixer.windw": 8}},
            "model.overrides.2.mixer.windw",
            ["unknown key", "window", "n_kv_heads"],
        ),
        ({2: {"mixr.window": 8}}, "model.overrides.2.mixr.window", ["unknown key", "mixer.window"]),
        (
            {2: {"mixer.window": "big"}},
            "model.overrides.2.mixer.window",
            ["valid integer", "'big'"],
        ),
        ({2: {"mixer.window": 0}}, "model.overrides.2.mixer.window", ["greater than 0"]),
        ({0: {"mixer.chunk_size": 24}}, "model.overrides.0.mixer.chunk_size", ["power of two"]),
        ({2: {"mixer.n_kv_heads": 3}}, "model.overrides.2.mixer.n_kv_heads", ["divisors of 4"]),
        ({0: {"mixer.headdim": 48}}, "model.overrides.0.mixer.headdim", ["divisors of 128"]),
        ({2: {"mixer.causal": True}}, "model.overrides.2.mixer.causal", ["always causal"]),
        # one layer named twice in different spellings: the last one silently won
        (
            {1: {"mixer.window": 8}, "1": {"mixer.window": 4}},
            "model.overrides",
            ["layer 1 is named more than once (1, '1')"],
        ),
        # a boolean key (YAML's on / true) was read as layer 1
        ({True: {"mixer.window": 8}}, "model.overrides.true", ["got a boolean (true)"]),
        (
            {"+2": {"mixer.window": 8}, " 2": {"mixer.window": 4}},
            "model.overrides",
            ["layer 2 is named more than once ('+2', ' 2')"],
        ),
    ],
)
def test_override_errors(overrides: dict[int, Any], key: str, needles: list[str]) -> None:
    msg = problem(error_of(recipe(overrides=overrides)), key)
    for needle in needles:
        assert needle in msg, msg


def test_all_problems_are_reported_together() -> None:
    data = recipe(overrides={9: {"mixer.window": 8}, 0: {"mixer.d_state": 15}})
    data["model"]["blocks"]["a"]["mixer"]["n_kv_heads"] = 3
    data["model"]["blocks"]["m"]["mixer"]["headdim"] = 24
    err = error_of(data)
    keys = {k for k, _ in err.problems}
    assert {
        "model.overrides.9",
        "model.overrides.0.mixer.d_state",
        "model.blocks.a.mixer.n_kv_heads",
        "model.blocks.m.mixer.headdim",
    } <= keys
    data = recipe()
    data["model"]["blocks"]["m"]["mixer"].update(d_state=15, chunk_size=3, foo=1)
    keys = {k for k, _ in error_of(data).problems}
    assert {
        "model.blocks.m.mixer.d_state",
        "model.blocks.m.mixer.chunk_size",
        "model.blocks.m.mixer.foo",
    } <= keys


def test_model_spec_validates_on_its_own() -> None:
    with pytest.raises(ValueError, match="unknown template"):
        ModelSpec(vocab_size=8, layout="nope")
    spec = ModelSpec(vocab_size=8, layout="mamba x 2")
    assert spec.d_model == 256 and spec.n_layer == 2


# --- dump / reload --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        recipe("(m m a) x 2", overrides={5: {"mixer.window": 32}, 0: {"mixer": {"mimo_rank": 2}}}),
        recipe(
            "MM*-",
            blocks={
                "mamba": {
                    "mixer": {"kind": "mamba3", "mimo_rank": 4, "chunk_size": 16, "headdim": 32}
                }
            },
        ),
        recipe(
            [
                "m",
                {
                    "mixer": {
                        "kind": "mamba3",
                        "outproj_norm": "pregate",
                        "headdim": 32,
                        "rope": False,
                        "trapezoid": False,
                    }
                },
                "a",
            ]
        ),
        recipe(
            "m a",
            blocks={
                "m": {
                    "mixer": {
                        "kind": "mamba3",
                        "headdim": 32,
                        "outproj_norm": "grouped_postgate",
                        "ngroups": 2,
                        "a_activation": "softplus",
                    }
                },
                "a": A,
            },
            tie_embeddings=False,
        ),
    ],
)
def test_dump_reload_round_trip(data: dict[str, Any], tmp_path: Path) -> None:
    spec = load_recipe(data)
    path = tmp_path / "run" / "recipe.yaml"
    text = dump_recipe(spec, path)
    assert path.read_text() == text
    assert [p.name for p in path.parent.iterdir()] == ["recipe.yaml"]  # no temp file left
    again = load_recipe(path)
    assert again == spec
    assert again.model.layers() == spec.model.layers()
    assert dump_recipe(again) == text
    assert recipe_to_dict(again) == yaml.safe_load(text)


def test_dump_is_fully_resolved() -> None:
    dumped = yaml.safe_load(dump_recipe(load_recipe(EXAMPLE)))
    mixer = dumped["model"]["blocks"]["m"]["mixer"]
    assert mixer["expand"] == 2.0 and mixer["a_activation"] == "heavy_tail"
    assert mixer["outproj_norm"] == "grouped_pregate"
    assert "causal" not in dumped["model"]["blocks"]["a"]["mixer"]  # always causal, no setting
    assert dumped["model"]["symbols"] == {"M": "mamba", "*": "attention", "-": "mlp"}
    assert dumped["description"] is None and dumped["seed"] == 0


# --- --set overrides ---------------------------------------------------------------------------
def test_set_overrides() -> None:
    spec = load_recipe(
        EXAMPLE,
        [
            "model.d_model=128",
            "model.blocks.m.mixer.d_state=32",
            "seed=3",
            "name=null",
            "model.tie_embeddings=false",
            "model.overrides.5.mixer.window=64",
            "model.overrides.1.mixer.rope=off",
        ],
    )
    assert spec.model.d_model == 128 and spec.seed == 3 and spec.name is None
    assert spec.model.tie_embeddings is False
    layers = spec.model.layers()
    assert layers[0].mixer.d_state == 32 and layers[5].mixer.window == 64
    assert layers[1].mixer.rope is False and layers[0].mixer.rope is True
    spec = load_recipe(recipe(["m", "a"]), ["model.layout.1=m", "model.layout.-1=m"])
    assert spec.model.layer_names() == ["m", "m"]
    spec = load_recipe(recipe(), ["model.layout=[m, a]"])
    assert spec.model.layer_names() == ["m", "a"]


def test_set_override_errors() -> None:
    for bad in ("model.d_model", "=3", "model..d_model=3", " =3"):
        err = error_of(recipe(), (bad,))
        assert "malformed override" in str(err) and "dotted.key=value" in str(err)
    err = error_of(recipe(), ("model.d_model.x=1",))
    assert "'model.d_model.x=1'" in str(err) and "not a mapping" in str(err)
    err = error_of(recipe(["m", "a"]), ("model.layout.5=m",))
    assert "out of range" in problem(err, "model.layout.5") and "-2..1" in str(err)
    err = error_of(recipe(["m", "a"]), ("model.layout.first=m",))
    assert "not an integer index" in str(err)
    err = error_of(recipe(), ("model.d_model=[1",))
    assert "not valid YAML" in str(err)
    err = error_of(recipe(), ("model.dmodel=3",))
    assert "allowed keys" in problem(err, "model.dmodel")
    err = error_of(recipe(), ("model.d_model=abc",))
    assert "valid integer" in problem(err, "model.d_model")
    # YAML reads no / yes as booleans: the message says so where a boolean was not expected
    hint = "YAML reads yes / no / on / off / true / false as a boolean: quote the value"
    assert hint in problem(error_of(recipe(), ("name=yes",)), "name")
    err = error_of(recipe(["m", "a"]), ("model.blocks.a.mixer.position=no",))
    assert hint in problem(err, "model.blocks.a.mixer.position") and "'rope'" in str(err)
    assert hint not in str(error_of(recipe(), ("model.tie_embeddings=maybe",)))


# --- files -----------------------------------------------------------------------------------
def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    err = error_of(missing)
    assert str(missing) in str(err) and "not found" in str(err)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  d_model: [64\n  vocab_size: 3\n")
    err = error_of(broken)
    assert str(broken) in str(err) and "YAML syntax error" in str(err) and "line" in str(err)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert "must be a mapping" in str(error_of(listing))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert str(empty) in str(error_of(empty)) and "empty" in str(error_of(empty))


def test_dict_input_is_not_mutated() -> None:
    data = recipe()
    before = copy.deepcopy(data)
    load_recipe(data, ["model.d_model=128"])
    assert data == before


def test_rejected_assignment_leaves_the_spec_unchanged() -> None:
    model = load_recipe(recipe()).model
    with pytest.raises(ValueError, match="unknown template 'zz'"):
        model.layout = "zz"
    assert model.layout == "m m a"
    model.layout = "m x 2"
    assert model.layer_names() == ["m", "m"]


def test_the_training_data_seed_must_differ_from_the_eval_seed() -> None:
    """Training batch of step s: SeedSequence([data seed, s]); eval set at length L:
    SeedSequence([eval_seed, L]). With equal seeds the batch of step L copied the eval set."""
    data = recipe()
    data["task"] = {"kind": "parity", "seq_len": 16}
    for overrides, named in (
        (("task.seed=1234",), "task.seed = 1234"),
        (("train.seed=1234",), "train.seed = 1234"),
        (("seed=1234",), "seed = 1234"),
        (("seed=7", "task.eval_seed=7"), "seed = 7"),
    ):
        msg = problem(error_of(data, overrides), "task.eval_seed")
        assert f"equals the training data's seed ({named})" in msg, msg
    # the most specific data seed decides: a task seed apart from eval_seed is fine
    load_recipe(data, ("seed=1234", "task.seed=5"))


def test_layout_counts_past_python_int_limits_and_whole_block_overrides_are_named() -> None:
    """A repetition count of 5,000 digits hit Python's int-conversion limit (a message about
    sys.set_int_max_str_digits, reported at ``model``); an override that empties a whole block
    was reported at ``model.overrides.1.`` (a trailing dot)."""
    err = error_of(recipe(layout="m x " + "9" * 5000))
    msg = problem(err, "model.layout")
    assert "(5000 digits) is too large; allowed: at most 1024 layers" in msg
    assert "set_int_max_str_digits" not in str(err)
    assert len(load_recipe(recipe(layout="m x 0002")).model.layers()) == 2  # leading zeros: fine
    err = error_of(recipe(overrides={1: {"mixer": None, "mlp": None}}))
    assert "a block needs a mixer, an mlp, or both" in problem(err, "model.overrides.1")
