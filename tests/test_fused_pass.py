"""The ``fused_pass`` and ``fused_bwd_pass`` settings: the scan forward's state kernel and pass
as one launch (``_fwd_state_pass_kernel``), and the backward's (``_bwd_dstate_pass_kernel``).

Each case runs the Triton scan's forward and backward under both settings against the float64
sequential reference (``tests/test_triton_siso.check``: the output, the final state and every
gradient, the backward reading the start states the fused forward wrote and the later backward
kernels reading the gates, angles and end-state gradients the fused backward wrote), through
the interpreter at tiny shapes on the CPU and with ``-m gpu`` at the grids' shapes. A spy
checks that the fused kernels ran and the two-launch paths did not; the forward op's four
outputs (y, total angle, end state, every chunk's start state) and the backward op's gradients
are compared with the two-launch paths'.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridkit.kernels.config import kernel_config  # noqa: E402
from hybridkit.kernels.mamba3.chunkscan import backward as bwd_kernels  # noqa: E402
from hybridkit.kernels.mamba3.chunkscan import forward as fwd_kernels  # noqa: E402
from hybridkit.kernels.mamba3.chunkscan import op as scan_op  # noqa: E402
from tests import test_triton_mimo  # noqa: E402
from tests.helpers import slow_params  # noqa: E402
from tests.test_triton_siso import Case, _inputs, check, check_gpu_case  # noqa: E402

FUSED = dict(fused_pass=True, fused_bwd_pass=True)


def spy_launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record which state kernels launch: the fused ones, or ``_fwd_state`` / ``_bwd_dstate``."""
    seen: list[str] = []

    class Recorded:
        def __init__(self, name, real):
            self.name, self.real = name, real

        def __getitem__(self, grid):
            seen.append(self.name)
            return self.real[grid]

    fused = fwd_kernels._fwd_state_pass_kernel
    monkeypatch.setattr(fwd_kernels, "_fwd_state_pass_kernel", Recorded("fused", fused))
    monkeypatch.setattr(scan_op, "FWD_STATE", Recorded("state", scan_op.FWD_STATE))
    fused_bwd = bwd_kernels._bwd_dstate_pass_kernel
    monkeypatch.setattr(bwd_kernels, "_bwd_dstate_pass_kernel", Recorded("fused_bwd", fused_bwd))
    monkeypatch.setattr(scan_op, "BWD_DSTATE", Recorded("dstate", scan_op.BWD_DSTATE))
    return seen


CPU_CASES = {
    "siso": Case(L=37, init=True),
    "siso_all_rotate_no_trap": Case(L=21, S=8, trap=False),
    "siso_no_rotation": Case(L=17, angles=False),
    "siso_grouped_varlen": Case(B=1, L=30, H=4, G=2, init=True, cu=(0, 7, 7, 30)),
    "siso_one_chunk": Case(L=9, init=True),
    "mimo_r4": Case(R=4, C=4, H=4, G=1, L=19, halves=True, init=True),
    "mimo_r2_grouped_varlen": Case(
        B=1, L=30, R=2, C=8, H=4, G=2, halves=True, init=True, cu=(0, 7, 7, 30)
    ),
}


@pytest.mark.parametrize("name", slow_params(CPU_CASES, {"siso", "mimo_r4"}))
def test_fused_state_pass_matches_the_reference_cpu(name: str, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU runs the gpu-marked cases")
    seen = spy_launches(monkeypatch)
    with kernel_config(**FUSED):
        check(CPU_CASES[name], torch.float32, "cpu", fast=False, tol_f=1e-5, tol_b=1e-5)
    assert seen == ["fused", "fused_bwd"]


@pytest.mark.parametrize("rank", [1, 4])
def test_fused_forward_outputs_equal_the_two_launches(rank: int):
    """y, the total angle, the end state and every chunk's start state, fused and not."""
    c = Case(L=40, H=2, init=True, R=rank, C=16 // rank, halves=rank > 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = _inputs(c, torch.float32, dev, 5)
    init = torch.randn(c.B, c.H, c.P, c.N, device=dev)
    names = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "mimo_x")
    args = (*[inp.get(k) for k in names], init, None, c.C, False, c.halves)
    two = torch.ops.hybridkit.mamba3_scan_fwd(*args)
    with kernel_config(fused_pass=True):
        one = torch.ops.hybridkit.mamba3_scan_fwd(*args)
    for a, b, what in zip(two, one, ("y", "total angle", "end state", "chunk states"), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("rank", [1, 4])
def test_fused_backward_gradients_equal_the_two_launches(rank: int):
    """Every gradient the backward op returns, fused state + pass and not (the same forward)."""
    c = Case(L=40, H=2, init=True, R=rank, C=16 // rank, halves=rank > 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = _inputs(c, torch.float32, dev, 6)
    init = torch.randn(c.B, c.H, c.P, c.N, device=dev)
    names = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "mimo_x")
    xs = [inp.get(k) for k in names]
    y, _tot, end, states = torch.ops.hybridkit.mamba3_scan_fwd(
        *xs, init, None, c.C, False, c.halves
    )
    dy, dend = torch.randn_like(y), torch.randn_like(end)
    grads = []
    for fused in (False, True):
        with kernel_config(fused_bwd_pass=fused):
            settings = scan_op.backward_settings()
            grads.append(
                torch.ops.hybridkit.mamba3_scan_bwd(
                    dy, None, dend, *xs, init, None, states, c.C, False, c.halves, settings
                )
            )
    assert len(grads[0]) == 12
    for i, (a, b) in enumerate(zip(*grads, strict=True)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"gradient {i}")


GPU_CASES = test_triton_mimo.grid_cases(
    ("n128_p64_init", "n64_p32_g2_split", "varlen_n64_p64", "len1", "bf16_n128_p64_init",
     "bf16_n64_p64_c64"),
    ("r4_n128_p64_init", "r4_varlen", "bf16_r4_n128_p64_init", "bf16_r8_n64_p64",
     "bf16_r4_full_rotation"),
)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_fused_state_pass_matches_the_reference_gpu(name: str, monkeypatch):
    case, prec = GPU_CASES[name]
    seen = spy_launches(monkeypatch)
    with kernel_config(**FUSED):
        check_gpu_case(case, prec)
    assert seen == ["fused", "fused_bwd"]
