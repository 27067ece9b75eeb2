"""The ``qk_heads`` setting: the scan backward's q and k kernels sum dq / dk over several heads
of a group in one program (an fp32 slot per ``HS`` heads) instead of writing every head's rows
for torch to sum.

Each case runs the Triton scan's forward and backward under the setting and compares every
gradient with the float64 sequential reference (``tests/test_triton_siso.check``): through the
interpreter at tiny shapes on the CPU, and with ``-m gpu`` at the grids' shapes in fp32 and bf16.
The slot buffers are poisoned with NaN first (where the scan does not zero them itself), so a
program that reads a slot before its first head wrote it fails; and the slot count is checked,
so a case cannot pass by quietly running one head per program.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridkit.kernels.config import kernel_config  # noqa: E402
from hybridkit.kernels.mamba3.chunkscan import op as scan_op  # noqa: E402
from tests import test_triton_mimo  # noqa: E402
from tests.helpers import slow_params  # noqa: E402
from tests.test_triton_siso import Case, check, check_gpu_case  # noqa: E402


def spy_slots(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Poison the dq / dk slot buffers and the per-chunk partial sums each backward makes
    (unless packed: tokens outside every sequence must stay zero there) and record the slot
    counts."""
    slots: list[int] = []
    real = scan_op._grad_buffers

    def poisoned(x, plan, dsend, fast, hs):
        g = real(x, plan, dsend, fast, hs)
        if not plan.varlen and plan.nchunks > 0:  # every chunk writes its partial sums
            for t in (g.dq_bias_part, g.dk_bias_part, g.dD_part, g.dq_heads, g.dk_heads):
                t.fill_(float("nan"))
        slots.append(g.dq_heads.shape[3])
        return g

    monkeypatch.setattr(scan_op, "_grad_buffers", poisoned)
    return slots


# (case, qk_heads, slots expected: H / gcd(qk_heads, H / G))
CPU_CASES = {
    "siso_h4_all": (Case(H=4, L=37), 4, 1),
    "siso_h4_pairs": (Case(H=4, L=37, init=True), 2, 2),
    "siso_grouped": (Case(H=4, G=2, L=21, init=True), 4, 2),  # gcd(4, 2) = 2 heads a program
    "siso_varlen": (Case(B=1, L=30, H=4, G=1, init=True, cu=(0, 7, 7, 30)), 4, 1),
    "mimo_r4": (Case(R=4, C=4, H=4, G=1, L=19, halves=True, init=True), 4, 1),
    "mimo_r2_grouped_varlen": (
        Case(B=1, L=30, R=2, C=8, H=4, G=2, halves=True, init=True, cu=(0, 7, 7, 30)),
        2,
        2,
    ),
    "mimo_r2_no_rotation": (Case(R=2, C=8, H=4, L=17, angles=False, halves=True), 4, 1),
}


@pytest.mark.triton
@pytest.mark.parametrize("name", slow_params(CPU_CASES, {"mimo_r4", "siso_h4_all"}))
def test_heads_summed_in_the_kernels_match_the_reference_cpu(name: str, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU runs the gpu-marked cases")
    case, qk_heads, slots = CPU_CASES[name]
    seen = spy_slots(monkeypatch)
    with kernel_config(qk_heads=qk_heads):
        check(case, torch.float32, "cpu", fast=False, tol_f=1e-5, tol_b=1e-5)
    assert seen == [slots]


@pytest.mark.triton
def test_one_head_per_program_keeps_the_per_head_bf16_rows(monkeypatch):
    """The default writes one row per head (bf16 in fast mode): the setting changes nothing
    until it is asked for."""
    from hybridkit.kernels.mamba3.chunkscan.launch import qk_heads_per_program

    assert qk_heads_per_program(8) == 1
    with kernel_config(qk_heads=16):
        assert [qk_heads_per_program(n) for n in (1, 6, 8, 32)] == [1, 2, 8, 16]
    seen = spy_slots(monkeypatch)
    if not torch.cuda.is_available():
        check(Case(H=4, L=20), torch.float32, "cpu", fast=False, tol_f=1e-5, tol_b=1e-5)
        assert seen == [4]


# grid cases of the SISO and MIMO GPU tests (fp32 and bf16, grouped, packed, length 1)
GPU_CASES = test_triton_mimo.grid_cases(
    ("n128_p64_init", "n64_p32_g2_split", "varlen_n64_p64", "len1", "bf16_n128_p64_init",
     "bf16_n64_p64_c64"),
    ("r4_n128_p64_init", "r2_n64_p32_g2", "r4_varlen", "bf16_r4_n128_p64_init", "bf16_r8_n64_p64"),
)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("qk_heads", [2, 4])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_heads_summed_in_the_kernels_match_the_reference_gpu(name: str, qk_heads: int, monkeypatch):
    case, prec = GPU_CASES[name]
    seen = spy_slots(monkeypatch)
    with kernel_config(qk_heads=qk_heads):
        check_gpu_case(case, prec)
    assert seen == [case.H // min(qk_heads, case.H // case.G)]
