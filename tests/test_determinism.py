"""``train.deterministic``: what the mode switches, that it is restored, that the kernels see it
(the scan's and FA4's backward included, which autograd runs in another thread on a GPU), that
training under it is the same training, and (``-m gpu``) that two GPU runs agree bitwise."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hybridkit.kernels import config
from hybridkit.recipe import load_recipe
from hybridkit.study import recipe_fingerprint
from hybridkit.train.determinism import CUBLAS_WORKSPACE, deterministic_mode, prepare_process
from hybridkit.train.trainer import Trainer
from tests.helpers import checkout_env
from tests.test_train import make, recipe_dict, weights

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parent.parent


def _inductor_flag() -> bool | None:
    from torch._inductor import config as inductor_config

    return getattr(inductor_config, "deterministic", None)


@pytest.fixture(autouse=True)
def _cublas_env(monkeypatch):
    """The mode sets CUBLAS_WORKSPACE_CONFIG when unset; keep that inside each test. The
    kernel settings are the defaults whatever the shell exports."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    monkeypatch.delenv(config.ENV_VAR, raising=False)


def test_mode_switches_everything_on_and_restores_it():
    """Inside: torch's deterministic algorithms (strict), Inductor without timing, our kernel
    config deterministic (so no timed launch choice, and the scan's backward records that);
    outside, and after an exception, everything as before. Disabled, nothing changes."""
    import torch.utils.deterministic as fill

    from hybridkit.kernels.mamba3.chunkscan.op import backward_settings

    before = (
        torch.are_deterministic_algorithms_enabled(),
        _inductor_flag(),
        fill.fill_uninitialized_memory,
    )
    assert config.current_config().tunes and backward_settings()[3] == 1
    with deterministic_mode(False):
        assert not torch.are_deterministic_algorithms_enabled()
        assert not config.current_config().deterministic
    with pytest.raises(RuntimeError, match="boom"), deterministic_mode(True):
        assert torch.are_deterministic_algorithms_enabled()
        # strict: warn-only would keep SDPA's non-deterministic flash / efficient backward
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        cfg = config.current_config()
        assert cfg.deterministic and cfg.autotune and not cfg.tunes
        assert backward_settings()[3] == 0
        assert not fill.fill_uninitialized_memory
        if before[1] is not None:
            assert _inductor_flag() is True
        raise RuntimeError("boom")
    after = (
        torch.are_deterministic_algorithms_enabled(),
        _inductor_flag(),
        fill.fill_uninitialized_memory,
    )
    assert after == before
    assert not config.current_config().deterministic


def test_mode_keeps_an_outer_setting():
    """A block inside code that already runs deterministically in warn-only mode runs strict and
    leaves the outer mode as it was."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with deterministic_mode(True):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_an_op_without_a_deterministic_implementation_names_the_recipe_key():
    """torch's refusal becomes an error naming train.deterministic and what to set instead;
    other errors pass through untouched."""
    from hybridkit.errors import RecipeError
    from hybridkit.train.determinism import explain

    refusal = RuntimeError(
        "nll_loss2d_forward_out_cuda_template does not have a deterministic implementation, but "
        "you set 'torch.use_deterministic_algorithms(True)'.\nMore text"
    )
    err = explain(refusal)
    assert isinstance(err, RecipeError)
    assert "train.deterministic" in str(err) and "allowed: false" in str(err)
    assert "nll_loss2d_forward_out_cuda_template" in str(err) and "More text" not in str(err)
    assert explain(RuntimeError("CUDA out of memory")) is None
    asserted = explain(AssertionError("bwd deterministic only supported for sm100/sm110 for now"))
    assert isinstance(asserted, RecipeError) and "sm100" in str(asserted)


def test_cublas_workspace_is_set_only_when_asked_and_unset(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    prepare_process(False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    prepare_process(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    prepare_process(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_kernel_setting_parses_from_the_environment(monkeypatch):
    monkeypatch.setenv(config.ENV_VAR, "deterministic=1")
    assert config.current_config().deterministic and not config.current_config().tunes
    monkeypatch.setenv(config.ENV_VAR, "deterministic=yes")
    with pytest.raises(ValueError, match=r"HYBRIDKIT_KERNELS=.*deterministic: 'yes': allowed 0"):
        config.current_config()


def test_tuned_kernels_launch_their_default_without_timing(monkeypatch):
    """Deterministic: the default candidate, no timing run and nothing cached (the choice of
    a timed run depends on what else the GPU does, and candidates reduce in other orders)."""
    from hybridkit.kernels.mamba3.chunkscan import launch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    launched: list[dict] = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append(kw)

    def no_timing(fn):
        raise AssertionError("timed a candidate in deterministic mode")

    monkeypatch.setattr(launch, "_median_ms", no_timing)
    tuned = launch.TunedKernel(FakeKernel(), ["C"], (4, 8, (4, 168)), default=(4, 168))
    with config.kernel_config(autotune=True, deterministic=True):
        tuned[(1,)](torch.zeros(1), C=16)
    assert launched == [{"num_warps": 4, "num_stages": 1, "maxnreg": 168, "C": 16}]
    assert tuned.best == {}


class _Calls(TorchDispatchMode):
    """Records the arguments of every call of one op."""

    def __init__(self, name: str):
        super().__init__()
        self.name, self.calls = name, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.name().startswith(self.name):
            self.calls.append((args, kwargs))
        return func(*args, **kwargs)


@pytest.mark.parametrize("deterministic", [False, True])
def test_fa4_backward_gets_the_setting_of_its_forward(deterministic):
    """The forward runs inside the mode and the backward outside it (as on a GPU, where
    autograd's backward thread does not see the block): FA4's backward op still receives the
    forward's setting. CPU: the op's emulation, through the registered autograd formula."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 16, requires_grad=True) for _ in range(3))
    with deterministic_mode(deterministic):
        out, _ = torch.ops.hybridkit.fa4_fwd(q, k, v, None, None, 0.25, True, None, True)
    calls = _Calls("hybridkit::fa4_bwd")
    with calls:
        out.square().sum().backward()
    assert len(calls.calls) == 1
    args, kwargs = calls.calls[0]
    assert kwargs.get("deterministic", args[11] if len(args) > 11 else False) is deterministic
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_fa4_eager_function_records_the_setting_too(monkeypatch):
    """The eager path (``FA4Function``, what an uncompiled model runs) also hands its forward's
    setting to the backward that runs outside the mode. The FA4 entry points are replaced by the
    op's CPU emulation."""
    from hybridkit.kernels.attention import fa4

    seen = []

    def backward(*args):
        seen.append(args[-1])
        return torch.ops.hybridkit.fa4_bwd(*args)

    monkeypatch.setattr(fa4, "fa4_forward", lambda *a: torch.ops.hybridkit.fa4_fwd(*a))
    monkeypatch.setattr(fa4, "fa4_backward", backward)
    q, k, v = (torch.randn(1, 8, 2, 16, requires_grad=True) for _ in range(3))
    with deterministic_mode(True):
        out = fa4.FA4Function.apply(q, k, v, None, None, 0.25, True, None)
    out.square().sum().backward()
    assert seen == [True] and q.grad is not None


def test_fa4_backward_op_accepts_the_flag():
    """Schema and fake impl take ``deterministic`` (opcheck: fake vs real, autograd wiring)."""
    torch.manual_seed(1)
    q = torch.randn(1, 8, 4, 16)
    k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)  # GQA: 4 query heads on 2
    out, lse = torch.ops.hybridkit.fa4_fwd(q, k, v, None, None, 0.25, True, None, True)
    dout = torch.randn_like(out)
    args = (dout, q, k, v, out, lse, None, None, 0.25, True, None, True)
    torch.library.opcheck(torch.ops.hybridkit.fa4_bwd.default, args)
    det = torch.ops.hybridkit.fa4_bwd(*args)
    plain = torch.ops.hybridkit.fa4_bwd(*args[:-1])
    assert all(torch.equal(a, b) for a, b in zip(det, plain, strict=True))


def test_training_under_the_mode_is_the_same_training(tmp_path):
    """On the CPU every kernel is deterministic already: the mode must not change a bit of the
    run. During its steps torch's flag is on, not during the evaluation; afterwards the process
    is as before. A study counts the key as operational (a finished run stays finished when it
    is switched on)."""
    seen: list[bool] = []
    plain, det = make(steps=6, checkpoint_every=3), make(steps=6, checkpoint_every=3)
    det.train.deterministic = True
    Trainer(plain, tmp_path / "a", resume=None, progress=False).fit()
    trainer = Trainer(det, tmp_path / "b", resume=None, progress=False)
    trainer.model.register_forward_hook(
        lambda *_: seen.append(torch.are_deterministic_algorithms_enabled())
    )
    trainer.fit()
    assert seen[:6] == [True] * 6  # the six training steps; the evaluation after them is not
    assert seen[6:] and not any(seen[6:])  # in torch's strict mode (see the test below)
    assert not torch.are_deterministic_algorithms_enabled()
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert recipe_fingerprint(plain) == recipe_fingerprint(det)


def test_evaluation_fixes_the_launches_only():
    """An evaluation runs our kernels without timed choices but outside torch's strict mode (a
    forward has no atomics to order; an op without a deterministic backward must not stop it)."""
    from hybridkit.train.determinism import deterministic_kernels

    with deterministic_kernels(True):
        assert config.current_config().deterministic
        assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(False):
        assert not config.current_config().deterministic


def test_a_bad_value_names_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    recipe = recipe_dict(steps=2)
    recipe["train"]["deterministic"] = "sometimes"
    path.write_text(json.dumps(recipe))
    with pytest.raises(Exception, match=r"train\.deterministic"):
        load_recipe(path)


# --- on the GPU ---------------------------------------------------------------------------------
_TRAIN = """
import hashlib, sys
from pathlib import Path
from hybridkit.rundir import load_source
from hybridkit.train.trainer import Trainer
recipe, _ = load_source(sys.argv[1], sys.argv[4:])
stop = int(sys.argv[3]) or None
Trainer(recipe, sys.argv[2], resume="auto", progress=False, stop_after=stop).fit()
"""


def _train(recipe: Path, out: Path, overrides: list[str], stop_after: int = 0) -> str:
    """Train in a fresh process (nothing cached in-process: Inductor's and our launch choices
    are made again); returns a hash of the final weights ("" while the run is unfinished)."""
    cmd = [sys.executable, "-c", _TRAIN, str(recipe), str(out), str(stop_after), *overrides]
    subprocess.run(cmd, check=True, env=checkout_env(), cwd=ROOT, timeout=900)
    final = out / "model.safetensors"
    return hashlib.sha256(final.read_bytes()).hexdigest() if final.is_file() else ""


def test_two_cpu_runs_in_fresh_processes_agree(tmp_path):
    """The GPU test's procedure on the CPU (MQAR tiny, deterministic): two fresh processes
    give the same weights, and a run stopped between checkpoints and resumed in a third process
    ends on them too. Checks the procedure itself, so a GPU call is not spent on its bugs."""
    recipe = ROOT / "hybridkit" / "recipes" / "mqar_tiny.yaml"
    common = [
        "train.steps=8",
        "train.checkpoint_every=4",
        "train.warmup_steps=1",
        "train.batch_size=4",
        "train.device=cpu",
        "train.deterministic=true",
        "task.eval_examples=8",
    ]
    first = _train(recipe, tmp_path / "a", common)
    assert first and _train(recipe, tmp_path / "b", common) == first
    assert _train(recipe, tmp_path / "c", common, stop_after=6) == ""
    assert _train(recipe, tmp_path / "c", common) == first


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_gpu_runs_are_bitwise_identical(tmp_path, compiled):
    """The NIAH study's hybrid (Triton scan, FA4 where installed, bf16), 60 steps, twice in
    fresh processes with ``train.deterministic``: the same weights, bit for bit; and (eager) a
    run stopped after step 45 (newest checkpoint 30) and resumed in another process ends on
    those weights too."""
    recipe = ROOT / "hybridkit" / "recipes" / "niah_m.yaml"
    common = [
        "train.steps=60",
        "train.checkpoint_every=30",
        "train.warmup_steps=6",
        "task.eval_examples=64",
        "train.deterministic=true",
        f"train.compile={str(compiled).lower()}",
        "model.blocks.m.mixer.outproj_norm=grouped_pregate",
    ]
    first = _train(recipe, tmp_path / "a", common)
    assert _train(recipe, tmp_path / "b", common) == first
    if compiled:
        return  # the resume check below runs eager only: each compiled process compiles anew
    assert _train(recipe, tmp_path / "c", common, stop_after=45) == ""
    assert _train(recipe, tmp_path / "c", common) == first


def test_the_trainer_reports_a_refused_op_as_a_recipe_error(tmp_path, monkeypatch):
    from hybridkit.errors import RecipeError

    recipe = make(steps=2)
    recipe.train.deterministic = True
    trainer = Trainer(recipe, tmp_path / "r", resume=None, progress=False)

    def refuse(*args, **kwargs):
        raise RuntimeError("some_op_cuda does not have a deterministic implementation, but ...")

    monkeypatch.setattr(trainer, "forward", refuse)
    with pytest.raises(RecipeError, match=r"train\.deterministic.*some_op_cuda"):
        trainer.fit()
    assert not torch.are_deterministic_algorithms_enabled()
