"""Hostile inputs: mutated recipes, study files and ``--set`` values never hang, crash or write.

A new user's typo, a file from an untrusted source and a fuzzer look alike to the loader. This
module generates a few hundred of them from the shipped recipes and studies with its own seeded
generator -- unknown keys, wrong types at every key, bad enum values, YAML syntax errors, bytes
that are not UTF-8, unsafe tags, deep nesting, alias bombs, huge numbers, NaN / inf, negative and
zero sizes, empty files, lists where mappings belong -- and runs each through the command line
in-process (``hybridkit show`` for recipes and ``--set`` values, ``hybridkit study`` for study
files). Every case must

* exit with status 2 (a few mutations can also yield a valid file: those may exit 0),
* print a message that names the file and the key (or, for text that is not valid YAML, the line),
* print no traceback,
* finish within :data:`TIME_LIMIT` seconds (a hard alarm turns a hang into a failure), and
* write nothing: each case runs in its own empty directory, which must hold only its input after.

The generator walks the parsed file for every key path and mutates a seeded sample of them, so a
new recipe or a new key is fuzzed without editing this file (about 530 cases, ~15 s on 2 cores).
Bad command-line option values (``--seq-len``, ``--temperature``, ...) are checked at the end.
"""

from __future__ import annotations

import copy
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hybridkit.cli import main

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "hybridkit" / "recipes").glob("*.yaml"))
STUDIES = sorted((ROOT / "hybridkit" / "recipes" / "studies").glob("*.yaml"))
TIME_LIMIT = 2.0
RAW = "__RAW_SNIPPET__"

# Values that fail wherever they are put (each is of a type or size no recipe key accepts).
DEEP_FLOW = "[" * 3000 + "]" * 3000
ALIAS_BOMB = (
    "[&a0 [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9))
    + "]"
)
UNSAFE_TAGS = (
    "!!python/object/apply:os.system ['touch PWNED']",
    "!!python/name:os.system",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!custom 1",
)
SYNTAX_ERRORS = (
    "zz_broken: [1, 2",
    "zz_broken: {a: 1",
    "zz_broken: 'unterminated",
    "\tzz_broken: 1",
    "zz_broken: *undefined_alias",
    "@zz_broken: 1",
    "zz_broken: a: b",
)
EMPTY_FILES = ("", "\n\n", "# only a comment\n", "---\n", "~\n", "[]\n", "42\n", "just text\n")
FREE_TEXT = {"name", "description", "base", "path"}  # any string is valid there


@dataclass(frozen=True)
class Case:
    """One input: its text, the command around it, and what the error must name."""

    id: str
    text: bytes
    needle: str  # the error must contain this: a dotted key, or "line " for YAML-level errors
    must_fail: bool = True
    set_args: tuple[str, ...] = ()  # extra --set values (the --set fuzz)


# --- the generator -----------------------------------------------------------------------------
def key_paths(data: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every (path, value) below the top level, depth first; list items by index."""
    items = (
        data.items()
        if isinstance(data, dict)
        else enumerate(data)
        if isinstance(data, list)
        else ()
    )
    for key, value in items:
        yield (*path, key), value
        yield from key_paths(value, (*path, key))


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def replaced(data: Any, path: tuple, value: Any) -> Any:
    out = copy.deepcopy(data)
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


def dump(data: Any, raw: str | None = None) -> bytes:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)
    if raw is not None:
        assert text.count(RAW) == 1, text
        text = text.replace(RAW, raw)
    return text.encode("utf-8")


def parses(text: str) -> bool:
    try:
        yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return True


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def wrong_type(value: Any) -> Any:
    """A value of a type the key cannot take (given what the file holds there now)."""
    if isinstance(value, str):
        return {"zz_wrong_type": 1}
    if isinstance(value, (list, dict)):
        return "zz_wrong_type"
    if value is None:
        return [1, 2]
    return "zz_wrong_type"  # numbers and booleans


def mutations(data: dict, rng: random.Random, per_kind: int) -> Iterator[Case]:
    """Cases derived from one parsed file; ``per_kind`` sampled key paths per mutation kind."""
    paths = list(key_paths(data))
    mappings = [(p, v) for p, v in paths if isinstance(v, dict)] + [((), data)]
    strings = [(p, v) for p, v in paths if isinstance(v, str) and p[-1] not in FREE_TEXT]
    numbers = [(p, v) for p, v in paths if is_number(v)]

    def sample(pool: list, k: int = per_kind) -> list:
        return rng.sample(pool, min(k, len(pool)))

    for path, _ in sample(mappings):
        key = (*path, "zz_unknown_key")
        yield Case(f"unknown_key:{dotted(key)}", dump(replaced(data, key, 1)), dotted(key))
    for path, value in sample(paths, 2 * per_kind):
        new = replaced(data, path, wrong_type(value))
        yield Case(f"wrong_type:{dotted(path)}", dump(new), dotted(path))
    for path, _ in sample(strings):
        new = replaced(data, path, "zz_bad_value")
        yield Case(f"bad_value:{dotted(path)}", dump(new), dotted(path), must_fail=False)
    for path, value in sample([(p, v) for p, v in paths if isinstance(v, dict)]):
        new = replaced(data, path, list(value.items()))
        yield Case(f"list_for_mapping:{dotted(path)}", dump(new), dotted(path))
    for path, _ in sample(numbers):
        for label, raw in (
            ("huge_int", str(10**30)),
            ("huge_negative", str(-(2**70))),
            ("digits", "9" * 5000),
            ("overflow_float", "1.0e+400"),
            ("nan", ".nan"),
            ("neg_inf", "-.inf"),
        ):
            needle = "line " if label == "digits" else dotted(path)
            text = dump(replaced(data, path, RAW), raw)
            yield Case(f"{label}:{dotted(path)}", text, needle)
        yield Case(f"negative:{dotted(path)}", dump(replaced(data, path, -1)), dotted(path))
        yield Case(
            f"zero:{dotted(path)}", dump(replaced(data, path, 0)), dotted(path), must_fail=False
        )
    for path, _ in sample(paths, 1):
        for label, raw in (("deep_nesting", DEEP_FLOW), ("alias_bomb", ALIAS_BOMB)):
            text = dump(replaced(data, path, RAW), raw)
            yield Case(f"{label}:{dotted(path)}", text, "line ")
        yield Case(
            f"recursive_alias:{dotted(path)}",
            dump(replaced(data, path, RAW), "&self [1, *self]"),
            "line ",
        )
    for path, _ in sample(paths, 1):
        tag = rng.choice(UNSAFE_TAGS)
        yield Case(f"unsafe_tag:{dotted(path)}", dump(replaced(data, path, RAW), tag), "line ")
    lines = dump(data).decode().splitlines(keepends=True)
    for snippet in rng.sample(SYNTAX_ERRORS, 2):
        at = rng.randrange(len(lines) + 1)
        text = "".join(lines[:at]) + snippet + "\n" + "".join(lines[at:])
        # inside a block scalar (a folded `description: >`) the snippet is just more text
        yield Case(f"syntax:{snippet.strip()[:12]}@{at}", text.encode(), "line ", not parses(text))
    body = dump(data)
    at = rng.randrange(len(body))
    yield Case("not_utf8", body[:at] + b"\xff\xfe" + body[at:], "UTF-8")
    yield Case("block_nesting", dump(data) + nested_block(200), "line ")
    yield Case("duplicate_key", dump(data) + dump({next(iter(data)): None}), "line ")


def nested_block(depth: int) -> bytes:
    return "".join(f"{'  ' * i}zz{i}:\n" for i in range(depth)).encode() + b"  " * depth + b"x\n"


def recipe_cases() -> list[Case]:
    cases = []
    for path in RECIPES:
        rng = random.Random(path.stem)
        data = yaml.safe_load(path.read_text())
        for case in mutations(data, rng, per_kind=1):
            cases.append(Case(f"{path.stem}/{case.id}", case.text, case.needle, case.must_fail))
    for i, text in enumerate(EMPTY_FILES):
        cases.append(Case(f"empty/{i}", text.encode(), "mapping"))
    return cases


def set_cases() -> list[Case]:
    """Hostile ``--set KEY=VALUE`` on a valid recipe: the error must name KEY."""
    base = ROOT / "hybridkit" / "recipes" / "mqar_tiny.yaml"
    data = yaml.safe_load(base.read_text())
    text = base.read_bytes()
    rng = random.Random("--set")
    cases = []
    paths = list(key_paths(data))
    for path, value in rng.sample(paths, 12):
        key = dotted(path)
        for label, raw in (
            ("wrong_type", yaml.safe_dump(wrong_type(value), default_flow_style=True).strip()),
            ("deep_nesting", DEEP_FLOW),
            ("alias_bomb", ALIAS_BOMB),
            ("unsafe_tag", rng.choice(UNSAFE_TAGS)),
            ("huge_int", "9" * 5000),
            ("nan", ".nan"),
            ("syntax", "[1, 2"),
            ("not_utf8", "caf\udce9"),  # how Python hands undecodable argv bytes over
        ):
            cases.append(Case(f"set/{label}:{key}", text, key, set_args=(f"{key}={raw}",)))
    deep_key = ".".join(["model"] + ["zz"] * 5000)
    cases.append(Case("set/long_key", text, "model.zz", set_args=(f"{deep_key}=1",)))
    cases.append(Case("set/unknown", text, "model.zz_unknown", set_args=("model.zz_unknown=1",)))
    cases.append(Case("set/no_equals", text, "model.d_model", set_args=("model.d_model",)))
    return cases


def study_cases() -> list[Case]:
    cases = []
    for path in STUDIES:
        rng = random.Random(path.stem)
        data = yaml.safe_load(path.read_text())
        data["base"] = str((path.parent / data["base"]).resolve())
        for case in mutations(data, rng, per_kind=1):
            if not case.must_fail:
                continue  # a valid study would start training
            cases.append(Case(f"{path.stem}/{case.id}", case.text, case.needle))
        # Overrides are only judged when a variant's recipe is loaded: still before any output.
        variant = rng.choice(sorted(data["variants"]))
        for label, text, needle in (
            ("variant_override", "model.zz_unknown_key=1", f"variants.{variant}."),
            ("variant_value", "model.d_model=zz_wrong_type", "model.d_model"),
            ("variant_kind", "model.blocks.m.mixer.kind={zz: 1}", "mixer.kind"),
        ):
            new = copy.deepcopy(data)
            new["variants"][variant] = [*new["variants"][variant], text]
            cases.append(Case(f"{path.stem}/{label}:{variant}", dump(new), needle))
        new = dict(data, set=[*data.get("set", []), "train.lr=.inf"])
        cases.append(Case(f"{path.stem}/study_set", dump(new), "set."))
    return cases


RECIPE_CASES = recipe_cases()
SET_CASES = set_cases()
STUDY_CASES = study_cases()


# --- running a case ----------------------------------------------------------------------------
class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"no answer within {4 * TIME_LIMIT} s")


def run_case(case: Case, command: str, tmp_path: Path, capsys, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    name = "study.yaml" if command == "study" else "recipe.yaml"
    (work / name).write_bytes(case.text)
    args = [command, str(work / name)]
    if command == "study":
        args += ["-o", str(work / "out"), "--no-progress", "--device", "cpu"]
    else:
        args += ["--device", "cpu"]
    for value in case.set_args:
        args += ["--set", value]
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 4 * TIME_LIMIT)
    start = time.perf_counter()
    try:
        rc = main(args)
    finally:
        elapsed = time.perf_counter() - start
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert elapsed < TIME_LIMIT, f"{case.id} took {elapsed:.2f} s"
    assert sorted(p.name for p in work.iterdir()) == [name], "the command wrote files"
    if case.must_fail or rc != 0:
        assert rc == 2, (rc, err)
        assert str(work / name) in err, err
        assert case.needle in err, f"expected {case.needle!r} in:\n{err}"


@pytest.fixture
def no_training(monkeypatch):
    """A study that validates would train: fail loudly instead of spending minutes."""

    def refuse(*args, **kwargs):
        raise AssertionError("a fuzzed study file passed validation and started training")

    monkeypatch.setattr("hybridkit.study.Trainer", refuse)


@pytest.mark.parametrize("case", RECIPE_CASES, ids=lambda c: c.id)
def test_hostile_recipe(case, tmp_path, capsys, monkeypatch, one_thread):
    run_case(case, "show", tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("case", SET_CASES, ids=lambda c: c.id)
def test_hostile_set_value(case, tmp_path, capsys, monkeypatch, one_thread):
    run_case(case, "show", tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("case", STUDY_CASES, ids=lambda c: c.id)
def test_hostile_study_file(case, tmp_path, capsys, monkeypatch, no_training):
    run_case(case, "study", tmp_path, capsys, monkeypatch)


def test_the_fuzz_covers_every_kind_of_mutation():
    """The generator really produces each kind of hostile input, in the hundreds."""
    cases = RECIPE_CASES + SET_CASES + STUDY_CASES
    kinds = {c.id.split("/")[-1].split(":")[0].split("@")[0] for c in cases}
    expected = {
        "unknown_key", "wrong_type", "bad_value", "list_for_mapping", "huge_int", "digits",
        "overflow_float", "nan", "neg_inf", "negative", "zero", "deep_nesting", "alias_bomb",
        "recursive_alias", "unsafe_tag", "syntax", "not_utf8", "block_nesting", "duplicate_key",
        "variant_override", "variant_value", "variant_kind", "study_set",
    }  # fmt: skip
    assert expected <= kinds, expected - kinds
    assert any(c.id.startswith("empty/") for c in cases)
    assert 300 <= len(cases) <= 1000, len(cases)


def test_the_three_reported_inputs_read_clearly(tmp_path, cli_error):
    """The inputs of the original report: deep nesting (was a RecursionError), a mapping as a
    layer kind (was ``TypeError: unhashable type``) and an alias bomb (never finished)."""
    tiny = yaml.safe_load((ROOT / "hybridkit" / "recipes" / "tiny_hybrid.yaml").read_text())
    deep = tmp_path / "deep.yaml"
    deep.write_bytes(dump(replaced(tiny, ("name",), RAW), DEEP_FLOW))
    assert "YAML error at line 1, column 70: nested more than 64 levels deep" in cli_error(
        "show", str(deep)
    )
    kind = tmp_path / "kind.yaml"
    kind.write_bytes(dump(replaced(tiny, ("model", "blocks", "m", "mixer", "kind"), {"nested": 1})))
    msg = cli_error("show", str(kind))
    assert "model.blocks.m.mixer.kind: kind must be a string naming a layer kind" in msg
    bomb = tmp_path / "bomb.yaml"
    bomb.write_bytes(dump(replaced(tiny, ("description",), RAW), ALIAS_BOMB))
    assert "aliases expand to more than 20000 values" in cli_error("show", str(bomb))
    reuse = tmp_path / "reuse.yaml"  # aliases within the budget are fine
    text = (ROOT / "hybridkit" / "recipes" / "tiny_hybrid.yaml").read_text()
    text = text.replace("mlp: {kind: mlp, d_ff: 64}", "mlp: &mlp {kind: mlp, d_ff: 64}", 1)
    reuse.write_text(text.replace("mlp: {kind: mlp, d_ff: 64}", "mlp: *mlp"))
    assert "*mlp" in reuse.read_text()
    assert main(["show", str(reuse), "--device", "cpu"]) == 0


def test_second_fuzz_findings_read_clearly(tmp_path, cli_error):
    """From the second CLI fuzz: a lone surrogate escaped into a name (was a UnicodeEncodeError
    when the name was printed), a symlink loop given as a plugin (was Python's RuntimeError)."""
    text = (ROOT / "hybridkit" / "recipes" / "tiny_hybrid.yaml").read_text()
    lone = tmp_path / "lone.yaml"
    lone.write_text('name: "\\ud800"\n' + "".join(
        line + "\n" for line in text.splitlines() if not line.startswith("name:")
    ))  # fmt: skip
    msg = cli_error("show", str(lone))
    assert "line 1, column 7: the escape \\ud800 is a lone surrogate" in msg
    pair = tmp_path / "pair.yaml"
    pair.write_text(lone.read_text().replace("\\ud800", "\\U0001F600"))
    assert main(["show", str(pair), "--device", "cpu"]) == 0
    loop = tmp_path / "loop.py"
    loop.symlink_to(loop)
    assert "loop.py" in cli_error("show", str(lone.with_name("pair.yaml")), "--plugin", str(loop))


def test_show_of_the_largest_allowed_model_is_quick(capsys):
    """Sizes at their upper bounds are valid; ``show`` builds them on the meta device."""
    recipe = str(ROOT / "hybridkit" / "recipes" / "hybrid_l.yaml")
    sets = ["model.d_model=65536", "model.vocab_size=16777216", "model.layout=(m a) x 128"]
    sets += ["model.blocks.a.mixer.n_heads=1024", "model.blocks.m.mixer.d_state=4096"]
    start = time.perf_counter()
    assert main(["show", recipe, "--device", "cpu", *[f"--set={s}" for s in sets]]) == 0
    assert time.perf_counter() - start < 4 * TIME_LIMIT
    assert "256 layers" in capsys.readouterr().out


BAD_OPTIONS = [
    ("show", "--seq-len", "100000000000000000000"),
    ("show", "--seq-len", "-5"),
    ("show", "--batch", "0"),
    ("generate", "--batch", "0"),
    ("generate", "--max-new-tokens", "-1"),
    ("generate", "--top-k", "0"),
    ("generate", "--temperature", "nan"),
    ("generate", "--temperature", "-1"),
    ("generate", "--seed", "-1"),
    ("check", "--tol", "-1"),
    ("check", "--tol", "inf"),
    ("check", "--prefill", "0"),
    ("check", "--steps", "x"),
    # beyond 64 bits: an OverflowError traceback from torch when the ids or caches were made
    ("check", "--batch", str(10**23)),
    ("check", "--prefill", str(10**23)),
    ("check", "--steps", str(10**23)),
    ("generate", "--max-new-tokens", str(10**23)),
]


@pytest.mark.parametrize(("command", "option", "value"), BAD_OPTIONS)
def test_hostile_option_values(command, option, value, capsys):
    """Command-line values are checked where argparse reads them: a usage error naming the
    option (exit status 2), never a traceback from deep inside the command."""
    recipe = str(ROOT / "hybridkit" / "recipes" / "tiny_hybrid.yaml")
    with pytest.raises(SystemExit) as info:
        main([command, recipe, option, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {option}: " in err and "Traceback" not in err


def test_eval_lengths_are_bounded(tmp_path, cli_error):
    from hybridkit.recipe import dump_recipe, load_recipe

    dump_recipe(
        load_recipe(ROOT / "hybridkit" / "recipes" / "mqar_tiny.yaml"), tmp_path / "recipe.yaml"
    )
    assert "too long" in cli_error("eval", str(tmp_path), "--lengths", "64,100000000000")


def test_damaged_json_files_in_a_study_folder_are_made_again(tmp_path, capsys, one_thread):
    """A run folder's JSON files cut short (a kill while eval.json is written, a copy that
    stopped half-way) read as not written, never as a JSONDecodeError: ``--list`` and
    ``--report`` list the run as unfinished, and the next call writes them again from the run."""
    import json

    study = ROOT / "hybridkit" / "recipes" / "studies" / "lengthgen_quickstart.yaml"
    sets = ["train.steps=2", "train.checkpoint_every=1", "task.eval_examples=4"]
    sets += ["task.eval_lengths=[32]", "eval.decode_examples=0"]
    base = ["study", str(study), "-o", str(tmp_path), *[f"--set={s}" for s in sets]]
    run_args = [*base, "--device", "cpu", "--no-progress", "--only", "variant=mamba3"]
    assert main(run_args) == 0
    run = tmp_path / "mamba3" / "lr0.003-seed0"
    want = json.loads((run / "result.json").read_text())["results"]
    for name in ("result.json", "eval.json", "heldout.json", "final.json"):
        (run / name).write_text('{"cut sh')
    capsys.readouterr()
    assert main([*base, "--list"]) == 0
    assert "mamba3 seed=0 lr=0.003" in capsys.readouterr().out
    assert main([*base, "--report"]) == 0
    assert main(run_args) == 0
    assert json.loads((run / "result.json").read_text())["results"] == want
    assert json.loads((run / "final.json").read_text())["step"] == 2


def test_output_paths_that_cannot_be_directories(tmp_path, cli_error):
    """An output path with a file where a directory must go is refused before any work, naming
    the flag (it was a FileExistsError traceback, after the work); an empty ``-o`` would have
    trained into the current directory."""
    from hybridkit.recipe import dump_recipe, load_recipe

    recipe = str(ROOT / "hybridkit" / "recipes" / "induction_tiny.yaml")
    study = str(ROOT / "hybridkit" / "recipes" / "studies" / "lengthgen_quickstart.yaml")
    run = tmp_path / "run"
    dump_recipe(load_recipe(recipe), run / "recipe.yaml")
    file = tmp_path / "file"
    file.write_text("keep me")
    for args in (
        ["train", recipe, "-o", str(file)],
        ["train", recipe, "-o", str(file / "sub")],
        ["eval", str(run), "--out", str(file)],
        ["study", study, "-o", str(file), "--list"],
        ["bench", "decode", recipe, "--out", str(file / "x"), "--device", "cpu"],
    ):
        assert f"{file} exists and is not a directory" in cli_error(*args), args
    assert "-o/--out needs a directory path" in cli_error("train", recipe, "-o", "")
    assert file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run"]


def test_unreadable_token_files_are_clear(tmp_path, cli_error):
    """A ``tokens`` task's file that is not a .npy array (text, cut short, Python objects, empty)
    is an error naming task.path, not a numpy ValueError / EOFError traceback."""
    import numpy as np

    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(4000) % 64)
    cut = tmp_path / "cut.npy"
    cut.write_bytes(ids.read_bytes()[:1000])
    header = tmp_path / "header.npy"
    header.write_bytes(ids.read_bytes()[:20])
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}] * 10, dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("not numpy")
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "empty.bin").write_bytes(b"")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((ROOT / "hybridkit" / "recipes" / "tiny_hybrid.yaml").read_text())
    task = "task={kind: tokens, path: %s, vocab_size: 64, seq_len: 16, eval_lengths: [16]}"
    for name in ("cut.npy", "header.npy", "objects.npy", "text.npy", "empty.npy", "empty.bin"):
        path = tmp_path / name
        err = cli_error("train", str(recipe), "-o", str(tmp_path / "run"), "--set", task % path)
        assert f"task.path: {str(path)!r} is" in err, err
    assert not (tmp_path / "run").exists()


def test_recipe_eval_lengths_are_checked_when_the_recipe_is_read(cli_error):
    """``eval.lengths`` are checked like ``task.eval_lengths``: they used to pass ``show`` and
    ``train`` and fail only at evaluation (a numpy traceback for a huge one, an error naming
    ``--lengths`` for one the task cannot generate)."""
    recipe = str(ROOT / "hybridkit" / "recipes" / "induction_tiny.yaml")
    for value, message in (
        ("[32, -1]", "eval.lengths.1: induction length must be >= 3"),
        ("[100000000000000]", "eval.lengths.0: length 100000000000000 is too long"),
        ("[]", "eval.lengths: must be a non-empty list"),
    ):
        assert message in cli_error("show", recipe, "--set", f"eval.lengths={value}"), value
    assert main(["show", recipe, "--device", "cpu", "--set", "eval.lengths=[32, 64]"]) == 0


def _tiny_train_args(run) -> list[str]:
    """``hybridkit train`` of induction_tiny into ``run``, a checkpoint every step, a tiny eval
    (append ``--set=train.steps=K``)."""
    recipe = str(ROOT / "hybridkit" / "recipes" / "induction_tiny.yaml")
    sets = ["train.checkpoint_every=1", "task.eval_examples=4", "task.eval_lengths=[32]"]
    sets += ["eval.decode_examples=0", "train.tensorboard=false"]
    return ["train", recipe, "-o", str(run), "--no-progress", *[f"--set={s}" for s in sets]]


def test_checkpoint_state_with_damaged_values_is_clear(tmp_path, capsys, cli_error, one_thread):
    """trainer.json is valid JSON but a value the trainer reads on resuming is damaged (no
    torch_rng, a step that is not a number): named as corrupt -- ``--resume auto`` falls back
    to the older intact checkpoint -- instead of a KeyError / ValueError traceback."""
    import json

    run = tmp_path / "run"
    args = _tiny_train_args(run)
    assert main([*args, "--set=train.steps=2"]) == 0
    newest = run / "checkpoints" / "step_0000002"
    damaged = [("step", "x", "'x'"), ("torch_rng", None, "None"), ("torch_rng", [300], "[300]")]
    damaged += [("history", 5, "5"), ("history", [1], "[1]"), ("elapsed_s", "nan", "'nan'")]
    for key, value, shown in damaged:
        state = json.loads((newest / "trainer.json").read_text())
        (newest / "trainer.json").write_text(json.dumps({**state, key: value}))
        expected = f"{newest / 'trainer.json'} is corrupt ({key}: {shown})"
        assert expected in cli_error(*args, "--set=train.steps=3", "--resume", str(newest))
        (newest / "trainer.json").write_text(json.dumps(state))
    (newest / "trainer.json").write_text(json.dumps({**state, "step": "x"}))
    capsys.readouterr()
    assert main([*args, "--set=train.steps=3"]) == 0
    captured = capsys.readouterr()
    assert "is corrupt (step: 'x')" in captured.err and "at step 1" in captured.out
    # a step past train.steps (10^30 in the fuzz) was "resumed at step 1000...000", rc 0
    (newest / "trainer.json").write_text(json.dumps({**state, "step": 10**30}))
    msg = cli_error(*args, "--set=train.steps=3", "--resume", str(newest))
    assert f"{newest} is at step {10**30}, past train.steps 3" in msg


def test_a_damaged_latest_file_of_a_run_is_clear(tmp_path, cli_error):
    """``checkpoints/latest`` of a run without model.safetensors holds bytes that are not UTF-8,
    nothing, or a path out of the folder: an error naming the file, not a UnicodeDecodeError
    traceback or a "newest checkpoint" that is the checkpoints folder itself."""
    from hybridkit.recipe import dump_recipe, load_recipe

    recipe = load_recipe(ROOT / "hybridkit" / "recipes" / "tiny_hybrid.yaml")
    dump_recipe(recipe, tmp_path / "recipe.yaml")
    latest = tmp_path / "checkpoints" / "latest"
    (tmp_path / "checkpoints" / "step_0000001").mkdir(parents=True)
    for content in (b"\xff\xfe", b"", b"../../elsewhere"):
        latest.write_bytes(content)
        err = cli_error("generate", str(tmp_path), "--device", "cpu")
        assert f"{latest} names " in err and "which is not a checkpoint directory" in err


def test_a_boolean_is_not_a_number(cli_error):
    """pydantic reads ``true`` as 1 for a number field: ``train.steps: true`` trained one step
    and ``model.d_model: true`` failed with a message about d_model 1."""
    recipe = str(ROOT / "hybridkit" / "recipes" / "mqar_tiny.yaml")
    for key in ("train.steps", "seed", "model.d_model", "task.num_kv_pairs", "train.lr"):
        err = cli_error("show", recipe, "--set", f"{key}=true")
        assert f"{key}: must be a number; got a boolean (true)" in err, err
    assert main(["show", recipe, "--device", "cpu", "--set", "train.compile=true"]) == 0
    # inside lists of numbers too: eval lengths, Adam's betas
    for key, value, bad in (("eval.lengths", "[32,true]", 1), ("train.betas", "[0.9,true]", 1)):
        err = cli_error("show", recipe, "--set", f"{key}={value}")
        assert f"{key}.{bad}: must be a number; got a boolean (true)" in err, err


def test_generate_batch_with_several_prompts_and_zero_jobs_are_errors(cli_error):
    """``--batch`` copies one prompt: with several prompts it would be ignored silently; a
    study's ``--jobs 0`` is refused even with ``--list``; a task's message names
    its value once."""
    recipes = ROOT / "hybridkit" / "recipes"
    recipe = str(recipes / "tiny_hybrid.yaml")
    err = cli_error("generate", recipe, "--prompt-ids", "1,2;3,4", "--batch", "5")
    assert "--batch 5" in err and "2 prompts" in err
    study = str(recipes / "studies" / "mqar_capacity.yaml")
    assert "--jobs must be at least 1" in cli_error("study", study, "--list", "--jobs", "0")
    err = cli_error("show", str(recipes / "mqar_tiny.yaml"), "--set", "task.eval_lengths=[7]")
    assert err.count("7") == 1, err


@pytest.mark.parametrize("device", ["meta", "mps", "xla"])
def test_devices_torch_parses_but_hybridkit_cannot_run_on(device, tmp_path, cli_error):
    """torch.device() accepts meta, mps, xla, ...: generate and bench decode failed on them with
    a RuntimeError / NotImplementedError traceback at the first .to() or forward."""
    recipe = str(ROOT / "hybridkit" / "recipes" / "tiny_hybrid.yaml")
    for args in (
        ["generate", recipe, "--max-new-tokens", "1"],
        ["bench", "decode", recipe, "--batch", "1", "--prompt", "4", "--new", "2"],
    ):
        err = cli_error(*args, "--device", device)
        assert f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N" in err, err


def test_generate_sizes_beyond_any_memory_are_clear(cli_error, capsys):
    """``generate --batch 10**21`` was an OverflowError traceback (the prompt list copied that
    often), ``--task-examples --length 2**32`` a numpy MemoryError; ``bench decode`` with a
    prompt or new-token count no machine holds failed in the allocator."""
    recipe = str(ROOT / "hybridkit" / "recipes" / "induction_tiny.yaml")
    with pytest.raises(SystemExit):
        main(["generate", recipe, "--batch", str(10**21)])
    assert "argument --batch: must be from 1 to 65536" in capsys.readouterr().err
    err = cli_error("generate", recipe, "--task-examples", "1", "--length", str(2**32))
    assert "--length 4294967296 is too long; allowed: at most 16777216" in err
    bench = ["bench", "decode", recipe, "--device", "cpu", "--batch", "1"]
    err = cli_error(*bench, "--prompt", str(2**32), "--new", "2")
    assert "--prompt 4294967296" in err and "lower --batch, --prompt or --new" in err
    err = cli_error(*bench, "--prompt", "4", "--new", "2", "--drift-tokens", str(2**32))
    assert "--drift-tokens" in err and "free" in err
    with pytest.raises(SystemExit):  # past 64 bits it was an OverflowError traceback
        main([*bench, "--prompt", "4", "--new", "2", "--drift-tokens", str(10**23)])
    assert "argument --drift-tokens: must be from 0 to" in capsys.readouterr().err


def test_a_name_too_long_for_the_file_system_is_clear(cli_error):
    """An OSError (ENAMETOOLONG) from ``Path.is_dir`` was a traceback in show, generate,
    check, eval and bench."""
    name = "x" * 5000 + ".yaml"
    for args in (["show", name], ["eval", name], ["generate", name]):
        assert "File name too long" in cli_error(*args), args


def test_empty_shard_and_only_values_are_errors(cli_error):
    """``--shard ""`` and ``--only ""`` (an unset shell variable) silently selected every run
    of the study."""
    study = str(ROOT / "hybridkit" / "recipes" / "studies" / "lengthgen_quickstart.yaml")
    assert "--shard must be I/N" in cli_error("study", study, "--list", "--shard", "")
    for value in ("", " , "):
        assert "--only must be" in cli_error("study", study, "--list", "--only", value)


def _study(tmp_path: Path, **changes: Any) -> str:
    data = {
        "base": str(ROOT / "hybridkit" / "recipes" / "induction_tiny.yaml"),
        "variants": {"v": ["model.layout=m a"]},
        **changes,
    }
    path = tmp_path / "study.yaml"
    path.write_bytes(dump(data))
    return str(path)


def test_study_run_folders_stay_inside_the_study_folder(tmp_path, cli_error):
    """A sweep value or tag with a '/' made variant folders outside ``-o`` (``values: [../x]``
    wrote there); a NUL character or a name longer than a folder name may be failed with a
    ValueError / OSError traceback when the run started."""
    out = ["-o", str(tmp_path / "out"), "--list"]
    cases = [
        ({"sweep": {"key": "name", "values": ["/../../escaped"]}}, "sweep.values.0: makes"),
        ({"sweep": {"key": "name", "name": "x/..", "values": ["a"]}}, "sweep.name: makes"),
        ({"sweep": {"key": "name", "values": ["y" * 300]}}, "longer than 200 bytes"),
        ({"variants": {"a\0b": []}}, "NUL character"),
        ({"variants": {"z" * 300: []}}, "longer than 200 bytes"),
    ]
    for changes, message in cases:
        assert message in cli_error("study", _study(tmp_path, **changes), *out), changes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_study_lengths_and_sizes_are_checked_before_training(tmp_path, cli_error, no_training):
    """The study's ``lengths`` were first checked at the first evaluation, after training (a
    message naming ``--lengths``, or a numpy MemoryError for a huge one); ``select_examples``
    had no bound (the held-out set is generated whole) and an ``lrs`` value or ``train.lr``
    of 1e38 overflowed in AdamW's float32 step (a RuntimeError traceback)."""
    out = ["-o", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    cases = [
        ({"lengths": [1]}, "lengths.0: variant 'v': induction length must be >= 3"),
        ({"lengths": [10**11]}, "lengths.0: variant 'v': length 100000000000 is too long"),
        ({"select_examples": 10**12}, "select_examples: must be less than or equal to"),
        ({"lrs": [1e38]}, "lrs.0: must be less than or equal to 1000000"),
        ({"lengths": []}, "lengths: lengths must be a non-empty list"),  # was: the task's, silently
    ]
    for changes, message in cases:
        assert message in cli_error("study", _study(tmp_path, **changes), *out), changes
    recipe = str(ROOT / "hybridkit" / "recipes" / "induction_tiny.yaml")
    err = cli_error("show", recipe, "--set", "train.lr=1e38")
    assert "train.lr: must be less than or equal to 1000000" in err


def test_a_nul_character_in_a_file_path_is_clear(tmp_path, cli_error):
    """A NUL character (``"a\\0b"`` in YAML) in a study's ``base`` or a ``plugins`` entry was a
    bare ValueError traceback ("embedded null byte") from ``Path.resolve``."""
    err = cli_error("study", _study(tmp_path, base="a\0b.yaml"), "--list")
    assert "base: recipe " in err and "holds a NUL character" in err, err
    err = cli_error("study", _study(tmp_path, plugins=["p\0.py"]), "--list")
    assert "plugins.0: plugin file " in err and "holds a NUL character" in err, err
    recipe = tmp_path / "recipe.yaml"
    text = (ROOT / "hybridkit" / "recipes" / "tiny_hybrid.yaml").read_text()
    recipe.write_text('plugins: ["p\\0.py"]\n' + text)
    err = cli_error("show", str(recipe))
    assert "plugins.0: plugin file " in err and "holds a NUL character" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "study.yaml"]


def test_damaged_run_directory_layout_is_clear(tmp_path, cli_error, one_thread):
    """Resuming into a run directory whose metrics.jsonl holds bytes that are not UTF-8 was a
    UnicodeDecodeError traceback; a folder where the trainer writes a file (model.safetensors,
    checkpoints/latest, metrics.jsonl) or a file where it makes a folder (checkpoints) was an
    IsADirectoryError / FileExistsError traceback -- for model.safetensors after training."""
    import shutil

    run = tmp_path / "run"
    args = _tiny_train_args(run)
    assert main([*args, "--set=train.steps=1"]) == 0
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe garbage\n")
    assert main([*args, "--set=train.steps=2"]) == 0  # the damaged line is dropped
    for name, is_dir in (
        ("model.safetensors", True),
        ("checkpoints/latest", True),
        ("metrics.jsonl", True),
        ("checkpoints", False),
    ):
        path = run / name
        saved = tmp_path / "saved"
        shutil.move(path, saved)
        path.mkdir() if is_dir else path.write_text("x")
        found = "a directory" if is_dir else "a file"
        err = cli_error(*args, "--set=train.steps=3")
        assert f"{path} is {found}, but the trainer writes" in err, err
        shutil.rmtree(path) if is_dir else path.unlink()
        shutil.move(saved, path)


def test_a_folder_of_other_files_is_no_run_directory(tmp_path, cli_error, one_thread):
    """``train -o docs`` wrote checkpoints, metrics and weights among the documents there; a
    non-empty folder without a run is refused (hidden files such as a stale lock do not
    count), an empty one is used."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.md").write_text("mine")
    err = cli_error(*_tiny_train_args(docs), "--set=train.steps=1")
    assert f"{docs} holds files but no training run (notes.md;" in err, err
    assert sorted(p.name for p in docs.iterdir()) == ["notes.md"]
    # a folder of study records alone (copied from other machines) is a run folder to train in
    records = tmp_path / "records"
    records.mkdir()
    (records / "result.json").write_text("{}")
    assert main([*_tiny_train_args(records), "--set=train.steps=1"]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".hidden").write_text("")
    assert main([*_tiny_train_args(empty), "--set=train.steps=1"]) == 0
    assert (empty / "recipe.yaml").is_file()


def test_a_recipe_given_to_study_and_a_study_to_train_are_named(tmp_path, cli_error):
    """Each got a screen of "unknown key" lines with no word that the file is the other kind."""
    recipe = str(ROOT / "hybridkit" / "recipes" / "induction_tiny.yaml")
    study = str(ROOT / "hybridkit" / "recipes" / "studies" / "lengthgen_quickstart.yaml")
    err = cli_error("study", recipe, "-o", str(tmp_path / "s"))
    assert err.splitlines()[1].strip().startswith("this file is a recipe")
    err = cli_error("train", study, "-o", str(tmp_path / "r"))
    assert err.splitlines()[1].strip().startswith("this file is a study")
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_rate_options_beyond_float32_are_recipe_errors(cli_error):
    """``a_floor`` / ``dt_*`` of 1e300 failed at the first float32 conversion (a RuntimeError
    traceback); they are bounded like every other number of the recipe."""
    recipe = str(ROOT / "hybridkit" / "recipes" / "mqar_tiny.yaml")
    for key in ("a_floor", "dt_min", "dt_max", "dt_init_floor"):
        err = cli_error("show", recipe, "--set", f"model.blocks.m.mixer.{key}=1e300")
        assert f"{key}: must be less than or equal to 10000" in err, err


def test_running_out_of_memory_is_an_error_naming_the_sizes(monkeypatch, cli_error):
    """Commands that cannot estimate their memory up front (bench train, check, eval at huge
    sizes) end in an allocation failure: a clear error with the sizes they were given."""
    from hybridkit import cli

    def oom(args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 52.00 GiB\nmore text")

    monkeypatch.setattr(cli, "cmd_show", oom)
    recipe = str(ROOT / "hybridkit" / "recipes" / "mqar_tiny.yaml")
    err = cli_error("show", recipe, "--batch", "4096", "--seq-len", "65536")
    assert "out of memory (CUDA out of memory. Tried to allocate 52.00 GiB)" in err, err
    assert "lower one of: --batch 4096, --seq-len 65536" in err, err

    monkeypatch.setattr(cli, "cmd_check", oom)  # check's decode steps grow its caches
    err = cli_error("check", recipe, "--steps", "100000000")
    assert "lower one of: --batch 2, --steps 100000000" in err, err

    def other(args):
        raise RuntimeError("a bug, not memory")

    monkeypatch.setattr(cli, "cmd_show", other)
    with pytest.raises(RuntimeError, match="a bug"):  # other errors still show their traceback
        cli.main(["show", recipe])


def test_the_2026_12_06_fuzz_findings_read_clearly(tmp_path, cli_error, one_thread):
    """Inputs a CLI fuzz found ending in tracebacks (exit status 1), each now a status-2 error
    naming the key or the path: damaged metrics lines (a step that is not a number, nesting too
    deep to decode) are dropped on resuming; a file where the next checkpoint folder goes, a
    folder where ``eval`` writes its report and an output folder that cannot be made name the
    path; ``backend: triton`` at a chunk / rank the kernels cannot run, length-mixture weights
    without a finite sum, a stateful kind in the mlp slot and a variant named like a report
    file are recipe / study errors naming the key; ``check`` refuses a forced Triton backend."""
    import shutil

    run = tmp_path / "run"
    args = _tiny_train_args(run)
    assert main([*args, "--set=train.steps=1"]) == 0
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": "x", "loss": "y"}\n' + "[" * 100000 + "]" * 100000 + "\n")
    assert main([*args, "--set=train.steps=2"]) == 0  # both damaged lines dropped
    blocker = run / "checkpoints" / "step_0000003"
    blocker.write_text("x")
    assert f"{blocker}: Not a directory" in cli_error(*args, "--set=train.steps=3")
    blocker.unlink()
    (run / "eval.json").mkdir()
    assert f"{run / 'eval.json'}" in cli_error("eval", str(run), "--lengths", "32")
    shutil.rmtree(run / "eval.json")
    assert "/proc/hybridkit-x" in cli_error(*_tiny_train_args(Path("/proc/hybridkit-x")))

    recipe = str(ROOT / "hybridkit" / "recipes" / "induction_tiny.yaml")
    mixer = "model.blocks.m.mixer"  # induction_tiny's Mamba-3 template
    err = cli_error("show", recipe, f"--set={mixer}.backend=triton", f"--set={mixer}.chunk_size=8")
    assert f"{mixer}.chunk_size: backend triton: chunk_size 8" in err, err
    err = cli_error("show", recipe, f"--set={mixer}.backend=triton", f"--set={mixer}.mimo_rank=3")
    assert f"{mixer}.mimo_rank: backend triton runs ranks [1, 2, 4, 8]" in err, err
    err = cli_error("check", recipe, f"--set={mixer}.backend=triton")
    assert "runs the model in float64" in err and "backend auto" in err, err
    mix = "task.length_mixture=[{length: 16, weight: 1.0e+308}, {length: 8, weight: 1.0e+308}]"
    assert "task.length_mixture: the weights must have a finite sum" in cli_error(
        "show", recipe, f"--set={mix}"
    )
    err = cli_error("show", recipe, "--set=model.blocks.m.mlp={kind: mamba3}")
    assert "model.blocks.m.mlp.kind: 'mamba3' mixes tokens" in err, err
    study = tmp_path / "s.yaml"
    study.write_text(f"base: {recipe}\nvariants: {{report.md: []}}\nseeds: [0]\nlrs: [0.003]\n")
    err = cli_error("study", str(study), "-o", str(tmp_path / "out"), "--list")
    assert "report.md" in err and "report file" in err, err
    study.write_text(f"base: {recipe}\nvariants: {{a: []}}\nseeds: [0]\nlrs: [0.003, 0.003]\n")
    err = cli_error("study", str(study), "-o", str(tmp_path / "out"), "--list")
    assert "lrs must be distinct" in err, err


def test_a_bad_kernel_setting_is_refused_before_anything_runs(cli_error, monkeypatch, tmp_path):
    """``HYBRIDKIT_KERNELS`` is read at the first kernel launch, which under ``train.compile`` is
    inside Dynamo's trace: a bad value ended in a Dynamo traceback. Every command now reads it
    first and names the setting and the values allowed."""
    recipe = str(ROOT / "hybridkit" / "recipes" / "mqar_tiny.yaml")
    for value, expected in (
        ("loss_op=maybe", "loss_op: 'maybe': allowed 0, 1, true, false"),
        ("nonsense", "'nonsense' is not key=value with a key among"),
        ("bwd_warps=3", "bwd_warps=3: allowed"),
        ("chunk_sizes=a", "chunk_sizes: 'a': expected whole numbers joined by ':', e.g. 32:64"),
    ):
        monkeypatch.setenv("HYBRIDKIT_KERNELS", value)
        err = cli_error("train", recipe, "-o", str(tmp_path / "run"), "--set", "train.compile=true")
        assert "HYBRIDKIT_KERNELS=" in err and expected in err, err
    assert not (tmp_path / "run").exists()


def test_file_prefixes_unknown_homes_and_special_files_are_clear(tmp_path, cli_error, monkeypatch):
    """Found by the fuzz of 2026-12-06 (tracebacks): ``bench --out`` naming a directory failed
    in ``Path.with_suffix`` after the benchmark had run; a ``~user`` path of an unknown user made
    ``Path.expanduser`` raise a bare RuntimeError (plugins, ``task.path``); a device file or a
    folder as ``task.path`` was said not to exist."""
    recipe = str(ROOT / "hybridkit" / "recipes" / "induction_tiny.yaml")
    monkeypatch.chdir(tmp_path)
    for out in (".", "..", str(tmp_path), ""):
        err = cli_error("bench", "decode", recipe, "--device", "cpu", "--batch", "1", "--out", out)
        assert "--out" in err and ("file prefix" in err or "needs a directory path" in err), err
    nobody = "~hybridkit-no-such-user-xyz"
    err = cli_error("show", recipe, "--plugin", f"{nobody}/p.py")
    assert f"plugin file: '{nobody}/p.py'" in err and "home directory is unknown" in err, err
    task = "task={kind: text, path: %s, seq_len: 16, eval_lengths: [16]}"
    tiny = str(ROOT / "hybridkit" / "recipes" / "tiny_hybrid.yaml")
    for path, expected in (
        (f"{nobody}/x.txt", "home directory is unknown"),
        ("/dev/null", "is not a regular file"),
        (str(tmp_path), "is not a regular file (a directory)"),
    ):
        err = cli_error("train", tiny, "-o", str(tmp_path / "run"), "--set", task % path)
        assert "task.path" in err and expected in err, err
    assert not (tmp_path / "run").exists()
