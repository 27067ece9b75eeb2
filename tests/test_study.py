"""Studies: a tiny 2 variants x 2 learning rates study end to end, resumption without
retraining, and clear errors for bad study files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hybridkit.cli import main
from hybridkit.errors import HybridkitError, RecipeError
from hybridkit.recipe import dump_recipe, load_recipe
from hybridkit.study import load_study, run_study, variant_recipe
from hybridkit.train.metrics import read_metrics
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

STUDIES = sorted((Path(__file__).parent.parent / "hybridkit/recipes/studies").glob("*.yaml"))

BASE = {
    "name": "tiny",
    "seed": 0,
    "model": tiny_model("m a", vocab=32),
    "task": {
        "kind": "mqar",
        "vocab_size": 32,
        "seq_len": 16,
        "num_kv_pairs": 2,
        "eval_examples": 16,
    },
    "train": {
        "steps": 20,
        "batch_size": 8,
        "log_every": 5,
        "checkpoint_every": 10,
        "device": "cpu",
        "tensorboard": False,
    },
    "eval": {"decode_examples": 1},
}

STUDY = {
    "name": "tiny-study",
    "description": "two variants, two learning rates",
    "base": "recipes/base.yaml",
    "set": ["train.warmup_steps=2"],
    "variants": {"hybrid": [], "mamba": ["model.layout=m m"]},
    "lrs": [1e-3, 3e-3],
    "seeds": [0],
    "lengths": [16, 32],
    "select_examples": 16,
}


def write_study(tmp_path: Path, **changes) -> Path:
    (tmp_path / "recipes").mkdir(exist_ok=True)
    dump_recipe(load_recipe(BASE), tmp_path / "recipes" / "base.yaml")
    study = {**STUDY, **changes}
    study = {k: v for k, v in study.items() if v is not None}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/*/final.json"))


def test_study_end_to_end_and_rerun_skips_finished_runs(tmp_path, capsys, monkeypatch):
    study = write_study(tmp_path)
    out = tmp_path / "out"
    args = ["study", str(study), "-o", str(out), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("[study] training") == 4 and "# Study: tiny-study" in printed

    dirs = run_dirs(out)
    assert [d.relative_to(out).as_posix() for d in dirs] == [
        "hybrid/lr0.001-seed0",
        "hybrid/lr0.003-seed0",
        "mamba/lr0.001-seed0",
        "mamba/lr0.003-seed0",
    ]
    assert load_recipe(out / "mamba/lr0.003-seed0/recipe.yaml").model.layout == "m m"
    assert load_recipe(out / "hybrid/lr0.001-seed0/recipe.yaml").train.lr == 1e-3
    results = json.loads((out / "results.json").read_text())
    assert results["study"] == "tiny-study" and results["selection_metric"] == "ex_match"
    assert set(results["variants"]) == {"hybrid", "mamba"}
    assert set(results["lr_selection"]["hybrid"]) == {"0.001", "0.003"}
    for v in results["variants"].values():
        assert v["lr"] in (1e-3, 3e-3) and v["train_length"] == 16
        assert set(v["by_length"]) == {"16", "32"} and v["params"] > 0
        assert v["state_bytes_per_seq"] > 0
        assert len(v["by_length"]["32"]["per_seed_ex_match"]) == 1
    assert results["variants"]["hybrid"]["kv_bytes_per_token"] > 0
    assert results["variants"]["mamba"]["kv_bytes_per_token"] == 0  # no attention layer
    report = (out / "report.md").read_text()
    assert "# Study: tiny-study" in report and "two variants" in report
    assert "| hybrid |" in report and "| mamba |" in report
    assert "| 16" in report and "| 32" in report  # one column per evaluation length
    assert "![length generalisation](lengthgen.png)" in report
    assert (out / "lengthgen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for d in dirs:
        assert (d / "heldout.json").is_file() and (d / "model.safetensors").is_file()
    chosen = {name: out / name / f"lr{v['lr']:g}-seed0" for name, v in results["variants"].items()}
    assert all((d / "eval.json").is_file() for d in chosen.values())

    # Re-running trains nothing: finished runs are skipped, their files untouched.
    mtimes = {d: (d / "model.safetensors").stat().st_mtime_ns for d in dirs}
    ckpts = {d: (d / "checkpoints" / "latest").read_text() for d in dirs}

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("hybridkit.study.Trainer", no_training)
    again = run_study(study, out, device="cpu", progress=False)
    assert "[study] training" not in capsys.readouterr().out
    assert again["variants"].keys() == results["variants"].keys()
    assert {n: v["lr"] for n, v in again["variants"].items()} == {
        n: v["lr"] for n, v in results["variants"].items()
    }
    assert {d: (d / "model.safetensors").stat().st_mtime_ns for d in dirs} == mtimes
    assert {d: (d / "checkpoints" / "latest").read_text() for d in dirs} == ckpts


def test_interrupted_study_resumes_only_the_unfinished_run(tmp_path, capsys):
    study = write_study(
        tmp_path, variants={"hybrid": []}, lrs=[3e-3], lengths=[16], description=None
    )
    out = tmp_path / "out"
    run_study(study, out, device="cpu", progress=False)
    run = out / "hybrid" / "lr0.003-seed0"
    first = json.loads((run / "final.json").read_text())
    # Simulate a kill after the last checkpoint but before final.json was written.
    (run / "final.json").unlink()
    (run / "eval.json").unlink()
    latest = (run / "checkpoints" / "latest").read_text()
    ckpt_mtime = (run / "checkpoints" / latest / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    run_study(study, out, device="cpu", progress=False)
    printed = capsys.readouterr().out
    assert "[study] training hybrid" in printed and "resumed from" in printed
    second = json.loads((run / "final.json").read_text())
    assert second["step"] == first["step"] == 20
    assert second["final_eval"] == first["final_eval"]
    # the finished checkpoint was not rewritten and nothing was trained again
    assert (run / "checkpoints" / "latest").read_text() == latest
    assert (run / "checkpoints" / latest / "model.safetensors").stat().st_mtime_ns == ckpt_mtime
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [5, 10, 15, 20]


# --- bad study files ------------------------------------------------------------------------------
def study_error(tmp_path: Path, cli_error, **changes) -> str:
    path = write_study(tmp_path, **changes)
    with pytest.raises(HybridkitError) as info:
        run_study(path, tmp_path / "out", device="cpu", progress=False)
    err = cli_error("study", str(path), "-o", str(tmp_path / "out"), "--no-progress")
    assert err.startswith("hybridkit study: error:")
    assert not list((tmp_path / "out").glob("*/*/metrics.jsonl")), "trained before failing"
    return str(info.value)


def test_unknown_study_key(tmp_path, cli_error):
    msg = study_error(tmp_path, cli_error, varaints={"x": []})
    assert "varaints: unknown key" in msg and "allowed keys" in msg and "variants" in msg


def test_empty_variants(tmp_path, cli_error):
    msg = study_error(tmp_path, cli_error, variants={})
    assert "variants" in msg and "at least one variant" in msg


def test_bad_base_path(tmp_path, cli_error):
    msg = study_error(tmp_path, cli_error, base="recipes/nope.yaml")
    assert "base" in msg and "nope.yaml" in msg and "not found" in msg


def test_bad_variant_override_key_names_the_variant_and_key(tmp_path, cli_error):
    variants = {"hybrid": [], "typo": ["model.d_modle=32"]}
    msg = study_error(tmp_path, cli_error, variants=variants)
    assert "model.d_modle" in msg and "unknown key" in msg and "'typo'" in msg
    msg = study_error(tmp_path, cli_error, variants={"hybrid": ["task.num_kv_pair=3"]})
    assert "task.num_kv_pair" in msg and "'hybrid'" in msg
    msg = study_error(tmp_path, cli_error, variants={"hybrid": ["model.layout=m x"]})
    assert "model.layout" in msg and "'hybrid'" in msg


def test_bad_study_values(tmp_path, cli_error):
    assert "lrs" in study_error(tmp_path, cli_error, lrs=[1e-3, -1.0])
    assert "seeds must not be empty" in study_error(tmp_path, cli_error, seeds=[])
    assert "select_metric" in study_error(tmp_path, cli_error, select_metric="loss")
    assert "plain folder name" in study_error(tmp_path, cli_error, variants={"a/b": []})
    assert "set" in study_error(tmp_path, cli_error, set="train.lr=1")


def test_study_file_problems(tmp_path, capsys):
    with pytest.raises(HybridkitError, match="no such study file") as err:
        load_study(tmp_path / "missing.yaml")
    assert str(err.value).startswith(f"invalid study {tmp_path / 'missing.yaml'}:")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(HybridkitError, match="YAML syntax error"):
        load_study(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(HybridkitError, match="must be a mapping"):
        load_study(bad)
    base_without_task = tmp_path / "recipes" / "notask.yaml"
    write_study(tmp_path)
    dump_recipe(load_recipe({"model": BASE["model"]}), base_without_task)
    path = write_study(tmp_path, base="recipes/notask.yaml")
    with pytest.raises(RecipeError, match="task"):
        run_study(path, tmp_path / "out", device="cpu", progress=False)


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_shipped_studies_validate(path):
    spec, base = load_study(path)
    for variant in spec.variants:
        for lr in spec.lrs or [None]:
            recipe = variant_recipe(spec, base, variant, lr, spec.seeds[0])
            assert recipe.task is not None
