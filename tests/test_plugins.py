"""Plugins: the user's own task and layer kinds from the command line (``--plugin``, ``plugins:``
in recipes and study files, ``HYBRIDKIT_PLUGINS``), recorded in run directories, with clear
errors for plugins that are missing or broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hybridkit.cli import main
from hybridkit.errors import RecipeError
from hybridkit.plugins import ENV_VAR, PluginError, load_plugin
from hybridkit.recipe import dump_recipe, load_recipe
from hybridkit.study import load_study, variant_recipe
from tests.helpers import checkout_env

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
FEW_STEPS = [
    "--set=train.steps=3",
    "--set=train.checkpoint_every=2",
    "--set=train.device=cpu",
    "--set=train.tensorboard=false",
    "--set=task.eval_examples=8",
    "--set=eval.decode_examples=1",
]


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.mark.parametrize("example", ["custom_task", "custom_layer"])
def test_examples_train_evaluate_and_generate_through_the_cli(example, tmp_path, capsys, clean_env):
    recipe, plugin = EXAMPLES / f"{example}.yaml", EXAMPLES / f"{example}.py"
    run = tmp_path / "run"
    args = ["train", str(recipe), "-o", str(run), "--no-progress", "--plugin", str(plugin)]
    assert main([*args, *FEW_STEPS]) == 0
    assert "eval at length" in capsys.readouterr().out
    # The run directory records the plugin by its absolute path: eval and generate need no flag.
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())["plugins"]
    assert recorded == [str(plugin.resolve())]
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    payload = json.loads((run / "eval.json").read_text())
    lengths = load_recipe(run / "recipe.yaml").task.eval_lengths
    assert [r["length"] for r in payload["results"]] == lengths
    assert main(["generate", str(run), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert main(["show", str(recipe), "--plugin", str(plugin), "--device", "cpu"]) == 0
    check = ["check", str(recipe), "--plugin", str(plugin), "--batch", "1", "--steps", "2"]
    assert main(check) == 0
    assert "PASS" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_directory_loads_its_plugins_in_a_new_process(tmp_path, clean_env):
    """The proof that recording works: fresh interpreters, never told about the plugin."""
    run = tmp_path / "run"
    recipe, plugin = EXAMPLES / "custom_task.yaml", EXAMPLES / "custom_task.py"
    args = ["train", str(recipe), "-o", str(run), "--no-progress", "--plugin", str(plugin)]
    assert main([*args, *FEW_STEPS]) == 0
    env = checkout_env({k: v for k, v in os.environ.items() if k != ENV_VAR})
    for command in (["eval", str(run), "--device", "cpu"], ["generate", str(run)]):
        res = subprocess.run(
            [sys.executable, "-m", "hybridkit", *command],
            cwd=tmp_path,
            env={**env, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
    # ... and without the plugin (a recipe naming the kind, no record), a hint how to load it.
    res = subprocess.run(
        [sys.executable, "-m", "hybridkit", "show", str(recipe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "unknown task kind 'reverse'" in res.stderr and "--plugin" in res.stderr


def test_plugins_in_a_recipe_are_relative_to_it_and_recorded(tmp_path, capsys, clean_env):
    data = yaml.safe_load((EXAMPLES / "custom_task.yaml").read_text())
    data["plugins"] = [os.path.relpath(EXAMPLES / "custom_task.py", tmp_path / "recipes")]
    path = tmp_path / "recipes" / "r.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data))
    spec = load_recipe(path)
    assert spec.plugins == [str((EXAMPLES / "custom_task.py").resolve())]
    assert load_recipe(yaml.safe_load(dump_recipe(spec))) == spec
    assert main(["show", str(path), "--device", "cpu"]) == 0


def test_plugins_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, f" {EXAMPLES / 'custom_layer.py'} , ")
    assert main(["show", str(EXAMPLES / "custom_layer.yaml"), "--device", "cpu"]) == 0
    assert "shortconv" in capsys.readouterr().out
    spec = load_recipe(EXAMPLES / "custom_layer.yaml")
    assert spec.plugins == [str((EXAMPLES / "custom_layer.py").resolve())]


def test_kinds_from_an_imported_module_are_recorded(clean_env):
    """A notebook that imported the module itself still gets a run directory that names it."""
    import examples.custom_layer  # noqa: F401  (registers "shortconv")

    # Recorded by module name, or by path if the same file was also given as a plugin file
    # earlier in this process: either imports it again.
    either = (["examples.custom_layer"], [str(EXAMPLES / "custom_layer.py")])
    spec = load_recipe(EXAMPLES / "custom_layer.yaml")
    assert spec.plugins in either
    built = load_recipe({"model": spec.model.model_dump()})
    assert yaml.safe_load(dump_recipe(built))["plugins"] in either
    # The same file given as a path is the module already imported, not a second copy.
    assert load_plugin(str(EXAMPLES / "custom_layer.py")) == str(EXAMPLES / "custom_layer.py")


def test_study_files_load_plugins_for_every_variant(tmp_path, clean_env):
    study = {
        "base": str(EXAMPLES / "custom_task.yaml"),
        "plugins": [os.path.relpath(EXAMPLES / "custom_task.py", tmp_path)],
        "variants": {"hybrid": [], "mamba": ["model.layout=m m"]},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    spec, base = load_study(path)
    for variant in spec.variants:
        recipe = variant_recipe(spec, base, variant, None, 0)
        assert recipe.task.kind == "reverse"
        assert recipe.plugins == [str((EXAMPLES / "custom_task.py").resolve())]


def test_unknown_kinds_say_how_to_load_a_plugin(tmp_path, cli_error, clean_env):
    data = yaml.safe_load((EXAMPLES / "custom_task.yaml").read_text())
    data["task"]["kind"] = "zz_not_registered"
    data["model"]["blocks"]["m"]["mixer"]["kind"] = "zz_not_a_layer"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    msg = cli_error("show", str(path))
    for needle in ("task.kind: unknown task kind 'zz_not_registered'", "model.blocks.m.mixer.kind"):
        assert needle in msg
    assert msg.count("--plugin MODULE_OR_FILE.py") == 2 and "HYBRIDKIT_PLUGINS" in msg


def test_broken_plugins_give_clear_errors(tmp_path, cli_error, monkeypatch, clean_env):
    recipe = str(EXAMPLES / "custom_task.yaml")
    msg = cli_error("show", recipe, "--plugin", str(tmp_path / "missing.py"))
    assert "plugin file" in msg and "not found" in msg and "missing.py" in msg
    msg = cli_error("show", recipe, "--plugin", "zz_no_such_module.tasks")
    assert "no module named 'zz_no_such_module'" in msg
    (tmp_path / "mytasks.py").write_text("")
    monkeypatch.chdir(tmp_path)
    assert "pass its path (mytasks.py)" in cli_error("show", recipe, "--plugin", "mytasks")
    broken = tmp_path / "broken.py"
    broken.write_text("import math\n\nvalue = math.sqrt(-1)\n")
    msg = cli_error("show", recipe, "--plugin", str(broken))
    assert "failed while being imported: ValueError: math domain error" in msg
    assert f"{broken}, line 3" in msg
    assert "neither a module name" in cli_error("show", recipe, "--plugin", "not-a-module")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone.py"))
    assert "gone.py" in cli_error("show", recipe)


def test_bad_plugins_key_in_a_recipe(tmp_path, clean_env):
    data = yaml.safe_load((EXAMPLES / "custom_task.yaml").read_text())
    for bad, needle in (("custom_task.py", "must be a list"), ([3], "must be a list")):
        with pytest.raises(RecipeError, match=needle) as err:
            load_recipe({**data, "plugins": bad})
        assert err.value.problems[0][0] == "plugins"
    with pytest.raises(RecipeError) as err:
        load_recipe({**data, "plugins": ["ok_but/missing.py"]})
    assert err.value.problems[0][0] == "plugins.0" and "not found" in str(err.value)
    # names the file system refuses (too long) were a bare OSError without the key
    with pytest.raises(RecipeError) as err:
        load_recipe({**data, "plugins": ["a" * 300 + ".py"]})
    assert err.value.problems[0][0] == "plugins.0" and "File name too long" in str(err.value)
    with pytest.raises(RecipeError) as err:
        load_recipe({**data, "plugins": ["a" * 300]})
    assert err.value.problems[0][0] == "plugins.0" and "no module named" in str(err.value)
    with pytest.raises(PluginError, match="module name or a .py file"):
        load_plugin("  ")
