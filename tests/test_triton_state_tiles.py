"""The tiled forward (``state_tiles`` > 1, kernels/mamba3/chunkscan/forward_tiled.py): state
chunks of several C-token tiles walked with the running state in registers.

Forward, final state and every gradient against the float64 reference (the backward then runs
on the per-tile states the tiled forward saved), SISO and MIMO, packed, with an initial state,
L shorter than one state chunk and not a multiple of it; and a no-gradient forward, which
keeps only the coarse states, equal to the one-tile forward. On the CPU through the Triton
interpreter at tiny shapes; on the GPU at real shapes (``-m gpu``).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridkit.kernels.config import kernel_config  # noqa: E402
from hybridkit.kernels.mamba3.chunkscan import mamba3_scan_triton  # noqa: E402
from tests.helpers import rel_err, slow_params  # noqa: E402
from tests.test_triton_siso import Case, _inputs, check  # noqa: E402

CPU_CASES = {
    # (case, tiles): L 37 = two state chunks of 32 tokens minus some
    "siso_t2": (Case(C=16), 2),
    "siso_t4_init_short": (Case(C=16, L=23, init=True), 4),
    "mimo_r4_t4_init_grouped": (Case(R=4, C=4, L=45, H=4, G=2, halves=True, init=True), 4),
    "mimo_r2_t2_varlen": (
        Case(B=1, L=61, R=2, C=8, H=2, halves=True, init=True, cu=(0, 7, 7, 40, 61)),
        2,
    ),
    "mimo_r4_t8_norotation_euler": (
        Case(R=4, C=4, L=50, trap=False, angles=False, D=False, halves=True),
        8,
    ),
    "mimo_r2_t2_full_rotation_len1": (Case(R=2, C=8, L=1, S=8, halves=True, init=True), 2),
}


SLOW = {"mimo_r4_t4_init_grouped", "mimo_r2_t2_varlen"}


@pytest.mark.parametrize("name", slow_params(CPU_CASES, SLOW))
def test_tiled_forward_matches_reference_cpu(name: str):
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU runs the gpu-marked grid")
    c, tiles = CPU_CASES[name]
    with kernel_config(state_tiles=tiles):
        check(c, torch.float32, "cpu", fast=False, tol_f=1e-5, tol_b=1e-5)


def _forward(c: Case, tiles: int, device: str, dtype: torch.dtype, fast: bool):
    inp = _inputs(c, dtype, device, 3)
    cu = torch.tensor(c.cu, device=device) if c.cu else None
    with torch.no_grad(), kernel_config(state_tiles=tiles):
        return mamba3_scan_triton(
            **inp, cu_seqlens=cu, chunk_size=c.C, fast=fast, pairing=c.pairing
        )


@pytest.mark.parametrize("tiles", [2, 4])
def test_tiled_inference_equals_one_tile(tiles: int):
    """Without a gradient the tiled forward keeps only the coarse states; its outputs and end
    state equal the one-tile forward's (to rounding: the sums run in another order)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    c = Case(B=1, L=70, R=2, C=8, halves=True, cu=(0, 33, 70))
    y1, s1 = _forward(c, 1, dev, torch.float32, False)
    yt, st = _forward(c, tiles, dev, torch.float32, False)
    assert rel_err(yt, y1) < 1e-5
    for a, b in zip(st, s1, strict=True):
        assert rel_err(a, b) < 1e-5


def test_tiled_op_fake_impl():
    """opcheck of the forward op with tiles, saving the per-tile states (their fake shape is
    the C-token chunks', which the backward reads) and not."""
    c = Case(L=40, H=2, R=2, C=8, halves=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = _inputs(c, torch.float32, dev, 4)
    names = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "mimo_x")
    tensors = [inp.get(k) for k in names] + [None, None]
    for save in (True, False):
        args = tuple(t.requires_grad_() if t is not None and save else t for t in tensors)
        args += (c.C, False, c.halves, 2, save)
        torch.library.opcheck(
            torch.ops.hybridkit.mamba3_scan_fwd.default,
            args,
            test_utils=("test_schema", "test_faketensor")
            + (("test_autograd_registration",) if save else ()),
        )
        states = torch.ops.hybridkit.mamba3_scan_fwd(*args)[3]
        chunk = c.C if save else 2 * c.C
        assert states.shape[0] == c.B * -(-c.L // chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [2, 4])
@pytest.mark.parametrize("rank", [1, 4])
def test_tiled_forward_matches_reference_gpu(rank: int, tiles: int):
    from hybridkit.kernels.mamba3.chunked import mamba3_scan_chunked

    torch.full((64 << 20,), float("nan"), device="cuda")  # poison the caching allocator
    C = 64 // rank
    c = Case(B=2, L=1777, R=rank, H=4, G=2, N=128, P=64, S=32, C=C, halves=rank > 1, init=True)
    with kernel_config(state_tiles=tiles):
        check(
            c, torch.float32, "cuda", fast=False, tol_f=1e-5, tol_b=1e-5,
            reference=mamba3_scan_chunked,
        )  # fmt: skip
        errs = check(
            c, torch.bfloat16, "cuda", fast=True, tol_f=1e-2, tol_b=2e-2,
            reference=mamba3_scan_chunked,
            loose={"dangles": 8e-2, "ddt": 4e-2, "dinit.angle": 4e-2},
        )  # fmt: skip
    print(f"\nrank {rank} tiles {tiles}: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))
