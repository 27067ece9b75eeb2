"""The scan chunk kernels' L2 prefetch (kernel settings ``scan_prefetch`` /
``scan_prefetch_ahead``, ``hybridkit/kernels/mamba3/chunkscan/prefetch.py``).

A prefetch only moves lines into L2, so the GPU tests require results bitwise equal to those
without it (and the float64 reference's tolerances on the grid cases). On the CPU: the setting
parses and is range-checked, the interpreter runs with it off, and the kernels compiled for
sm_90 issue their prefetches before any global load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridkit.kernels import config  # noqa: E402
from hybridkit.kernels.config import kernel_config  # noqa: E402
from tests import test_triton_mimo  # noqa: E402
from tests.test_triton_siso import Case, _inputs, check_gpu_case  # noqa: E402


def test_setting_parses_and_is_checked():
    cfg = config.parse_env("scan_prefetch=1,scan_prefetch_ahead=264")
    assert cfg.scan_prefetch and cfg.scan_prefetch_ahead == 264
    assert config.changed_settings(cfg) == "scan_prefetch=1,scan_prefetch_ahead=264"
    with pytest.raises(ValueError, match="scan_prefetch_ahead=-1: allowed 0"):
        config.KernelConfig(scan_prefetch_ahead=-1)
    with pytest.raises(ValueError, match="scan_prefetch=.*True or False"):
        config.KernelConfig(scan_prefetch=1)


@pytest.mark.triton
def test_interpreter_runs_without_it():
    from hybridkit.kernels.mamba3.chunkscan.launch import prefetch_args

    with kernel_config(scan_prefetch=True, scan_prefetch_ahead=5):
        args = prefetch_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert args == {"PREFETCH": False, "AHEAD": 5}
    else:
        assert args == {"PREFETCH": True, "AHEAD": 5}


_COMPILE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "benchmarks")
    import siso_sm90_report as report
    for rank in (1, 4):
        report.FLAGS.update(R=rank, HALVES=rank > 1, C=64 // rank)
        for prefetch in (True, False):
            report.FLAGS.update(PREFETCH=prefetch)
            for name in ("_fwd_out", "_bwd_q", "_bwd_k", "_bwd_x"):
                lines = report.compile_kernel(name, 4).asm["ptx"].splitlines()
                pf = [i for i, t in enumerate(lines) if "prefetch.global.L2" in t]
                ld = [i for i, t in enumerate(lines) if "ld.global" in t]
                print(name, rank, prefetch, len(pf), min(pf, default=-1), min(ld))
    """
)


@pytest.mark.triton
@pytest.mark.slow
def test_ptx_prefetches_before_its_first_load():
    """Compiled for sm_90 (a fresh process: the suite's interpreter cannot compile): with
    ``PREFETCH`` each kernel issues its prefetches before its first global load, SISO and MIMO
    rank 4; without it, none."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=900
    )
    if run.returncode and "No module named 'triton.backends.nvidia" in run.stderr:
        pytest.skip("this Triton has no NVIDIA backend")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    assert len(rows) == 16
    for name, rank, prefetch, count, first_pf, first_ld in rows:
        if prefetch == "True":
            assert int(count) > 0 and int(first_pf) < int(first_ld), (name, rank)
        else:
            assert count == "0", (name, rank)


# ----------------------------------------------------------------------------- GPU
def _outputs_and_grads(c: Case, **settings) -> list[torch.Tensor]:
    from hybridkit.kernels.mamba3.chunkscan import mamba3_scan_triton

    inp = _inputs(c, torch.bfloat16, "cuda", seed=3)
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items() if v is not None}
    cu = torch.tensor(c.cu, device="cuda") if c.cu else None
    torch.full((64 << 20,), float("nan"), device="cuda")  # poison the allocator's blocks
    with kernel_config(autotune=False, **settings):
        y, fs = mamba3_scan_triton(
            **{k: leaves.get(k) for k in inp}, cu_seqlens=cu, chunk_size=c.C, fast=True,
            pairing=c.pairing,
        )  # fmt: skip
        g = torch.Generator(device="cuda").manual_seed(11)
        (y.float() * torch.randn(y.shape, generator=g, device="cuda")).sum().backward()
    return [y.detach(), *(t.detach() for t in fs), *(leaves[k].grad for k in sorted(leaves))]


_BITWISE = {
    "siso": Case(B=2, L=1000, H=8, N=128, P=64, S=32, C=64),
    "siso_varlen": Case(B=1, L=1500, H=4, G=2, N=64, P=64, S=16, C=64, cu=(0, 700, 701, 1500)),
    "mimo_r4": Case(B=2, L=777, R=4, H=8, N=128, P=64, S=32, C=16, halves=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("ahead", [0, 264])
@pytest.mark.parametrize("name", list(_BITWISE))
def test_prefetch_changes_no_bit(name: str, ahead: int):
    c = _BITWISE[name]
    plain = _outputs_and_grads(c)
    fetched = _outputs_and_grads(c, scan_prefetch=True, scan_prefetch_ahead=ahead)
    for a, b in zip(plain, fetched, strict=True):
        assert torch.equal(a, b)


GPU_CASES = test_triton_mimo.grid_cases(
    ("n128_p64_init", "varlen_n64_p64", "len1", "bf16_n128_p64_init", "bf16_n64_p64_c64"),
    ("r4_n128_p64_init", "r4_varlen", "bf16_r4_n128_p64_init", "bf16_r8_n64_p64"),
)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_prefetch_matches_the_reference_gpu(name: str):
    case, prec = GPU_CASES[name]
    with kernel_config(scan_prefetch=True, scan_prefetch_ahead=264):
        check_gpu_case(case, prec)
