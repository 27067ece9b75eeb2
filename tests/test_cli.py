"""The command line: show / generate / check on every shipped recipe, and clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybridkit.cli import main

RECIPES = sorted((Path(__file__).parent.parent / "hybridkit" / "recipes").glob("*.yaml"))
ROOT = Path(__file__).resolve().parent.parent


def test_recipes_are_shipped():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_show_every_recipe(recipe, capsys):
    assert main(["show", str(recipe), "--seq-len", "4096", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "recurrent state" in out and "KV cache at 4,096 tokens" in out


def test_show_for_cuda_says_when_this_machine_has_no_gpu(capsys, monkeypatch):
    """``show --device cuda`` lists what a GPU would run; on a machine without one the title
    said "on this machine"."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = str(ROOT / "hybridkit" / "recipes" / "tiny_hybrid.yaml")
    assert main(["show", recipe, "--device", "cuda"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "kernel backends a CUDA GPU would run (cuda; this machine has none)" in out
    assert main(["show", recipe, "--device", "cpu"]) == 0
    assert "kernel backends on this machine (cpu)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_check_every_recipe(recipe, capsys):
    assert main(["check", str(recipe), "--batch", "1", "--steps", "3"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_generate_random_recipe(capsys):
    recipe = RECIPES[0]
    args = [
        "generate",
        str(recipe),
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "5",
        "--seed",
        "1",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and "prompt [1, 2, 3] ->" in first


def test_generate_refuses_what_cannot_fit_before_allocating(cli_error, monkeypatch):
    """A batch or length whose caches exceed the free memory is an error naming the flags,
    not an allocator traceback or the OOM killer after the prefill."""
    from hybridkit import generation, runtime

    recipe = str(RECIPES[0])
    # the most --max-new-tokens takes (2**32; more is a usage error)
    err = cli_error("generate", recipe, "--max-new-tokens", "4294967296", "--device", "cpu")
    assert "--max-new-tokens 4294967296" in err and "free" in err
    err = cli_error("generate", recipe, "--batch", "65536", "--max-new-tokens", "1000000")
    assert "--batch 65536" in err and "free" in err  # --batch itself stops at 65536
    monkeypatch.setattr(runtime, "free_memory_bytes", lambda device: 1000)
    err = cli_error("generate", recipe, "--max-new-tokens", "8", "--device", "cpu")
    assert "lower --batch or --max-new-tokens" in err
    monkeypatch.undo()
    assert main(["generate", recipe, "--max-new-tokens", "2", "--device", "cpu"]) == 0
    from hybridkit import build_model, load_recipe

    model = build_model(load_recipe(recipe), seed=0)
    base = generation.generation_bytes(model, 1, 4, 4)
    assert generation.generation_bytes(model, 2, 4, 4) > base  # the batch's caches
    assert generation.generation_bytes(model, 1, 4, 400) >= base  # (KV caches grow)
    assert generation.generation_bytes(model, 8, 4, 0) == 0  # the prompt comes back as it is
    assert runtime.free_memory_bytes("cpu") > 0


def test_generate_from_run_dir(tmp_path, capsys):
    from hybridkit import build_model, dump_recipe, load_recipe
    from hybridkit.weights import save_weights

    recipe = load_recipe(Path(__file__).parent.parent / "hybridkit/recipes/tiny_hybrid.yaml")
    dump_recipe(recipe, tmp_path / "recipe.yaml")
    save_weights(build_model(recipe, seed=5), tmp_path / "model.safetensors")
    assert (
        main(
            [
                "generate",
                str(tmp_path),
                "--temperature",
                "0",
                "--max-new-tokens",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "->" in capsys.readouterr().out


def test_bad_inputs_exit_2_without_traceback(tmp_path, capsys, cli_error):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  d_model: 32\n  vocab_size: 64\n  layout: 'm x 2'\n"
        "  blocks:\n    m: {mixer: {kind: mamba3, headdim: 7}}\n"
    )
    err = cli_error("show", str(bad))
    assert "bad.yaml" in err and "headdim" in err
    assert main(["show", str(tmp_path / "missing.yaml")]) == 2
    assert main(["show", str(RECIPES[0]), "--set", "model.d_model=abc"]) == 2
    assert "model.d_model" in capsys.readouterr().err
    assert main(["generate", str(RECIPES[0]), "--prompt-ids", "1,x"]) == 2
    assert main(["generate", str(RECIPES[0]), "--prompt-ids", "99999"]) == 2


def test_truncated_checkpoint_is_clear(tmp_path, capsys):
    from hybridkit import dump_recipe, load_recipe

    recipe = load_recipe(RECIPES[0])
    dump_recipe(recipe, tmp_path / "recipe.yaml")
    (tmp_path / "model.safetensors").write_bytes(b"\x00\x01garbage")
    assert main(["generate", str(tmp_path)]) == 2
    assert "truncated" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_help():
    out = subprocess.run(
        [sys.executable, "-m", "hybridkit", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "show" in out.stdout and "check" in out.stdout


def test_bad_device_is_a_clear_error(capsys):
    assert main(["show", str(RECIPES[0]), "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
    assert main(["show", str(RECIPES[0]), "--device", "cuda"]) == 0  # report GPU backends anywhere
    capsys.readouterr()
    assert main(["check", str(RECIPES[0]), "--set", "train.device=banana"]) == 2
    assert "train.device" in capsys.readouterr().err


def test_check_sets_the_first_prefill_length(capsys):
    args = ["check", str(RECIPES[0]), "--batch", "1", "--steps", "2"]
    for prefill in ("1", "40"):
        assert main([*args, "--prefill", prefill]) == 0
        out = " ".join(capsys.readouterr().out.split())  # rich wraps the title
        assert f"prefill {prefill} + continued prefill" in out and "PASS" in out
    for bad, why in (("0", "must be from 1 to"), ("-3", "from 1 to"), ("x", "an integer")):
        with pytest.raises(SystemExit) as info:
            main([*args, "--prefill", bad])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --prefill: " in err and why in err, err


def test_training_a_model_only_recipe_names_the_file_and_a_task_recipe(cli_error, tmp_path):
    """``tiny_hybrid`` has no task: the error names the file (not ``<recipe>``) and says which
    recipe to start from; nothing is written."""
    recipe = "hybridkit/recipes/tiny_hybrid.yaml"
    err = cli_error("train", str(ROOT / recipe), "-o", str(tmp_path / "run"))
    assert f"invalid recipe {ROOT / recipe}:" in err and "induction_tiny.yaml" in err
    assert not (tmp_path / "run").exists()


def test_generate_task_examples_continue_test_prompts_and_compare(capsys, cli_error):
    """``--task-examples N``: the task's first N test examples, cut before their first answer,
    continued greedily and compared with it; errors name the flags."""
    recipe = str(ROOT / "hybridkit" / "recipes" / "mqar_tiny.yaml")
    args = ["generate", recipe, "--task-examples", "3", "--length", "32", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(" -> model [" in line and ", answer [" in line for line in out[:3])
    assert out[3].endswith("first answers right (greedy, task length 32)")
    # one runner serves every example: its answers are what a fresh generate() per prompt gives
    from hybridkit.build import build_model
    from hybridkit.recipe import load_recipe
    from hybridkit.tasks.base import IGNORE_INDEX

    rec = load_recipe(recipe)
    model = build_model(rec, seed=rec.seed).eval()
    examples = rec.task.build().eval_set(32).select(slice(0, 3))
    for i, line in enumerate(out[:3]):
        first = int((examples.targets[i] != IGNORE_INDEX).nonzero()[0])
        answer = line.split("answer ")[1].split("]")[0] + "]"
        run = len(json.loads(answer))  # the printed answer's length
        alone = model.generate(examples.inputs[i : i + 1, : first + 1], run, temperature=0.0)
        assert f"-> model {alone[0, first + 1 :].tolist()}, answer" in line
    assert main([*args, "--ssm-dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.count(" -> model [") == 3
    assert "--length 7" in cli_error("generate", recipe, "--task-examples", "1", "--length", "7")
    model_only = str(ROOT / "hybridkit" / "recipes" / "tiny_hybrid.yaml")
    assert "--prompt-ids" in cli_error("generate", model_only, "--task-examples", "1")
    # options of free sampling are refused with --task-examples, --length without it
    err = cli_error("generate", recipe, "--task-examples", "1", "--temperature", "1.5",
                    "--top-k", "3", "--batch", "4")  # fmt: skip
    assert "it does not take --batch, --temperature, --top-k" in err
    assert "--task-examples only" in cli_error("generate", model_only, "--length", "8")


def test_generate_task_examples_whose_sequences_outgrow_the_length(tmp_path, capsys):
    """Parity adds BOS and a separator to its --length bits: the runner's cache must hold the
    longest prompt plus its answer (an attention layer's KV cache overflowed before)."""
    text = (ROOT / "hybridkit" / "recipes" / "parity_tiny.yaml").read_text()
    attention = "    a: {mixer: {kind: attention, n_heads: 2, head_dim: 16, position: nope}}\n"
    text = text.replace('  layout: "m"', attention + '  layout: "m a"')
    recipe = tmp_path / "parity_attention.yaml"
    recipe.write_text(text)
    args = ["generate", str(recipe), "--task-examples", "2", "--length", "8", "--device", "cpu"]
    assert main(args) == 0
    assert capsys.readouterr().out.count(" -> model [") == 2
