"""Scale-out on the CPU: FSDP2 mixed precision, sharded (DCP) checkpoints that resume on another
world size, and ``hybridkit bench train`` under ``torchrun`` (gloo, 2 processes)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from hybridkit.errors import CheckpointError
from hybridkit.recipe_sections import TrainSpec
from hybridkit.train import distributed as dist_utils
from hybridkit.train.bench import TrainBench
from hybridkit.train.bench_parallel import _combine, parallel_markdown
from hybridkit.train.checkpoint import newest_valid_checkpoint, read_checkpoint
from hybridkit.train.trainer import Trainer
from tests.helpers import needs_fsdp_on_cpu
from tests.test_train import assert_losses_close, losses, make, torchrun, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = str(Path(__file__).parent / "_ddp_worker.py")
SHARDED = {"steps": 6, "batch_size": 8, "checkpoint_every": 2, "keep_checkpoints": 5}


# --- settings -------------------------------------------------------------------------------------
def test_fsdp_param_dtype_follows_the_setting_and_the_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert dist_utils.fsdp_param_dtype("auto", gpu, "auto") is torch.bfloat16
    assert dist_utils.fsdp_param_dtype("auto", gpu, "fp32") is None
    assert dist_utils.fsdp_param_dtype("auto", cpu, "auto") is None  # CPU runs stay fp32
    assert dist_utils.fsdp_param_dtype("bf16", cpu, "auto") is torch.bfloat16
    assert dist_utils.fsdp_param_dtype("fp32", gpu, "bf16") is None
    fully_shard, policy = dist_utils.fsdp_api()
    assert (
        callable(fully_shard) and policy(reduce_dtype=torch.float32).reduce_dtype is torch.float32
    )


def test_mixed_precision_and_checkpoint_format_keys(cli_error):
    with pytest.raises(ValueError, match="contradicts precision fp32"):
        TrainSpec(fsdp_mixed_precision="bf16", precision="fp32")
    assert TrainSpec(parallel="fsdp").resolved_checkpoint_format() == "sharded"
    assert TrainSpec(parallel="ddp").resolved_checkpoint_format() == "full"
    assert TrainSpec(parallel="fsdp", checkpoint_format="full").resolved_checkpoint_format() == (
        "full"
    )
    recipe = "hybridkit/recipes/tiny_hybrid.yaml"
    err = cli_error("show", recipe, "--set", "train.fsdp_mixed_precision=fp16")
    assert "train.fsdp_mixed_precision" in err and "bf16" in err


# --- sharded checkpoints in one process -----------------------------------------------------------
def test_sharded_checkpoint_resumes_exactly_and_damage_is_named(tmp_path):
    sharded = {**SHARDED, "checkpoint_format": "sharded"}
    run = tmp_path / "run"
    Trainer(make(**sharded), run, resume=None, progress=False, stop_after=3).fit()
    ckpt = run / "checkpoints" / "step_0000002"
    state = json.loads((ckpt / "trainer.json").read_text())
    assert state["format"] == "hybridkit-sharded-1" and state["world_size"] == 1
    assert "shards/.metadata" in state["files"] and not (ckpt / "model.safetensors").exists()
    assert not list((run / "checkpoints").glob(".*"))  # no temporary directory left behind
    Trainer(make(**sharded), run, resume="auto", progress=False).fit()
    full = tmp_path / "full"
    Trainer(make(**SHARDED), full, resume=None, progress=False).fit()
    assert_losses_close(losses(run), losses(full), rtol=1e-6)
    # a damaged shard is named, and `auto` falls back to the previous intact checkpoint
    shard = next((run / "checkpoints" / "step_0000006" / "shards").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(shard.parent.parent)
    found = newest_valid_checkpoint(run, warn=False)
    assert found is not None and found[0].name == "step_0000004"


def test_combined_numbers_follow_the_slowest_rank():
    rank0 = TrainBench(
        batch=2, seq_len=8, compiled=False, device="x", step_ms=10.0, tokens_per_s=1600.0,
        tflops=2.0, mfu_datasheet=0.5, mfu_measured=0.4, matmul_tflops=5.0, peak_memory_gb=3.0,
        flops={"per_token": 1.0, "formula": ""},
    )  # fmt: skip
    ranks = [
        {"rank": 0, "step_ms": 10.0, "tokens_per_s": 1600.0, "peak_memory_gb": 3.0},
        {"rank": 1, "step_ms": 20.0, "tokens_per_s": 800.0, "peak_memory_gb": 4.0},
    ]
    job = _combine(rank0, ranks, parallel="fsdp", fsdp_param_dtype="bfloat16")
    assert job.step_ms == 20.0 and job.global_batch == 4 and job.peak_memory_gb == 4.0
    assert job.tokens_per_s_per_gpu == 800.0 and job.tokens_per_s == 1600.0
    assert job.mfu_datasheet == 0.25 and job.tflops == 1.0
    text = parallel_markdown(job, rank0)
    assert "2 ranks, fsdp" in text and "bfloat16" in text and "4.0 GB" in text


# --- torchrun, gloo ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", [pytest.param("fsdp", marks=needs_fsdp_on_cpu), "ddp"])
def test_bench_train_under_torchrun(mode, tmp_path):
    out = tmp_path / "bench"
    res = torchrun(
        "-m", "hybridkit", "bench", "train", "hybridkit/recipes/tiny_hybrid.yaml",
        "--batch", "2", "--seq-len", "32", "--steps", "2", "--warmup", "1", "--no-profile",
        "--out", str(out), "--set", f"train.parallel={mode}",
    )  # fmt: skip
    assert res.stdout.count("# Data-parallel training throughput") == 1  # rank 0 only
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["world_size"] == 2 and data["parallel"] == mode
    assert data["batch"] == 2 and data["global_batch"] == 4 and len(data["per_rank"]) == 2
    assert data["step_ms"] == max(r["step_ms"] for r in data["per_rank"])
    assert data["tokens_per_s"] == pytest.approx(2 * data["tokens_per_s_per_gpu"])
    assert (data["fsdp_param_dtype"] == "float32") == (mode == "fsdp")
    assert out.with_suffix(".md").is_file()


@needs_fsdp_on_cpu
@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_another_world_size(tmp_path):
    """Written by FSDP2 on 2 ranks, resumed in 1 process; written in 1, resumed on 2 ranks: the
    losses after the resume are those of an uninterrupted single-process run."""
    fsdp = {**SHARDED, "parallel": "fsdp"}
    recipe = write_recipe(tmp_path / "r.yaml", **fsdp)
    want = losses(_reference(tmp_path))
    two = tmp_path / "two"
    torchrun(WORKER, str(recipe), str(two), "4")
    state = json.loads((two / "checkpoints" / "step_0000004" / "trainer.json").read_text())
    assert state["format"] == "hybridkit-sharded-1" and state["world_size"] == 2
    Trainer(make(**fsdp), two, resume="auto", progress=False).fit()  # 1 process
    assert_losses_close(losses(two), want, rtol=1e-5)

    one = tmp_path / "one"
    Trainer(make(**fsdp), one, resume=None, progress=False, stop_after=2).fit()
    assert (
        json.loads((one / "checkpoints/step_0000002/trainer.json").read_text())["world_size"] == 1
    )
    res = torchrun(WORKER, str(recipe), str(one))
    assert res.stdout.count("resumed from") == 1
    assert_losses_close(losses(one), want, rtol=1e-5)


@needs_fsdp_on_cpu
@pytest.mark.slow
def test_fsdp2_bf16_parameters_with_activation_checkpointing(tmp_path):
    """bf16 gathered weights (fp32 master weights and reduction) with per-block activation
    checkpointing on 2 gloo ranks: the losses follow the fp32 run within bf16 rounding and are
    not identical to it (the policy is in effect)."""
    train = {
        **SHARDED,
        "parallel": "fsdp",
        "fsdp_mixed_precision": "bf16",
        "activation_checkpointing": True,
    }
    recipe = write_recipe(tmp_path / "r.yaml", **train)
    run = tmp_path / "bf16"
    torchrun("-m", "hybridkit", "train", str(recipe), "-o", str(run), "--no-progress")
    got, want = losses(run), losses(_reference(tmp_path))
    assert_losses_close(got, want, rtol=3e-2)
    assert got != want


def _reference(tmp_path: Path) -> Path:
    """An uninterrupted single-process fp32 run of the same recipe (full checkpoints)."""
    ref = tmp_path / "reference"
    if not ref.exists():
        Trainer(make(**SHARDED), ref, resume=None, progress=False).fit()
    return ref


# --- benchmarks/scale_out.py ----------------------------------------------------------------------
def _scale_out_script(monkeypatch):
    """The script as a module (it is not in a package); registered in ``sys.modules`` for the
    test's duration because dataclasses look their module up there."""
    import importlib.util

    path = Path(__file__).parent.parent / "benchmarks" / "scale_out.py"
    spec = importlib.util.spec_from_file_location("scale_out", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "scale_out", module)
    spec.loader.exec_module(module)
    return module


def test_scale_out_plan_and_report(tmp_path, monkeypatch):
    """The runs that decide the targets come first; efficiency is against the 1-GPU run; the
    report is written from whatever has finished (a skipped run says so)."""
    script = _scale_out_script(monkeypatch)
    assert script.gpu_counts(8) == [1, 2, 4, 8] and script.gpu_counts(3) == [1, 2]
    runs = script.plan([1, 2, 4], {"400M": 4, "1.4B": 2}, ["1.4B", "400M"])
    names = [r.name for r in runs]
    assert names[:5] == [
        "1.4B-single-1gpu", "1.4B-fsdp-4gpu", "400M-single-1gpu", "400M-fsdp-4gpu", "400M-ddp-4gpu"
    ]  # fmt: skip
    assert set(names[5:]) == {"1.4B-fsdp-2gpu", "400M-fsdp-2gpu", "400M-ddp-2gpu"}
    only = script.plan([2], {"400M": 4, "1.4B": 2}, ["400M"])
    assert [r.name for r in only] == ["400M-single-1gpu", "400M-fsdp-2gpu", "400M-ddp-2gpu"]
    args = argparse.Namespace(seq_len=4096, steps=5, warmup=2, compile=False)
    single = script.bench_command(runs[0], args, tmp_path / "r")
    assert "--nproc-per-node" in single and not any("train.parallel" in a for a in single)
    sharded = script.bench_command(runs[1], args, tmp_path / "r")
    assert sharded[-2:] == ["--set", "train.parallel=fsdp"] and "4" in sharded
    ok = {"status": "ok", "tokens_per_s_per_gpu": 0.0, "mfu_datasheet": 0.3, "peak_memory_gb": 9}
    runs[0].record = {**ok, "tokens_per_s": 100.0}
    runs[1].record = {**ok, "tokens_per_s": 360.0}
    runs[2].record = {"status": "skipped (time budget)"}
    reshard = {"status": "ok", "written_on": 4, "resumed_on": 2, "loss_written": 2.0,
               "loss_resumed": 2.0, "rel_diff": 0.0, "tolerance": 1e-3, "passed": True}  # fmt: skip
    script.write(tmp_path, runs, reshard, args)
    data = json.loads((tmp_path / "scale_out.json").read_text())
    assert [r["name"] for r in data["runs"]] == names[:3]
    assert data["runs"][1]["scaling_efficiency"] == pytest.approx(0.9)
    text = (tmp_path / "scale_out.md").read_text()
    assert "90.0%" in text and "skipped (time budget)" in text and "resumed on 2" in text
    assert "within the 1e-03" in text


def test_eval_of_an_unfinished_sharded_run_says_what_to_do(tmp_path, cli_error):
    run = tmp_path / "run"
    recipe = {**SHARDED, "checkpoint_format": "sharded"}
    Trainer(make(**recipe), run, resume=None, progress=False, stop_after=2).fit()
    err = cli_error("eval", str(run), "--device", "cpu")
    assert "sharded checkpoint" in err and "--resume auto" in err


@pytest.mark.slow
def test_ddp_can_write_sharded_checkpoints(tmp_path):
    """train.checkpoint_format: sharded under DDP (every rank holds whole tensors; DCP writes
    each once): resumed in one process, the run continues as if uninterrupted."""
    ddp = {**SHARDED, "parallel": "ddp", "checkpoint_format": "sharded"}
    recipe = write_recipe(tmp_path / "r.yaml", **ddp)
    run = tmp_path / "ddp"
    torchrun(WORKER, str(recipe), str(run), "4")
    state = json.loads((run / "checkpoints" / "step_0000004" / "trainer.json").read_text())
    assert state["format"] == "hybridkit-sharded-1" and state["world_size"] == 2
    Trainer(make(**ddp), run, resume="auto", progress=False).fit()
    assert_losses_close(losses(run), losses(_reference(tmp_path)), rtol=1e-5)
