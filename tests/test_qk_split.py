"""The ``qk_split`` setting: the scan backward's q and k kernels run several programs per
(chunk, head), each owning a part of the rotation pairs (its columns of q, k, the states and
dq / dk), and write their per-row sums over N (d cs, d u) to per-part slots that the x kernel
adds.

Each case runs the Triton scan's forward and backward under the setting and compares every
gradient with the float64 sequential reference (``tests/test_triton_siso.check``): through the
interpreter at tiny shapes on the CPU (parts of 4 pairs), and with ``-m gpu`` at the grids'
shapes in fp32 and bf16 (parts of at least 16 pairs). The part slots are poisoned with NaN
first, so an x kernel that adds a slot no part wrote fails; the part count each backward used is
recorded, so a case cannot pass by quietly running unsplit. The cases put the rotated pairs in
the first part only, across parts, and in every part (all pairs rotate).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridkit.kernels.config import kernel_config  # noqa: E402
from hybridkit.kernels.mamba3.chunked import mamba3_scan_chunked  # noqa: E402
from hybridkit.kernels.mamba3.chunkscan import launch  # noqa: E402
from hybridkit.kernels.mamba3.chunkscan import op as scan_op  # noqa: E402
from hybridkit.kernels.mamba3.reference import mamba3_scan_sequential  # noqa: E402
from tests import test_triton_mimo, test_triton_siso  # noqa: E402
from tests.helpers import slow_params  # noqa: E402
from tests.test_triton_siso import Case, check  # noqa: E402


def spy_parts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the part count of each backward, and poison the per-part slot buffers."""
    parts: list[int] = []
    real = scan_op._part_slots

    def poisoned(z, n, dev):
        parts.append(n)
        slots = real(z, n, dev)
        for t in slots:
            t.fill_(float("nan"))
        return slots

    monkeypatch.setattr(scan_op, "_part_slots", poisoned)
    return parts


# (case, qk_split, parts expected). N 16: 8 pairs, S 3 rotate (all in the first part of 4);
# N 32: 16 pairs, S 5 rotate (parts of 4: the fifth in the second part); S = N / 2: all rotate.
CPU_CASES = {
    "siso_2": (Case(L=37, init=True), 2, 2),
    "siso_4_across": (Case(L=21, N=32, S=5), 4, 4),
    "siso_2_all_rotate": (Case(L=19, S=8, init=True), 2, 2),
    "siso_grouped_varlen": (Case(B=1, L=30, H=4, G=2, init=True, cu=(0, 7, 7, 30)), 2, 2),
    "siso_no_rotation": (Case(L=17, angles=False), 2, 2),
    "siso_narrow_stays_whole": (Case(L=9, N=8), 2, 1),  # 4 pairs: parts of 2 are too narrow
    "mimo_r4": (Case(R=4, C=4, H=4, G=1, L=19, halves=True, init=True), 2, 2),
    "mimo_r2_across_varlen": (
        Case(B=1, L=30, R=2, C=8, H=4, G=2, N=32, S=5, halves=True, init=True, cu=(0, 7, 7, 30)),
        4,
        4,
    ),
}


@pytest.mark.parametrize("name", slow_params(CPU_CASES, {"siso_2", "mimo_r4"}))
def test_pair_parts_match_the_reference_cpu(name: str, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU runs the gpu-marked cases")
    case, qk_split, parts = CPU_CASES[name]
    seen = spy_parts(monkeypatch)
    with kernel_config(qk_split=qk_split):
        check(case, torch.float32, "cpu", fast=False, tol_f=1e-5, tol_b=1e-5)
    assert seen == [parts]


def test_parts_fall_back_where_they_cannot_run():
    """One part unless a part keeps enough pairs and the kernels run one head per program."""
    assert launch.qk_split_parts(64, 1) == 1  # the default
    with kernel_config(qk_split=4):
        least = 4 if launch.interpreting() else 16
        assert launch.qk_split_parts(4 * least, 1) == 4
        assert launch.qk_split_parts(2 * least, 1) == 2
        assert launch.qk_split_parts(least, 1) == 1
        assert launch.qk_split_parts(4 * least, 2) == 1  # qk_heads > 1 sums heads instead
    with pytest.raises(ValueError, match="qk_split=3: allowed"):
        kernel_config(qk_split=3).__enter__()


# grid cases of the SISO and MIMO GPU tests (fp32 and bf16, grouped, packed, length 1)
GPU_CASES = {
    "siso_" + name: test_triton_siso.GPU_CASES[name]
    for name in ("n128_p64_init", "varlen_n64_p64", "len1", "bf16_n128_p64_init",
                 "bf16_n64_p64_c64")
}  # fmt: skip
GPU_CASES |= {
    "mimo_" + name: test_triton_mimo.GPU_CASES[name]
    for name in ("r4_n128_p64_init", "r4_varlen", "bf16_r4_n128_p64_init", "bf16_r8_n64_p64",
                 "bf16_r4_full_rotation")
}  # fmt: skip
# 20 of 64 pairs rotate: parts of 32 pairs are mixed / unrotated, parts of 16 all / mixed / none
GPU_CASES |= {
    "siso_mixed_parts": (Case(B=2, L=1500, H=4, G=1, N=128, P=64, S=20, C=64, init=True), "fp32"),
    "bf16_siso_mixed_parts": (
        Case(B=2, L=1500, H=4, G=1, N=128, P=64, S=20, C=64, init=True),
        "bf16",
    ),
    "bf16_mimo_mixed_parts": (
        Case(B=2, L=999, R=4, H=4, N=128, P=64, S=20, C=16, halves=True, init=True),
        "bf16",
    ),
}


@pytest.mark.gpu
@pytest.mark.parametrize("qk_split", [2, 4])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_pair_parts_match_the_reference_gpu(name: str, qk_split: int, monkeypatch):
    case, prec = GPU_CASES[name]
    seen = spy_parts(monkeypatch)
    torch.full((64 << 20,), float("nan"), device="cuda")  # poison the caching allocator
    ref = mamba3_scan_chunked if case.L > 1 else mamba3_scan_sequential
    with kernel_config(qk_split=qk_split):
        if prec == "fp32":
            check(case, torch.float32, "cuda", fast=False, tol_f=1e-5, tol_b=1e-5, reference=ref)
        else:  # the grids' bf16 tolerances
            check(
                case, torch.bfloat16, "cuda", fast=True, tol_f=1e-2, tol_b=2e-2, reference=ref,
                loose={"dangles": 8e-2, "ddt": 4e-2, "dinit.angle": 4e-2},
            )  # fmt: skip
    assert seen == [min(qk_split, case.N // 2 // 16)]
