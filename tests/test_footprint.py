"""Memory lower bounds (hybridkit.footprint): work that cannot fit is refused before anything
large is allocated, naming the setting to change -- where it used to end in the OOM killer's
silence (a 2^24-token evaluation length) -- and work that fits is not refused."""

from __future__ import annotations

import pytest

from hybridkit import footprint
from hybridkit.cli import main
from hybridkit.errors import HybridkitError
from hybridkit.recipe import load_recipe
from hybridkit.study import run_study
from hybridkit.train.trainer import Trainer
from tests.test_study import BASE, write_study

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bounds_count_the_unavoidable_tensors():
    recipe = load_recipe(BASE)
    model, task = recipe.model, recipe.task
    # 16 examples x 16 tokens: inputs, targets, predictions (int64), and one forward of 8 rows
    # x 16 tokens of bf16 logits (vocab 32) and two residual streams
    want = 16 * 16 * 3 * 8, 8 * 16 * (32 + 2 * model.d_model) * 2
    assert footprint.eval_bytes(model, task, 16, 8, 16) == want
    assert footprint.eval_bytes(model, task, 32, 8, 16) == (2 * want[0], 2 * want[1])
    step = footprint.train_bytes(model, task, 8, 4)
    assert step == (8 * 16 * 16, 4 * 16 * model.n_layer * model.d_model * 2)
    assert footprint.train_bytes(model, task, 8, 8)[1] > step[1]  # no accumulation: more saved


def test_host_and_device_are_checked_apart(monkeypatch):
    """On a GPU the evaluation set stays in host memory: a set larger than the GPU's free
    memory but not the host's is not refused, and the host's own limit names host memory."""
    free = {"cpu": 1000, "cuda:0": 100}
    monkeypatch.setattr(footprint, "free_memory_bytes", lambda where: free[str(where)])
    footprint.refuse_if_short((900, 90), "cuda:0", "x", "y")  # each fits its own memory
    with pytest.raises(HybridkitError, match="needs at least 1.07 KiB of host memory"):
        footprint.refuse_if_short((1100, 90), "cuda:0", "x", "y")
    with pytest.raises(HybridkitError, match="needs at least 110 B, but cuda:0 has 100 B"):
        footprint.refuse_if_short((900, 110), "cuda:0", "x", "y")
    with pytest.raises(HybridkitError, match="needs at least 1010 B, but cpu has 1000 B"):
        footprint.refuse_if_short((900, 110), "cpu", "x", "y")  # one memory holds both


def test_refusals_name_the_settings(monkeypatch, tmp_path):
    recipe = load_recipe(BASE)
    monkeypatch.setattr(footprint, "free_memory_bytes", lambda device: 10_000)
    with pytest.raises(HybridkitError) as err:
        Trainer(recipe, tmp_path / "run", progress=False)
    assert "training step of 8 x 16 tokens" in str(err.value)
    assert "train.batch_size" in str(err.value) and "needs at least 10.00 KiB" in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made

    monkeypatch.setattr(footprint, "free_memory_bytes", lambda device: 10**6)  # the step fits
    with pytest.raises(HybridkitError, match=r"task.seq_len 16: evaluating 4096 examples"):
        recipe = load_recipe(BASE, ["task.eval_examples=4096", "eval.batch_size=4096"])
        Trainer(recipe, tmp_path / "run", progress=False)


def test_eval_and_study_refuse_a_length_past_memory(tmp_path, capsys, monkeypatch):
    recipe = load_recipe(BASE, ["train.steps=2"])
    run = tmp_path / "run"
    trainer = Trainer(recipe, run, progress=False)
    trainer.fit()
    trainer.release()
    assert main(["eval", str(run), "--lengths", "16777216", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--lengths 16777216: evaluating 16 examples of 16777216 tokens" in err
    assert "lower the length, task.eval_examples or eval.batch_size" in err
    assert main(["eval", str(run), "--lengths", "16", "--device", "cpu"]) == 0

    # a study refuses its lengths before any run trains
    study = write_study(tmp_path, lengths=[16, 16777216], lrs=None)
    with pytest.raises(HybridkitError, match=r"lengths \(variant '\w+'\) 16777216"):
        run_study(study, tmp_path / "out", device="cpu", progress=False)
    assert not list((tmp_path / "out").glob("*/*"))
    # generate --task-examples builds the whole test set at --length: refused the same way
    # (4.3 GB of test set and 2 GB of forward; this machine may hold it, so 1 GB is free here)
    monkeypatch.setattr(footprint, "free_memory_bytes", lambda where: 10**9)
    assert main(["generate", str(run), "--task-examples", "1", "--length", "16777216",
                 "--device", "cpu"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--length 16777216: the test set of 16 examples of 16777216 tokens" in err
    assert "lower --length or task.eval_examples" in err

    monkeypatch.setattr(footprint, "free_memory_bytes", lambda where: None)  # unknown: no limit
    # a task grown past the run's model (an override) is refused, not an index error in the
    # embedding: eval, generate --task-examples
    for cmd in (["eval", str(run)], ["generate", str(run), "--task-examples", "1"]):
        assert main([*cmd, "--set", "task.vocab_size=100", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "model.vocab_size: 32 is smaller than the vocabulary of task 'mqar' (100)" in err
