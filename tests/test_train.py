"""Training on the CPU: schedules, exact resume (in-process and after kill -9), clear checkpoint
errors, NaN detection, DDP / FSDP2 with gloo, learning MQAR and parity, and `hybridkit eval`."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from hybridkit.cli import main
from hybridkit.errors import CheckpointError, RecipeError
from hybridkit.recipe import dump_recipe, load_recipe
from hybridkit.recipe_sections import AUTO_LOSS_CHUNK_TOKENS, TrainSpec
from hybridkit.train.checkpoint import read_checkpoint
from hybridkit.train.metrics import read_metrics
from hybridkit.train.optim import build_optimizer, lr_at, param_groups
from hybridkit.train.trainer import Trainer, TrainingDiverged
from hybridkit.weights import latest_checkpoint
from tests.helpers import checkout_env, needs_fsdp_on_cpu, needs_torch_2_6_compile

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parent.parent

MQAR = {"kind": "mqar", "vocab_size": 64, "seq_len": 16, "num_kv_pairs": 2, "eval_examples": 32}


def recipe_dict(
    task: dict | None = None,
    *,
    layout: str = "m a",
    d_model: int = 32,
    mamba: dict | None = None,
    **train: Any,
) -> dict:
    """A tiny hybrid (one Mamba-3 block, one NoPE attention block) on a tiny task."""
    mixer = {"kind": "mamba3", "d_state": 16, "headdim": 16, "chunk_size": 8, **(mamba or {})}
    attn = {"kind": "attention", "n_heads": 2, "head_dim": d_model // 2, "position": "nope"}
    mlp = {"kind": "mlp", "d_ff": 2 * d_model}
    task = dict(task or MQAR)
    return {
        "name": "t",
        "seed": 0,
        "model": {
            "d_model": d_model,
            "vocab_size": 64,
            "layout": layout,
            "blocks": {"m": {"mixer": mixer, "mlp": mlp}, "a": {"mixer": attn, "mlp": mlp}},
        },
        "task": task,
        "train": {
            "steps": 12,
            "batch_size": 8,
            "lr": 3e-3,
            "log_every": 1,
            "checkpoint_every": 4,
            "device": "cpu",
            "tensorboard": False,
            **train,
        },
        "eval": {"decode_examples": 2, "lengths": [task["seq_len"]]},
    }


def make(task: dict | None = None, **kw: Any):
    return load_recipe(recipe_dict(task, **kw))


def write_recipe(path: Path, task: dict | None = None, **kw: Any) -> Path:
    dump_recipe(make(task, **kw), path)
    return path


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of every training record; fails on a duplicated step."""
    out: dict[int, float] = {}
    for rec in read_metrics(run_dir):
        if "loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice in {run_dir}"
            out[rec["step"]] = rec["loss"]
    return out


def assert_losses_close(got: dict[int, float], want: dict[int, float], rtol: float) -> None:
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert math.isclose(got[step], loss, rel_tol=rtol, abs_tol=0.0), (step, got[step], loss)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished 8-step run (checkpoints at 4 and 8) that tests copy before damaging it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    Trainer(make(steps=8), run, resume=None, progress=False).fit()
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


# --- learning-rate schedules and weight-decay groups ---------------------------------------------
def test_lr_warmup_then_cosine():
    spec = TrainSpec(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, spec) == pytest.approx(1e-4)
    assert lr_at(4, spec) == pytest.approx(5e-4)
    assert lr_at(9, spec) == pytest.approx(1e-3)
    assert lr_at(10, spec) == pytest.approx(1e-3)
    assert lr_at(55, spec) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: mean of peak, floor
    assert lr_at(100, spec) == pytest.approx(1e-4)
    assert lr_at(10_000, spec) == pytest.approx(1e-4)  # stays at the floor past the end
    values = [lr_at(s, spec) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_wsd_and_constant():
    spec = TrainSpec(
        steps=100, lr=2e-3, warmup_steps=5, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2
    )
    assert lr_at(0, spec) == pytest.approx(2e-3 / 5)
    assert [lr_at(s, spec) for s in (5, 50, 79, 80)] == pytest.approx([2e-3] * 4)
    assert lr_at(90, spec) == pytest.approx(1e-3)  # half way through the decay
    assert lr_at(100, spec) == pytest.approx(0.0)
    const = TrainSpec(steps=50, lr=1e-3, warmup_steps=0, schedule="constant")
    assert {lr_at(s, const) for s in (0, 25, 49)} == {1e-3}


def test_default_warmup_is_five_percent():
    assert TrainSpec(steps=200).resolved_warmup() == 10
    assert TrainSpec(steps=10).resolved_warmup() == 1
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainSpec(steps=10, warmup_steps=10)


def test_weight_decay_groups():
    data = recipe_dict()
    data["model"]["blocks"]["a"]["mixer"]["qkv_bias"] = True
    recipe = load_recipe(data)
    from hybridkit.build import build_model

    model = build_model(recipe, seed=0)
    groups = param_groups(model, 0.1)
    decay = dict(zip(groups[0]["names"], groups[0]["params"]))
    plain = set(groups[1]["names"])
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    exempt = ("D", "dt_bias", "B_bias", "C_bias", "bias")
    for name in plain:
        assert "norm" in name or "embedding" in name or name.split(".")[-1] in exempt, name
    for must in ("mixer.D", "mixer.dt_bias", "mixer.B_bias", "mixer.C_bias", "mixer.wqkv.bias"):
        assert any(n.endswith(must) for n in plain), must
    assert "embedding.weight" in plain and "norm_f.weight" in plain
    assert all(p.dim() == 2 for p in decay.values())
    assert any(n.endswith("in_proj.weight") for n in decay)
    assert any(n.endswith("mlp.fc1.weight") for n in decay)
    # every trainable parameter is in exactly one group
    n_params = len({id(p) for p in model.parameters()})
    assert len(decay) + len(plain) == n_params
    opt = build_optimizer(model, recipe.train)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


# --- seeds ----------------------------------------------------------------------------------------
def test_task_seed_sets_the_data_stream_and_train_seed_the_init(tmp_path):
    def trainer(name: str, task_seed: int | None = None, **train: Any) -> Trainer:
        recipe = make({**MQAR, "seed": task_seed}, **train)
        return Trainer(recipe, tmp_path / name, resume=None, progress=False)

    def same_batches(x: Trainer, y: Trainer) -> bool:
        return all(torch.equal(x.batch_for(s).inputs, y.batch_for(s).inputs) for s in (0, 3))

    def same_init(x: Trainer, y: Trainer) -> bool:
        pairs = zip(x.model.parameters(), y.model.parameters())
        return all(torch.equal(p, q) for p, q in pairs)

    default = trainer("default")  # recipe seed 0 for both
    data5 = trainer("data5", task_seed=5)
    both5 = trainer("both5", seed=5)  # train.seed: init and, without task.seed, data
    init9 = trainer("init9", task_seed=0, seed=9)
    assert same_init(default, data5) and not same_batches(default, data5)
    assert same_batches(data5, both5) and not same_init(data5, both5)
    assert same_batches(default, init9) and not same_init(default, init9)


# --- batches made ahead in a worker process ------------------------------------------------------
@pytest.mark.slow  # ~8 s: two spawned batch workers
def test_prefetched_training_is_the_inline_training_and_resumes(tmp_path):
    """``train.prefetch``: the worker makes exactly the batches the loop would (a batch is a
    function of the data seed and the step), so losses are bitwise those of inline batches,
    and a run stopped and resumed between checkpoints (the worker asked for an earlier step
    than it made ahead) still matches."""
    warnings.simplefilter("error", RuntimeWarning)  # the worker must not fall back here
    inline = Trainer(make(steps=8), tmp_path / "a", resume=None, progress=False)
    assert inline._batches is None  # auto on the CPU: inline
    inline.fit()
    recipe = make(steps=8, prefetch=True)
    Trainer(recipe, tmp_path / "b", resume=None, progress=False, stop_after=6).fit()
    resumed = Trainer(recipe, tmp_path / "b", resume="auto", progress=False)
    assert resumed.step == 4 and resumed._batches is not None
    resumed.fit()
    assert resumed._batches is None  # fit closed the worker
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bitwise


def test_a_run_projected_past_its_deadline_stops_with_a_checkpoint(tmp_path):
    """``deadline``: after the first ``DEADLINE_SKIP_STEPS`` steps (compilation, warm-up) the
    trainer times ``DEADLINE_TIMED_STEPS`` more and, when their rate puts the last step past
    the deadline, saves a checkpoint and raises ``RunWouldNotFinish`` with the projected time;
    the run resumes from that step. A deadline the run meets changes nothing."""
    from hybridkit.errors import RunWouldNotFinish
    from hybridkit.train.trainer import DEADLINE_SKIP_STEPS, DEADLINE_TIMED_STEPS, _projected_end

    assert _projected_end((10, 100.0), 29, 119.0, 1029) is None  # 19 steps timed: too few
    assert _projected_end((10, 100.0), 30, 120.0, 1030) == 120.0 + 1000.0
    recipe = make(steps=100_000, checkpoint_every=0)
    with pytest.raises(RunWouldNotFinish, match=r"past the deadline .*checkpoint saved") as info:
        Trainer(recipe, tmp_path / "a", resume=None, progress=False, deadline=time.time()).fit()
    stopped = DEADLINE_SKIP_STEPS + DEADLINE_TIMED_STEPS
    assert f"at step {stopped} of 100000" in str(info.value)
    assert info.value.projected_s > 100.0  # 100,000 steps of milliseconds each
    assert Trainer(recipe, tmp_path / "a", resume="auto", progress=False).step == stopped
    later = time.time() + 3600
    done = Trainer(make(steps=40), tmp_path / "b", resume=None, progress=False, deadline=later)
    assert done.fit()["step"] == 40


def test_prefetch_falls_back_inline_when_the_worker_cannot_start(tmp_path):
    """A worker that fails (here: a plugin module it cannot import) costs speed, not the run:
    one warning, then every batch inline, the same batches."""
    from hybridkit.recipe import recipe_to_dict
    from hybridkit.train.prefetch import BatchPrefetcher

    trainer = Trainer(make(steps=4), tmp_path / "a", resume=None, progress=False)
    data = {**recipe_to_dict(make(steps=4)), "plugins": ["no_such_plugin_module_xyz"]}
    prefetcher = BatchPrefetcher(data, 0, 8, trainer.batch_for, end=4)
    with pytest.warns(RuntimeWarning, match="making batches inline from step 0"):
        first = prefetcher.get(0)
    assert torch.equal(first.inputs, trainer.batch_for(0).inputs)
    assert torch.equal(prefetcher.get(3).targets, trainer.batch_for(3).targets)
    prefetcher.close()


def test_prefetch_falls_back_inline_where_no_process_may_start(tmp_path, monkeypatch):
    """Where the worker process cannot even be started (inside a daemonic process, which may
    not have children) the prefetcher warns once at construction and makes every batch
    inline, instead of failing the run."""
    from hybridkit.recipe import recipe_to_dict
    from hybridkit.train import prefetch

    def refused(self, *args, **kwargs):
        raise AssertionError("daemonic processes are not allowed to have children")

    trainer = Trainer(make(steps=4), tmp_path / "a", resume=None, progress=False)
    monkeypatch.setattr(prefetch.ProcessPoolExecutor, "submit", refused)
    with pytest.warns(RuntimeWarning, match="no batch worker could start.*making batches inline"):
        prefetcher = prefetch.BatchPrefetcher(
            recipe_to_dict(make(steps=4)), 0, 8, trainer.batch_for, end=4
        )
    assert torch.equal(prefetcher.get(2).inputs, trainer.batch_for(2).inputs)
    prefetcher.close()


# --- exact resume ---------------------------------------------------------------------------------
def test_resume_in_process_is_exact(tmp_path):
    recipe = make(steps=12, checkpoint_every=4)
    full = Trainer(recipe, tmp_path / "a", resume=None, progress=False).fit()
    # Stop between checkpoints (10): the resumed session replays 9..12 from checkpoint 8.
    Trainer(recipe, tmp_path / "b", resume=None, progress=False, stop_after=10).fit()
    assert latest_checkpoint(tmp_path / "b").name == "step_0000008"
    assert not (tmp_path / "b" / "final.json").exists()
    assert max(losses(tmp_path / "b")) == 10
    resumed = Trainer(recipe, tmp_path / "b", resume="auto", progress=False)
    assert resumed.step == 8
    out = resumed.fit()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 13))
    assert a == b  # bitwise
    assert out["loss"] == full["loss"]
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the AdamW moments of the final checkpoints agree too
    _, oa, sa = read_checkpoint(latest_checkpoint(tmp_path / "a"))
    _, ob, sb = read_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert sa["step"] == sb["step"] == 12
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


def test_resume_at_a_checkpoint_step_and_of_a_finished_run(tmp_path):
    recipe = make(steps=8, checkpoint_every=4)
    Trainer(recipe, tmp_path / "a", resume=None, progress=False).fit()
    Trainer(recipe, tmp_path / "b", resume=None, progress=False, stop_after=4).fit()
    Trainer(recipe, tmp_path / "b", resume="auto", progress=False).fit()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    # Resuming a finished run trains nothing and keeps its checkpoint and weights.
    before = weights(tmp_path / "b")
    again = Trainer(recipe, tmp_path / "b", resume="auto", progress=False)
    assert again.step == 8
    again.fit()
    after = weights(tmp_path / "b")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert latest_checkpoint(tmp_path / "b").name == "step_0000008"
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_from_explicit_checkpoint_path(tmp_path, trained_run):
    ckpt = trained_run / "checkpoints" / "step_0000004"
    assert ckpt.is_dir()
    t = Trainer(make(steps=8), tmp_path / "fork", resume=str(ckpt), progress=False)
    assert t.step == 4
    t.fit()
    tail = {s: v for s, v in losses(trained_run).items() if s > 4}
    assert losses(tmp_path / "fork") == tail
    # the forked run writes its own final checkpoint
    assert latest_checkpoint(tmp_path / "fork").name == "step_0000008"


def test_resume_never_unpickles(run_copy, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load (pickle) used while resuming")

    monkeypatch.setattr(torch, "load", refuse)
    assert Trainer(make(steps=8), run_copy, resume="auto", progress=False).step == 8


def test_fresh_run_drops_metrics_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    recipe = make(steps=6, checkpoint_every=0)
    Trainer(recipe, tmp_path / "r", resume=None, progress=False, stop_after=3).fit()
    assert latest_checkpoint(tmp_path / "r") is None
    with (tmp_path / "r" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 1.2')  # torn line of a killed writer
    Trainer(recipe, tmp_path / "r", resume="auto", progress=False).fit()
    assert sorted(losses(tmp_path / "r")) == list(range(1, 7))


def test_restart_over_an_old_run_keeps_its_own_checkpoints(run_copy):
    """--resume none in a directory of a longer run: the old run moves to ``earlier-1`` (nothing
    deleted), so neither its checkpoints nor its final weights mix with the new run's -- also
    when the new run is stopped before its first checkpoint, where ``--resume auto`` then
    starts from scratch instead of from the old run's last step."""
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("step_*")) == [
        "step_0000004",
        "step_0000008",
    ]
    old_losses = losses(run_copy)
    restart = dict(resume=None, progress=False)
    Trainer(make(steps=8, checkpoint_every=5), run_copy, **restart, stop_after=3).fit()
    earlier = run_copy / "earlier-1"
    assert sorted(p.name for p in (earlier / "checkpoints").glob("step_*")) == [
        "step_0000004",
        "step_0000008",
    ]
    assert (earlier / "final.json").is_file() and losses(earlier) == old_losses
    assert not (run_copy / "final.json").exists() and not (run_copy / "checkpoints").exists()
    assert Trainer(make(steps=8), run_copy, resume="auto", progress=False).step == 0
    Trainer(
        make(steps=8, checkpoint_every=2), run_copy, resume=None, progress=False, stop_after=3
    ).fit()
    assert (run_copy / "earlier-1").is_dir() and not (run_copy / "earlier-2").exists()
    assert [p.name for p in (run_copy / "checkpoints").glob("step_*")] == ["step_0000002"]
    assert sorted(losses(run_copy)) == [1, 2, 3]
    resumed = Trainer(make(steps=8, checkpoint_every=2), run_copy, resume="auto", progress=False)
    assert resumed.step == 2
    # resuming from an older checkpoint than the newest drops the newer ones on the next save
    resumed.fit()
    ckpts = sorted(p.name for p in (run_copy / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000006", "step_0000008"]
    Trainer(
        make(steps=8, checkpoint_every=2),
        run_copy,
        resume=str(run_copy / "checkpoints" / "step_0000006"),
        progress=False,
        stop_after=7,
    ).fit()
    assert latest_checkpoint(run_copy).name == "step_0000006"
    Trainer(make(steps=8, checkpoint_every=2), run_copy, resume="auto", progress=False).fit()
    assert sorted(losses(run_copy)) == list(range(1, 9))


def test_a_finished_run_run_again_evaluates_once_and_keeps_its_summary(run_copy):
    """Run again (or killed after its final evaluation but before final.json), a finished run
    logged a second final evaluation and wrote a final.json without its loss."""
    summary = json.loads((run_copy / "final.json").read_text())
    (run_copy / "final.json").unlink()
    Trainer(make(steps=8), run_copy, resume="auto", progress=False).fit()
    again = json.loads((run_copy / "final.json").read_text())
    for key in ("step", "loss", "lr", "grad_norm", "final_eval"):
        assert again[key] == summary[key], key
    evals = [r["step"] for r in read_metrics(run_copy) if "eval" in r]
    assert evals == [8]


def test_training_a_finished_run_further_drops_its_final_weights(run_copy):
    """train.steps raised: until the longer run finishes, final.json and model.safetensors
    (which evaluation prefers) would stand for the old end."""
    from hybridkit.weights import find_weights

    Trainer(make(steps=16), run_copy, resume="auto", progress=False, stop_after=13).fit()
    assert not (run_copy / "final.json").exists()
    assert find_weights(run_copy) == run_copy / "checkpoints" / "step_0000012" / "model.safetensors"


def test_a_deadline_stop_keeps_the_evaluation_of_its_step(tmp_path, monkeypatch):
    """The deadline is checked after the step's evaluation: a stop at an evaluation step used
    to save the checkpoint first and lose that evaluation (the resume starts after it)."""
    import hybridkit.train.trainer as trainer_module
    from hybridkit.errors import RunWouldNotFinish

    recipe = make(steps=24, log_every=4, eval_every=8, checkpoint_every=0)
    Trainer(recipe, tmp_path / "a", resume=None, progress=False).fit()
    late = lambda probe, step, now, end: now + 1e9 if step >= 16 else None  # noqa: E731
    monkeypatch.setattr(trainer_module, "_projected_end", late)
    b = tmp_path / "b"
    with pytest.raises(RunWouldNotFinish, match="at step 16 of 24"):
        Trainer(recipe, b, resume=None, progress=False, deadline=time.time()).fit()
    monkeypatch.undo()
    Trainer(recipe, b, resume="auto", progress=False).fit()
    evals = lambda run: [(r["step"], r["eval"]) for r in read_metrics(run) if "eval" in r]  # noqa: E731
    assert [step for step, _ in evals(b)] == [8, 16, 24]
    assert evals(b) == evals(tmp_path / "a") and losses(b) == losses(tmp_path / "a")


def test_checkpoints_past_ten_million_steps_keep_their_order(tmp_path):
    """Step folders compare as numbers: step_10000000 sorts after step_9999999 (by name it came
    first, so the two older ones were pruned and the wrong one counted as newest)."""
    from hybridkit.train.checkpoint import newest_valid_checkpoint, write_checkpoint

    state = {"format": "hybridkit-1", "torch_rng": torch.get_rng_state().tolist()}
    tensors = {"w": torch.ones(2)}
    for step in (9_999_998, 9_999_999, 10_000_000):
        write_checkpoint(tmp_path, step, tensors, tensors, {**state, "step": step}, keep=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_10000000", "step_9999998", "step_9999999"]
    path, _ = newest_valid_checkpoint(tmp_path)
    assert path.name == "step_10000000"
    (tmp_path / "checkpoints" / "latest").unlink()  # the fallback orders the same way
    assert newest_valid_checkpoint(tmp_path, warn=False)[0].name == "step_10000000"


def test_run_files_are_readable_as_the_umask_allows(tmp_path):
    """Atomic writes go through temporary files (mkstemp: 0600, mkdtemp: 0700); published,
    they get the mode a plain open / mkdir would give them, and killed writes' temporary
    checkpoint folders are cleared at the next checkpoint."""
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        (run / "checkpoints" / ".step_0000001.dead").mkdir(parents=True)
        Trainer(make(steps=4, checkpoint_every=2), run, resume=None, progress=False).fit()
    finally:
        os.umask(old)
    for name in ("recipe.yaml", "final.json", "model.safetensors", "checkpoints/latest"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name
    step = run / "checkpoints" / "step_0000004"
    assert step.stat().st_mode & 0o777 == 0o755
    assert (step / "trainer.json").stat().st_mode & 0o777 == 0o644
    assert not list((run / "checkpoints").glob(".step_*")) and not (run / "earlier-1").exists()


def test_a_recipe_its_run_folder_could_not_read_back_is_refused(tmp_path):
    """Resolved, a recipe can outgrow what the reader accepts (aliases of a block reused a
    hundred times; a long description): the run used to train and leave a recipe.yaml that
    ``show`` / ``train RUN`` then refused."""
    data = recipe_dict()
    data["description"] = "x" * 70_000
    recipe = load_recipe(data)
    with pytest.raises(RecipeError, match="could not be read back .*longer than 64 KiB"):
        Trainer(recipe, tmp_path / "run", resume=None, progress=False)
    assert not (tmp_path / "run").exists()


def _ckpt_steps(run: Path) -> list[int]:
    latest = latest_checkpoint(run) if (run / "checkpoints" / "latest").is_file() else None
    return [] if latest is None else [int(latest.name.split("_")[1])]


@pytest.mark.slow
def test_resume_after_kill_9(tmp_path):
    """A CLI run killed with SIGKILL after a checkpoint resumes to the same losses as an
    uninterrupted run, without duplicated steps in metrics.jsonl."""
    # Constant LR: the killed run may be given more steps than it will ever reach, and the
    # resumed/reference runs stop at 40 with the same schedule.
    train = {"checkpoint_every": 10, "schedule": "constant", "warmup_steps": 2}
    long_recipe = write_recipe(tmp_path / "long.yaml", steps=400, **train)
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridkit", "train", str(long_recipe), "-o", str(run)]
        + ["--no-progress"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the training subprocess made no progress"
            ckpt = _ckpt_steps(run)
            logged = [r["step"] for r in read_metrics(run) if "loss" in r]
            # past checkpoint 20 and a few steps beyond it, so some records must be dropped
            if ckpt and ckpt[0] >= 20 and logged and max(logged) >= ckpt[0] + 2:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _ckpt_steps(run)[0]
    assert killed_at < 40
    # resume with the CLI (same model, 40 steps) and compare to an uninterrupted 40-step run
    resume = ["train", str(long_recipe), "-o", str(run), "--no-progress"]
    assert main([*resume, "--set", "train.steps=40"]) == 0
    ref_recipe = write_recipe(tmp_path / "ref.yaml", steps=40, **train)
    assert main(["train", str(ref_recipe), "-o", str(tmp_path / "ref"), "--no-progress"]) == 0
    got, want = losses(run), losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, 41))
    # two processes with the same thread count and kernels: identical up to rounding noise
    assert_losses_close(got, want, rtol=1e-6)
    # at most a temporary dir/file of the killed writer, never a partial step_* or latest
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert all(p.startswith((".step_", ".latest.")) for p in leftovers), leftovers


FREEZE_PLUGIN = '''
"""Test plugin: freeze the trainer half way through writing one checkpoint, to be killed there."""
import os
import time
import warnings
from pathlib import Path

import hybridkit.train.checkpoint as ck
from safetensors.torch import save

STEP = f"step_{int(os.environ['HK_FREEZE_STEP']):07d}"
PHASE = os.environ["HK_FREEZE_PHASE"]
READY = Path(os.environ["HK_FREEZE_READY"])
_save_tensors, _atomic_write_bytes = ck.save_tensors, ck.atomic_write_bytes


def freeze():
    READY.write_text("frozen")
    time.sleep(600)


def save_tensors(tensors, path):
    if PHASE == "tensors" and STEP in str(path) and path.name == "optimizer.safetensors":
        data = save(ck.untie(tensors))
        with open(path, "wb") as f:  # half of the file on disk, as a kill mid-write leaves it
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        freeze()
    _save_tensors(tensors, path)


def atomic_write_bytes(path, data):
    if PHASE == "latest" and data == STEP.encode():
        freeze()  # the checkpoint directory is complete and in place; `latest` not yet moved
    _atomic_write_bytes(path, data)


ck.save_tensors, ck.atomic_write_bytes = save_tensors, atomic_write_bytes
'''


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["tensors", "latest"])
def test_killed_while_writing_a_checkpoint_resumes_exactly(phase, tmp_path):
    """SIGKILL while the checkpoint of step 8 is being written (a tensor file half written, or
    the directory complete but ``latest`` not yet moved): the run resumes from step 4 and ends
    where an uninterrupted run ends. The freeze comes from a plugin, so the kill lands at a known
    point of the write instead of wherever a timer happens to fall."""
    train = {"steps": 12, "checkpoint_every": 4, "schedule": "constant", "warmup_steps": 2}
    recipe = write_recipe(tmp_path / "r.yaml", **train)
    plugin, ready, run = tmp_path / "freeze.py", tmp_path / "ready", tmp_path / "run"
    plugin.write_text(FREEZE_PLUGIN)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "HK_FREEZE_STEP": "8",
        "HK_FREEZE_PHASE": phase,
        "HK_FREEZE_READY": str(ready),
    }
    cmd = [sys.executable, "-m", "hybridkit", "train", str(recipe), "-o", str(run)]
    proc = subprocess.Popen(
        [*cmd, "--no-progress", "--plugin", str(plugin)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 180
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the training subprocess never reached step 8"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    checkpoints = run / "checkpoints"
    assert latest_checkpoint(run).name == "step_0000004"
    if phase == "tensors":  # the half-written directory never got its name
        assert not (checkpoints / "step_0000008").exists()
        assert any(p.name.startswith(".step_0000008.") for p in checkpoints.iterdir())
    else:  # complete but not yet named by `latest`: not trusted, a later step replaces it
        assert (checkpoints / "step_0000008" / "trainer.json").is_file()
    assert main(["train", str(recipe), "-o", str(run), "--no-progress"]) == 0
    reference = tmp_path / "reference"
    Trainer(make(**train), reference, resume=None, progress=False).fit()
    got, want = losses(run), losses(reference)
    assert sorted(got) == list(range(1, 13))
    assert_losses_close(got, want, rtol=1e-6)  # two processes: equal up to rounding noise
    w, ref = weights(run), weights(reference)
    for k in ref:
        torch.testing.assert_close(w[k], ref[k], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000008", "step_0000012"]
    _, _, state = read_checkpoint(checkpoints / "step_0000012")
    assert state["step"] == 12


# --- damaged checkpoints: clear errors, and --resume auto falls back to an intact one ----------
def _cli_train_error(run: Path, cli_error, *extra: str) -> str:
    recipe = run.parent / "recipe-in.yaml"
    shutil.copy(run / "recipe.yaml", recipe)
    err = cli_error("train", str(recipe), "-o", str(run), "--no-progress", *extra)
    assert err.startswith("hybridkit train: error:")
    return err


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_byte(path: Path) -> None:
    """Same size, one bit different: only the recorded SHA-256 can tell."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    # name: (how, the file the message names, what the message says)
    "truncated_weights": (
        lambda c: _truncate(c / "model.safetensors"),
        "model.safetensors",
        "truncated",
    ),
    "truncated_optimizer": (
        lambda c: (c / "optimizer.safetensors").write_bytes(b"\x08\x00\x00"),
        "optimizer.safetensors",
        "truncated",
    ),
    "flipped_bit": (
        lambda c: _flip_last_byte(c / "model.safetensors"),
        "model.safetensors",
        "SHA-256",
    ),
    "corrupt_trainer_json": (
        lambda c: (c / "trainer.json").write_text('{"format": "hybridkit-1", "step": '),
        "trainer.json",
        "is corrupt",
    ),
    "foreign_trainer_json": (
        lambda c: (c / "trainer.json").write_text(json.dumps({"step": 3, "something": "else"})),
        "step_0000008",
        "not written by hybridkit",
    ),
    "missing_trainer_json": (lambda c: (c / "trainer.json").unlink(), "trainer.json", "missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_and_resumes_exactly(
    damage, run_copy, trained_run, capsys
):
    how, file, what = DAMAGE[damage]
    newest = latest_checkpoint(run_copy)
    assert newest.name == "step_0000008"
    how(newest)
    resumed = Trainer(make(steps=8), run_copy, resume="auto", progress=False)
    err = capsys.readouterr().err
    assert resumed.step == 4
    assert "warning: skipping a damaged checkpoint" in err and file in err and what in err, err
    assert "resuming from the newest intact checkpoint" in err and "step_0000004" in err
    assert latest_checkpoint(run_copy).name == "step_0000004"
    resumed.fit()
    assert losses(run_copy) == losses(trained_run)  # bitwise: steps 5-8 replayed exactly
    w, want = weights(run_copy), weights(trained_run)
    assert all(torch.equal(w[k], want[k]) for k in want)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_named_explicitly_is_a_clear_error(damage, run_copy, cli_error):
    how, file, what = DAMAGE[damage]
    newest = latest_checkpoint(run_copy)
    how(newest)
    with pytest.raises(CheckpointError, match=what):
        Trainer(make(steps=8), run_copy, resume=str(newest), progress=False)
    err = _cli_train_error(run_copy, cli_error, "--resume", str(newest))
    assert file in err and what in err and "Traceback" not in err


def test_no_intact_checkpoint_is_an_error_naming_every_one(run_copy, cli_error):
    for ckpt in (run_copy / "checkpoints").glob("step_*"):
        _truncate(ckpt / "model.safetensors")
    err = _cli_train_error(run_copy, cli_error)
    assert "no intact checkpoint to resume from" in err and "--resume none" in err
    assert "step_0000004/model.safetensors" in err and "step_0000008/model.safetensors" in err


def test_not_a_checkpoint_directory(run_copy, tmp_path, cli_error):
    not_ckpt = tmp_path / "not-a-checkpoint"
    not_ckpt.mkdir()
    err = _cli_train_error(run_copy, cli_error, "--resume", str(not_ckpt))
    assert "not a hybridkit checkpoint" in err
    err = _cli_train_error(run_copy, cli_error, "--resume", str(tmp_path / "nowhere"))
    assert "no checkpoint directory" in err


def test_latest_pointing_nowhere_falls_back_to_the_newest_checkpoint(run_copy, capsys):
    (run_copy / "checkpoints" / "latest").write_text("step_0000999")
    assert Trainer(make(steps=8), run_copy, resume="auto", progress=False).step == 8
    assert "latest names 'step_0000999'" in capsys.readouterr().err


def test_checkpoints_record_sizes_and_hashes(trained_run):
    _, _, state = read_checkpoint(latest_checkpoint(trained_run))
    for name in ("model.safetensors", "optimizer.safetensors"):
        entry = state["files"][name]
        assert entry["bytes"] == (latest_checkpoint(trained_run) / name).stat().st_size
        assert len(entry["sha256"]) == 64


def test_other_architecture_refuses_to_resume(run_copy, cli_error):
    with pytest.raises(CheckpointError, match="different model architecture"):
        Trainer(make(steps=8, d_model=16), run_copy, resume="auto", progress=False)
    recipe = write_recipe(run_copy.parent / "other.yaml", steps=8)
    err = cli_error("train", str(recipe), "-o", str(run_copy), "--set", "model.d_model=16")
    assert "different model architecture" in err
    # a changed train section (more steps) is allowed
    assert Trainer(make(steps=10), run_copy, resume="auto", progress=False).step == 8


def test_resuming_under_a_changed_data_or_optimisation_is_refused(run_copy, cli_error):
    """A run's checkpoint continues only under the recipe it was trained with, give or take
    the step count and execution settings: ``--resume auto`` with another learning rate or task
    length carried on silently and rewrote recipe.yaml, so the folder described training that
    never happened. An explicit checkpoint of another run stays free (fine-tuning)."""
    with pytest.raises(CheckpointError, match=r"train\.lr: 0\.003 -> 0\.01.*--resume none"):
        Trainer(make(steps=10, lr=1e-2), run_copy, resume="auto", progress=False)
    task = {**MQAR, "seq_len": MQAR["seq_len"] + 8}
    with pytest.raises(CheckpointError, match=r"task\.seq_len"):
        Trainer(make(task, steps=10), run_copy, resume="auto", progress=False)
    recipe = write_recipe(run_copy.parent / "other.yaml", steps=10)
    err = cli_error("train", str(recipe), "-o", str(run_copy), "--set", "train.batch_size=4")
    assert "train.batch_size: 8 -> 4" in err and "--resume none" in err
    assert "lr: 0.003" in (run_copy / "recipe.yaml").read_text()  # left as it was
    # more steps, other execution settings and evaluation: the same trajectory, continued
    same = make({**MQAR, "eval_examples": 16}, steps=10, log_every=2, checkpoint_every=5)
    same.eval.batch_size = 7
    assert Trainer(same, run_copy, resume="auto", progress=False).step == 8
    # a recipe.yaml written before a key existed: that key compares as its default
    text = (run_copy / "recipe.yaml").read_text()
    (run_copy / "recipe.yaml").write_text(text.replace("  min_lr_ratio: 0.1\n", ""))
    assert "min_lr_ratio" not in (run_copy / "recipe.yaml").read_text()
    assert Trainer(make(steps=10), run_copy, resume="auto", progress=False).step == 8
    # another run's checkpoint under another recipe: a deliberate start from its weights
    other = run_copy.parent / "finetune"
    start = str(run_copy / "checkpoints" / "step_0000008")
    assert Trainer(make(steps=10, lr=1e-2), other, resume=start, progress=False).step == 8


def test_a_run_that_ends_before_its_last_curriculum_stage_says_so(tmp_path, capsys):
    """``examples/state_tracking.py --steps 400`` on a 1,200-step curriculum stopped at 8 bits
    and was evaluated at 16-64 with no word of it (the arms then read the opposite of the
    paper). Allowed, but the trainer warns; a run reaching every stage does not."""
    stages = [
        {"steps": 3, "min_len": 2, "max_len": 3},
        {"steps": 3, "min_len": 2, "max_len": 4},
        {"steps": 3, "min_len": 2, "max_len": 6},
    ]
    task = {"kind": "parity", "seq_len": 4, "eval_examples": 8, "curriculum": stages}
    Trainer(make(task, steps=3, layout="m"), tmp_path / "short", resume=None, progress=False)
    err = capsys.readouterr().err
    assert "warning: train.steps 3 ends before task.curriculum.1 (from step 3): stages 1..2" in err
    assert "stops at length 3, not 6; at least 7 steps reach every stage" in err
    Trainer(make(task, steps=7, layout="m"), tmp_path / "full", resume=None, progress=False)
    assert "curriculum" not in capsys.readouterr().err


def test_bad_task_and_train_keys_give_clear_errors(tmp_path, cli_error):
    recipe = write_recipe(tmp_path / "r.yaml")
    for override, key in (
        ("task.num_kv_pair=3", "task.num_kv_pair"),
        ("task.kind=nope", "unknown task kind 'nope'"),
        ("task.seq_len=15", "task.seq_len"),
        ("train.schedule=linear", "train.schedule"),
        ("train.compile_mode=fast", "reduce-overhead"),
        ("train.batch_sise=3", "train.batch_sise"),
    ):
        err = cli_error("train", str(recipe), "-o", str(tmp_path / "x"), "--set", override)
        assert key in err, (override, err)
    with pytest.raises(RecipeError, match="model.vocab_size"):
        Trainer(make({**MQAR, "vocab_size": 128}, steps=2), tmp_path / "y", progress=False)
    with pytest.raises(RecipeError, match="task"):
        Trainer(load_recipe({"model": recipe_dict()["model"]}), tmp_path / "z", progress=False)


# --- NaN / inf detection --------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "nan"
    trainer = Trainer(make(steps=12, checkpoint_every=2), run, resume=None, progress=False)
    forward = trainer.forward

    def poisoned(x, **kwargs):
        out = forward(x, **kwargs)
        return out * float("nan") if trainer.step >= 5 else out  # step index 5 = 6th step

    trainer.forward = poisoned
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    msg = str(info.value)
    good = run / "checkpoints" / "step_0000004"
    assert "step 6" in msg and str(good) in msg and "lower train.lr" in msg
    assert latest_checkpoint(run) == good
    model_sd, _, state = read_checkpoint(good)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in model_sd.values())
    assert max(losses(run)) == 5  # nothing was logged for the diverged step
    # the kept checkpoint resumes (here with a healthy forward) and finishes
    out = Trainer(make(steps=12, checkpoint_every=2), run, resume="auto", progress=False).fit()
    assert out["step"] == 12 and sorted(losses(run)) == list(range(1, 13))


def test_unlogged_steps_train_the_same_and_divergence_is_still_caught(tmp_path):
    """Steps fit() neither logs, evaluates nor checkpoints run without a host sync; training is
    bitwise that of a run synchronising every step, and a NaN among them is reported by the
    next synchronised step, naming the range, with the last good checkpoint kept."""
    every = Trainer(make(steps=9, checkpoint_every=0), tmp_path / "a", resume=None, progress=False)
    every.fit()
    sparse = make(steps=9, checkpoint_every=0, log_every=4)
    Trainer(sparse, tmp_path / "b", resume=None, progress=False).fit()
    logged = losses(tmp_path / "b")
    assert sorted(logged) == [4, 8, 9]
    assert all(logged[k] == losses(tmp_path / "a")[k] for k in logged)
    for name, tensor in weights(tmp_path / "a").items():
        assert torch.equal(tensor, weights(tmp_path / "b")[name]), name
    run = tmp_path / "nan"
    trainer = Trainer(
        make(steps=12, checkpoint_every=4, log_every=4), run, resume=None, progress=False
    )
    forward = trainer.forward

    def poisoned(x, **kwargs):
        out = forward(x, **kwargs)
        return out * float("nan") if trainer.step >= 5 else out  # the 6th step, not logged

    trainer.forward = poisoned
    with pytest.raises(TrainingDiverged, match="between step 5 and step 7") as info:
        trainer.fit()
    assert str(run / "checkpoints" / "step_0000004") in str(info.value)
    assert latest_checkpoint(run).name == "step_0000004"
    assert sorted(losses(run)) == [4]


@needs_torch_2_6_compile
@pytest.mark.slow
def test_compiled_training_with_cuda_graph_mode_matches_eager(tmp_path):
    """train.compile with compile_mode reduce-overhead (CUDA graphs on a GPU; on the CPU torch
    skips the graphs and runs Inductor's code): the same losses as eager training, and a
    checkpointed, resumed compiled run continues them."""
    eager = make(steps=4, checkpoint_every=2)
    Trainer(eager, tmp_path / "eager", resume=None, progress=False).fit()
    compiled = make(steps=4, checkpoint_every=2, compile=True, compile_mode="reduce-overhead")
    trainer = Trainer(compiled, tmp_path / "compiled", resume=None, progress=False)
    trainer.stop_after = 2
    trainer.fit()
    Trainer(compiled, tmp_path / "compiled", resume="auto", progress=False).fit()
    assert_losses_close(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rtol=1e-4)


def test_a_run_or_a_study_inside_a_run_folder_is_refused(run_copy, tmp_path, cli_error):
    """A run's folder holds that run alone: a new run under it, or a study in it, is refused
    before anything is written."""
    recipe = write_recipe(tmp_path / "r.yaml", steps=2)
    err = cli_error("train", str(recipe), "-o", str(run_copy / "nested"), "--no-progress")
    assert "lies inside the folder of the training run" in err
    assert not (run_copy / "nested").exists()
    study = "hybridkit/recipes/studies/lengthgen_quickstart.yaml"
    for out in (run_copy, run_copy / "checkpoints" / "study"):
        err = cli_error("study", study, "-o", str(out), "--device", "cpu")
        assert "is the folder of a training run" in err
    assert not (run_copy / "checkpoints" / "study").exists()


def test_huge_lr_diverges_with_a_clear_message(tmp_path, cli_error):
    recipe = write_recipe(
        tmp_path / "r.yaml", steps=20, lr=1e6, schedule="constant", warmup_steps=0, grad_clip=None
    )
    err = cli_error("train", str(recipe), "-o", str(tmp_path / "run"), "--no-progress")
    assert "training diverged" in err
    assert "last good checkpoint" in err


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    run = tmp_path / "w"
    trainer = Trainer(make(steps=8, checkpoint_every=2), run, resume=None, progress=False)
    trainer.stop_after = 2
    trainer.fit()
    assert latest_checkpoint(run).name == "step_0000002"
    trainer.train_step()
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="weights hold NaN/inf") as info:
        trainer.save_checkpoint()
    assert "step_0000002" in str(info.value)
    assert latest_checkpoint(run).name == "step_0000002"


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    one = Trainer(make(steps=4, checkpoint_every=0), tmp_path / "a", resume=None, progress=False)
    one.fit()
    two = Trainer(
        make(steps=4, checkpoint_every=0, grad_accum=2), tmp_path / "b", resume=None, progress=False
    )
    two.fit()
    assert_losses_close(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=1e-5)


def test_metrics_records(trained_run):
    records = read_metrics(trained_run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    for r in train:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time"} <= r.keys()
        assert r["tokens_per_s"] > 0 and r["step_time"] > 0 and math.isfinite(r["grad_norm"])
    assert [r["lr"] for r in train] == [lr_at(s, make(steps=8).train) for s in range(8)]
    evals = [r for r in records if "eval" in r]
    assert evals and evals[-1]["step"] == 8 and "16" in evals[-1]["eval"]
    final = json.loads((trained_run / "final.json").read_text())
    assert final["step"] == 8 and final["final_eval"][0]["length"] == 16
    assert (trained_run / "recipe.yaml").is_file()
    assert load_recipe(trained_run / "recipe.yaml") == make(steps=8)


# --- data parallel (torchrun, gloo on the CPU) ----------------------------------------------------
def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), *args]
    # faulthandler: a rank that aborts (SIGABRT) prints every thread's Python stack
    env = checkout_env(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


DP_TRAIN = {"steps": 6, "batch_size": 8, "checkpoint_every": 2, "keep_checkpoints": 5}


def test_exit_rank_flushes_and_keeps_the_code():
    """A rank ends without finalizing: what it printed to a pipe (block-buffered) still arrives."""
    code = "from hybridkit.train.distributed import exit_rank; print('done', end=''); exit_rank(3)"
    res = subprocess.run(
        [sys.executable, "-c", code], env=checkout_env(), capture_output=True, text=True
    )
    assert (res.returncode, res.stdout) == (3, "done")


def test_cli_ends_a_torchrun_rank_through_exit_rank(tmp_path, monkeypatch):
    import hybridkit.train.distributed as dist_utils

    ended: list[int] = []
    monkeypatch.setattr(dist_utils, "exit_rank", ended.append)
    recipe = str(write_recipe(tmp_path / "r.yaml"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert main(["show", recipe]) == 0 and ended == []  # one process: a plain return
    monkeypatch.setenv("WORLD_SIZE", "2")
    main(["show", recipe])
    main(["show", str(tmp_path / "missing.yaml")])
    assert ended == [0, 2]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", **DP_TRAIN)
    ddp = tmp_path / "ddp"
    res = torchrun("-m", "hybridkit", "train", str(recipe), "-o", str(ddp), "--no-progress")
    assert "Traceback" not in res.stderr
    single = tmp_path / "single"
    Trainer(make(**DP_TRAIN), single, resume=None, progress=False).fit()
    got, want = losses(ddp), losses(single)  # losses() also fails on a duplicated record
    assert sorted(got) == list(range(1, 7))
    assert_losses_close(got, want, rtol=1e-5)
    # only rank 0 wrote: one record per step, complete checkpoints, no temporary leftovers
    assert len([r for r in read_metrics(ddp) if "loss" in r]) == 6
    names = sorted(p.name for p in (ddp / "checkpoints").iterdir())
    assert names == ["latest", "step_0000002", "step_0000004", "step_0000006"]
    wd, ws = weights(ddp), weights(single)
    assert wd.keys() == ws.keys()
    for k in wd:
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-4, atol=1e-5)


@needs_fsdp_on_cpu
@pytest.mark.slow
def test_fsdp2_two_processes_match_and_resume(tmp_path):
    """FSDP2 (fully_shard) on the CPU with gloo, interrupted after step 3 and resumed."""
    train = {**DP_TRAIN, "parallel": "fsdp"}
    recipe = write_recipe(tmp_path / "r.yaml", **train)
    run = tmp_path / "fsdp"
    worker = str(Path(__file__).parent / "_ddp_worker.py")
    torchrun(worker, str(recipe), str(run), "3")
    assert latest_checkpoint(run).name == "step_0000002" and max(losses(run)) == 3
    res = torchrun(worker, str(recipe), str(run))
    assert res.stdout.count("resumed from") == 1  # rank 0 only
    single = tmp_path / "single"
    Trainer(make(**DP_TRAIN), single, resume=None, progress=False).fit()
    got, want = losses(run), losses(single)
    assert sorted(got) == list(range(1, 7))
    assert_losses_close(got, want, rtol=1e-5)
    # full (unsharded) weights on disk, loadable by eval and by a single-process trainer
    ws, wf = weights(single), weights(run)
    for k in ws:
        torch.testing.assert_close(wf[k], ws[k], rtol=1e-4, atol=1e-5)
    fork = tmp_path / "fork"
    ckpt = run / "checkpoints" / "step_0000004"
    Trainer(make(**DP_TRAIN), fork, resume=str(ckpt), progress=False).fit()
    assert_losses_close(losses(fork), {s: v for s, v in want.items() if s > 4}, rtol=1e-5)
    # and the other way round: FSDP resumes a single-process checkpoint (no lm_head alias)
    other = tmp_path / "from-single"
    shutil.copytree(single / "checkpoints" / "step_0000004", other / "checkpoints" / "step_0000004")
    (other / "checkpoints" / "latest").write_text("step_0000004")
    torchrun(worker, str(recipe), str(other))
    assert_losses_close(losses(other), {s: v for s, v in want.items() if s > 4}, rtol=1e-5)


# --- learning -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_hybrid_learns_mqar(tmp_path):
    """One Mamba-3 + one NoPE attention block, 300 steps: 8 s on an idle 2-core CPU. Seeds 0, 1,
    2 reached tok_acc 0.68 / 0.63 / 0.51 and ex_match 0.42 / 0.32 / 0.14 (chance 1/32, 1/1024)."""
    task = {**MQAR, "eval_examples": 200}
    recipe = make(task, steps=300, batch_size=32, lr=1e-2, checkpoint_every=0, log_every=50)
    out = Trainer(recipe, tmp_path / "mqar", resume=None, progress=False).fit()
    res = out["final_eval"][0]
    chance = 1 / 32  # values are half of the 64 ids
    assert res["tok_acc"] > 10 * chance, res
    assert res["ex_match"] > 0.1, res


@pytest.mark.slow
def test_tiny_mamba3_learns_parity(tmp_path):
    """Two Mamba-3 blocks (no attention), curriculum 2 -> 2..3 -> 2..4 bits, 700 steps: 14 s on an
    idle 2-core CPU; seeds 0, 1, 2 all reach ex_match 1.0 at 4 bits. Without a curriculum the
    same model stays at chance at 3-4 bits within 1000-1500 steps."""
    curriculum = [
        {"steps": 200, "min_len": 2, "max_len": 2},
        {"steps": 200, "min_len": 2, "max_len": 3},
        {"steps": 300, "min_len": 2, "max_len": 4},
    ]
    task = {"kind": "parity", "seq_len": 4, "eval_examples": 100, "curriculum": curriculum}
    recipe = make(
        task, layout="m m", steps=700, batch_size=32, lr=3e-3, checkpoint_every=0, log_every=100
    )
    out = Trainer(recipe, tmp_path / "parity", resume=None, progress=False).fit()
    res = out["final_eval"][0]
    assert res["length"] == 4 and res["ex_match"] > 0.9, res


TINY_RECIPES = sorted((ROOT / "hybridkit" / "recipes").glob("*_tiny.yaml"))


@pytest.mark.parametrize("path", TINY_RECIPES, ids=lambda p: p.stem)
def test_shipped_tiny_task_recipes_train(path, tmp_path):
    overrides = ["train.steps=2", "train.device=cpu", "train.tensorboard=false"]
    recipe = load_recipe(path, [*overrides, "task.eval_examples=8"])
    assert recipe.task is not None
    out = Trainer(recipe, tmp_path / "run", resume=None, progress=False).fit()
    assert out["step"] == 2 and math.isfinite(out["loss"])
    assert (tmp_path / "run" / "final.json").is_file()
    assert (tmp_path / "run" / "model.safetensors").is_file()


# --- eval -----------------------------------------------------------------------------------------
def test_eval_writes_its_files(run_copy, tmp_path, capsys):
    assert main(["eval", str(run_copy), "--lengths", "8,16,32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| 16 (train) |" in out and "wrote eval.json" in out
    payload = json.loads((run_copy / "eval.json").read_text())
    assert [r["length"] for r in payload["results"]] == [8, 16, 32]
    assert payload["task"] == "mqar" and payload["train_length"] == 16
    for r in payload["results"]:
        assert 0 <= r["ex_match"] <= 1 and 0 <= r["tok_acc"] <= 1
        assert r["decode"]["examples"] == 2 and 0 <= r["decode"]["agree_with_forward"] <= 1
    assert "| 32 |" in (run_copy / "eval.md").read_text()
    assert (run_copy / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_copy / "niah_heatmap.png").exists()
    # --out elsewhere; default lengths from the recipe's eval section
    assert main(["eval", str(run_copy), "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert {p.name for p in (tmp_path / "ev").iterdir()} == {"eval.json", "eval.md", "eval.png"}
    results = json.loads((tmp_path / "ev" / "eval.json").read_text())["results"]
    assert [r["length"] for r in results] == [16]
    assert payload["checkpoint_step"] is None and payload["weights"] == "model.safetensors"


def test_eval_of_an_unfinished_run_says_which_checkpoint_it_scored(run_copy, capsys):
    """No model.safetensors yet: the newest checkpoint is evaluated, which was silent and left
    no trace in eval.json."""
    (run_copy / "model.safetensors").unlink()
    assert main(["eval", str(run_copy), "--lengths", "16", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "no model.safetensors" in err and "step_0000008" in err
    payload = json.loads((run_copy / "eval.json").read_text())
    assert payload["checkpoint_step"] == 8
    assert payload["weights"] == "checkpoints/step_0000008/model.safetensors"
    assert "checkpoint step_0000008" in (run_copy / "eval.md").read_text()


def test_eval_errors_are_clear(run_copy, tmp_path, capsys, cli_error):
    for args, text in (
        (["--lengths", "15"], "MQAR length must be even"),
        (["--lengths", "a,b"], "comma-separated positive integers"),
        (["--lengths", "16,,32"], "no empty parts"),
        (["--lengths", "16,16"], "lists a value twice"),
    ):
        assert text in cli_error("eval", str(run_copy), "--device", "cpu", *args)
    assert main(["eval", str(tmp_path), "--device", "cpu"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (run_copy / "model.safetensors").write_bytes(b"garbage")
    assert main(["eval", str(run_copy), "--device", "cpu"]) == 2
    assert "truncated" in capsys.readouterr().err


def test_eval_of_niah_writes_the_depth_heatmap(tmp_path, capsys):
    niah = {
        "kind": "niah",
        "seq_len": 48,
        "num_adjectives": 4,
        "num_nouns": 4,
        "haystack_vocab": 16,
        "value_digits": 2,
        "num_depths": 5,
        "noise_sentence_len": 6,
        "eval_examples": 20,
    }
    recipe = make(niah, steps=2, checkpoint_every=0, batch_size=4)
    assert recipe.model.vocab_size >= 32 + 4 + 4 + 16
    Trainer(recipe, tmp_path / "niah", resume=None, progress=False).fit()
    assert main(["eval", str(tmp_path / "niah"), "--lengths", "48,96", "--device", "cpu"]) == 0
    capsys.readouterr()
    for name in ("eval.json", "eval.md", "eval.png", "niah_heatmap.png"):
        assert (tmp_path / "niah" / name).is_file(), name
    payload = json.loads((tmp_path / "niah" / "eval.json").read_text())
    assert all(len(r["depth_ex_match"]) == 10 for r in payload["results"])


def test_metrics_log_throughput_and_say_why_cpu_has_no_mfu(tmp_path):
    """Each record carries tokens/s and TFLOP/s; MFU needs a datasheet peak, which a CPU lacks."""
    trainer = Trainer(make(steps=2, checkpoint_every=0), tmp_path / "r", progress=False)
    trainer.fit()
    records = [r for r in read_metrics(tmp_path / "r") if "loss" in r]
    assert records
    for record in records:
        assert record["tokens_per_s"] > 0 and record["tflops"] > 0
        assert record["mfu"] is None and "cpu" in record["mfu_note"]


def test_chunked_loss_trains_like_the_full_logits(tmp_path):
    """train.loss_chunk_tokens changes how the loss is computed, not what it is."""
    runs = {}
    for chunk in (None, 7):
        trainer = Trainer(
            make(steps=3, checkpoint_every=0, loss_chunk_tokens=chunk),
            tmp_path / str(chunk),
            progress=False,
        )
        assert trainer.model.loss_chunk_tokens == chunk
        runs[chunk] = [trainer.train_step()["loss"] for _ in range(3)]
    for plain, chunked in zip(runs[None], runs[7], strict=True):
        assert abs(plain - chunked) < 1e-4 * abs(plain)


@pytest.mark.parametrize("value", [0, -3, "big", 1.5, True])
def test_bad_loss_chunk_tokens_names_the_key(value):
    with pytest.raises(RecipeError, match="train.loss_chunk_tokens") as info:
        make(loss_chunk_tokens=value)
    assert "'auto' or null" in str(info.value)


@pytest.mark.parametrize("value", ["maybe", 3, None, 0.5, [True]])
def test_bad_prefetch_names_the_key_and_the_allowed_values(value):
    with pytest.raises(RecipeError, match="train.prefetch") as info:
        make(prefetch=value)
    assert "allowed: true, false or 'auto'" in str(info.value)


def test_loss_chunk_tokens_auto_is_on_for_cuda_only():
    spec = make().train
    assert spec.loss_chunk_tokens == "auto"
    assert spec.resolved_loss_chunk("cuda") == AUTO_LOSS_CHUNK_TOKENS
    assert spec.resolved_loss_chunk("cpu") is None


def test_a_run_folder_takes_one_trainer_at_a_time(tmp_path):
    """Two trainers writing one folder interleaved their metrics and overwrote each other's
    checkpoints (found by a CLI fuzz): the second is refused while the first holds the folder,
    with a message naming it and the holder's pid, and is welcome once the first has finished."""
    from hybridkit.errors import HybridkitError

    run = tmp_path / "run"
    first = Trainer(make(steps=4), run, resume=None, progress=False)
    with pytest.raises(
        HybridkitError, match=rf"{run} is in use: another process \(pid {os.getpid()}\)"
    ):
        Trainer(make(steps=4), run, resume="auto", progress=False)
    first.fit()
    again = Trainer(make(steps=8), run, resume="auto", progress=False)
    assert again.step == 4
    again.fit()
    assert sorted(losses(run)) == list(range(1, 9))
    # a trainer that fails while setting up lets the folder go at once
    (run / "latest").write_text("step_9999999\n")
    with pytest.raises(CheckpointError):
        Trainer(make(steps=8), run, resume="latest", progress=False)
    Trainer(make(steps=8), run, resume=None, progress=False).release()


def test_training_on_the_scored_rows_only_is_the_same_training(tmp_path):
    """MQAR scores a few answers per sequence; with ``scored_rows`` (the default) the trainer
    sends only those rows (and a few unscored ones) through the final norm, head and loss. The
    loss curve and the weights match training over every row up to float32 summation order."""
    from hybridkit.kernels.config import kernel_config

    runs = {}
    for on in (True, False):
        with kernel_config(scored_rows=on):
            Trainer(make(steps=6), tmp_path / str(on), resume=None, progress=False).fit()
        runs[on] = tmp_path / str(on)
    assert_losses_close(losses(runs[True]), losses(runs[False]), rtol=1e-4)
    w_on, w_off = weights(runs[True]), weights(runs[False])
    for name, w in w_on.items():
        assert torch.allclose(w, w_off[name], rtol=1e-3, atol=1e-5), name
