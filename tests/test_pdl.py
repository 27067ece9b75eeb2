"""Programmatic dependent launch of the decode kernels (``hybridkit/kernels/pdl.py``).

CPU: the setting parses and never applies off a Hopper GPU or in the interpreter; every decode
kernel compiled for sm_90 with ``USE_PDL`` keeps PDL's safety rule in its PTX (no global store
and no global load but the weights' before ``griddepcontrol.wait``; the linears prefetch their
weights there). GPU (``-m gpu``): greedy tokens and every step's logits with PDL equal those
without, through the CUDA graph.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridkit.kernels import config, pdl

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_setting_parses_and_stays_off_where_it_cannot_run(monkeypatch):
    assert not config.parse_env("pdl=0").pdl and config.KernelConfig().pdl  # on by default
    x = torch.zeros(2)
    with config.kernel_config(pdl=True):
        assert not pdl.use_pdl(x)  # a CPU tensor
    assert pdl.unavailable(torch.device("cpu")) == "not a CUDA device"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "interpreter" in pdl.unavailable(torch.device("cuda"))
    assert pdl.launch_options(False) == {} and pdl.launch_options(True) == {"launch_pdl": True}


@pytest.mark.triton
def test_show_and_benchmarks_name_the_setting(monkeypatch):
    """``hybridkit show``'s decode-linears row says when PDL is on; the decode benchmarks
    record the non-default kernel settings they ran with."""
    from hybridkit.kernels.linear import describe_decode

    monkeypatch.delenv(config.ENV_VAR, raising=False)
    assert config.changed_settings() == "defaults"
    assert "with PDL" in describe_decode("cuda", torch.bfloat16)
    with config.kernel_config(pdl=False, chunk_sizes=(32, 64)):
        assert "with PDL" not in describe_decode("cuda", torch.bfloat16)
        assert config.changed_settings() == "chunk_sizes=32:64,pdl=0"
    with config.kernel_config(skinny_linear=False, attention_step=False):
        assert config.changed_settings() == "skinny_linear=0,attention_step=0"
    monkeypatch.setenv(config.ENV_VAR, "pdl=0,bwd_warps=8")
    assert config.changed_settings() == "bwd_warps=8,pdl=0"


@pytest.mark.triton
def test_ptx_waits_before_every_store_and_activation_load():
    """Every decode kernel compiled for sm_90 (no GPU needed; a fresh process, since the suite's
    interpreter cannot compile): with ``USE_PDL`` it triggers its successor and waits, and before
    the wait stores nothing and reads only weights (``benchmarks/decode_sm90_report.py``'s
    ``violations``); without it, no PDL instruction."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(BENCH / "decode_sm90_report.py"), "--check"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    if run.returncode and "No module named 'triton.backends.nvidia" in run.stderr:
        pytest.skip("this Triton has no NVIDIA backend")
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.count("pdl=1") == run.stdout.count("pdl=0") >= 8
    assert "VIOLATION" not in run.stdout


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_pdl_decode_equals_decode_without_through_the_graph():
    """The 5-kind tiny model in bf16 with the few-row linears and the fused add + norm: 512
    greedy tokens through the CUDA graph with PDL equal those without, and each static step's
    logits are bitwise the same (PDL moves no arithmetic, only when kernels start)."""
    _pdl_against_none(batch=4)


@pytest.mark.gpu
def test_pdl_decode_at_batch_one_with_whole_tile_loads(monkeypatch):
    """Batch 1, where the linears run the one-row kernel: under PDL it loads whole weight
    tiles before the wait (``GEMV_PRELOAD`` 1), which sums K in another order than the
    pipelined loop, so both runs load whole tiles here (``GEMV_PRELOAD`` 2) and PDL must again
    change nothing, bitwise."""
    from hybridkit.kernels.linear import triton_kernels
    from tests.helpers import set_launch

    set_launch(monkeypatch, triton_kernels, {"GEMV_PRELOAD": 2})
    _pdl_against_none(batch=1)


@pytest.mark.gpu
def test_pdl_decode_with_the_finish_kernel_in_the_chain(monkeypatch):
    """``FINISH_PDL`` 1: the split Mamba-3 step's finish kernel launches with PDL as well; PDL
    must still change nothing, bitwise (batch 4, as the first test)."""
    from hybridkit.kernels.mamba3.step import triton_step
    from tests.helpers import set_launch

    set_launch(monkeypatch, triton_step, {"FINISH_PDL": 1})
    _pdl_against_none(batch=4)


def _pdl_against_none(batch: int) -> None:
    """Greedy tokens and static-step logits of the tiny bf16 model with and without PDL, equal
    bitwise (skips where PDL cannot run)."""
    from hybridkit.generation import Sampling, generate
    from tests.test_generation import _model

    reason = pdl.unavailable(torch.device("cuda"))
    if reason:
        pytest.skip(reason)

    model = _model(dtype=torch.bfloat16, device="cuda", layout="s a m w r")
    ids = torch.randint(0, 64, (batch, 16), device="cuda")
    runs, logits = {}, {}
    for on in (False, True):
        with config.kernel_config(skinny_linear=True, fused_add_norm=True, pdl=on):
            runs[on] = generate(model, ids, 512, sampling=Sampling(temperature=0), use_graph=True)
            with torch.no_grad():
                cache = model.allocate_cache(batch, 64)
                model(ids, cache=cache)
                cache.make_static(torch.zeros(1, dtype=torch.long, device="cuda"))
                steps = [model.step(runs[False][:, t], cache) for t in range(16, 48)]
                logits[on] = torch.stack(steps)
    assert torch.equal(runs[True], runs[False])
    assert torch.equal(logits[True], logits[False])
