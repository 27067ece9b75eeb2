"""The Triton scan at MIMO ranks (R rows per token, "halves" pairing, per-rank x scaling).

The same kernels as SISO run R rows per token (docs/mamba3.md §3.9); these cases check the
forward, the final state and every gradient (psi = ``mimo_x`` included) against the float64
sequential reference: on the CPU through the Triton interpreter at tiny shapes, on the GPU over
a grid of real shapes (``-m gpu``).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridkit.kernels.mamba3 import ops  # noqa: E402
from tests import test_triton_siso  # noqa: E402
from tests.helpers import slow_params  # noqa: E402
from tests.test_triton_siso import Case, _inputs, check, check_gpu_case  # noqa: E402

# C x R = 16 rows per chunk (the smallest tile), unless a case says otherwise
CPU_CASES = {
    "r2": Case(R=2, C=8, halves=True),
    "r4_init_grouped": Case(R=4, C=4, H=4, G=2, halves=True, init=True),
    "r4_len1_init": Case(R=4, C=4, L=1, halves=True, init=True),
    "r2_varlen_init": Case(B=1, L=30, R=2, C=8, H=2, halves=True, init=True, cu=(0, 7, 7, 30)),
    "r4_euler_norotation_noD": Case(
        R=4, C=4, L=19, trap=False, angles=False, D=False, halves=True, init=True
    ),
    "r2_full_rotation": Case(R=2, C=8, S=8, halves=True, init=True),
    "r8": Case(R=8, C=2, L=13, halves=True),
    "r2_interleaved": Case(R=2, C=8, L=21),  # the kernels take either pairing
    "r2_c32_rows": Case(B=1, L=40, R=2, C=16, N=32, P=32, S=8, halves=True),
}


@pytest.mark.triton
@pytest.mark.parametrize("name", slow_params(CPU_CASES, {"r4_init_grouped", "r2_varlen_init"}))
def test_triton_mimo_matches_reference_cpu(name: str):
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU runs the gpu-marked grid")
    check(CPU_CASES[name], torch.float32, "cpu", fast=False, tol_f=1e-5, tol_b=1e-5)


@pytest.mark.triton
@pytest.mark.slow  # ~30 s each: two layers forward and backward through the interpreter
@pytest.mark.parametrize("rank, chunk", [(2, 8), (4, 4)])
def test_mimo_hybrid_through_the_interpreter_matches_chunked(rank: int, chunk: int, monkeypatch):
    """Model level on the CPU (the GPU runs the same check at real sizes): a hybrid whose two
    MIMO layers (grouped pre-gate norm; ngroups 2) run the Triton kernels through the
    interpreter, fp32, has the chunked path's loss and every parameter gradient (21 tokens: a
    partial last chunk), and prefill -> continued prefill -> steps equal its full forward."""
    from hybridkit import build_model
    from tests.helpers import (
        assert_same_loss_and_grads,
        attn_block,
        mamba_block,
        prefill_then_steps,
        rel_err,
        spy_triton_scan,
        tiny_recipe,
    )

    calls = spy_triton_scan(monkeypatch)

    def model(backend: str):
        m = dict(d_state=16, headdim=8, chunk_size=chunk, mimo_rank=rank, backend=backend)
        blocks = {
            "m": mamba_block(**m, outproj_norm="grouped_pregate"),
            "g": mamba_block(**m, ngroups=2),
            "a": attn_block(),
        }
        return build_model(tiny_recipe("m a g", d_model=16, vocab=41, **blocks).model, seed=2)

    ids = torch.randint(0, 41, (2, 22), generator=torch.Generator().manual_seed(0))
    assert_same_loss_and_grads(model("triton"), model("chunked"), ids, 1e-5, 1e-4)
    assert calls == [False, False], "both MIMO layers must run the Triton kernels"

    calls.clear()
    net = model("triton").eval()
    with torch.no_grad():
        full = net(ids)
    assert rel_err(prefill_then_steps(net, ids, 9, 10), full) < 1e-5
    assert calls == [False, False, True, True, True, True]


@pytest.mark.triton
def test_mimo_dispatch():
    """``auto`` sends MIMO on CUDA to Triton with C x R rows per chunk; ranks without a kernel
    and chunk heights outside the configured sizes go to the chunked path, with the reason."""

    def plan(rank=4, chunk=16, n=128, device="cuda"):
        return ops.plan_scan(
            "auto", device=device, dtype=torch.bfloat16, length=64, rank=rank, d_state=n,
            headdim=64, chunk_size=chunk, pairing="halves", has_mimo_x=True,
        )  # fmt: skip

    assert plan() == ops.ScanPlan("triton", 16, "")
    assert plan(rank=2, chunk=32).backend == "triton"
    assert plan(rank=8, chunk=8).backend == "triton"
    assert plan(rank=4, chunk=64).chunk_size == 16  # 256 rows narrowed to 64
    assert plan(rank=3).backend == "chunked" and "rank 3" in plan(rank=3).reason
    assert plan(rank=4, chunk=2).backend == "chunked"  # 8 rows: below the smallest tile
    assert plan(device="cpu").backend == "chunked"


def _gpu_case(R, N, P, G, L, prec, **kw):
    C = 64 // R  # narrowed by the scan where 64 rows do not fit (fp32, N 128)
    return Case(B=2, L=L, R=R, H=4, G=G, N=N, P=P, S=N // 4, C=C, halves=True, **kw), prec


# R 2 / 4 / 8, N 64 / 128, P 32 / 64, G 1 and H / 2, L up to 4,096, fp32 and bf16
GPU_CASES = {
    "r4_n128_p64_init": _gpu_case(4, 128, 64, 1, 2345, "fp32", init=True),
    "r2_n64_p32_g2": _gpu_case(2, 64, 32, 2, 1777, "fp32"),
    "r8_n64_p64_init": _gpu_case(8, 64, 64, 1, 999, "fp32", init=True),
    "r4_len1": _gpu_case(4, 64, 64, 1, 1, "fp32", init=True),
    "r4_varlen": (
        Case(
            B=1,
            L=2000,
            R=4,
            H=4,
            G=2,
            N=64,
            P=64,
            S=16,
            C=16,
            halves=True,
            init=True,
            cu=(0, 700, 700, 701, 2000),
        ),
        "fp32",
    ),  # fmt: skip
    "bf16_r4_n128_p64_init": _gpu_case(4, 128, 64, 1, 4096, "bf16", init=True),
    "bf16_r2_n128_p32_g2": _gpu_case(2, 128, 32, 2, 1500, "bf16"),
    "bf16_r8_n64_p64": _gpu_case(8, 64, 64, 2, 777, "bf16"),
    "bf16_r4_full_rotation": (
        Case(B=2, L=1000, R=4, H=4, N=128, P=64, S=64, C=16, halves=True, init=True),
        "bf16",
    ),  # fmt: skip
}


def grid_cases(siso: tuple[str, ...], mimo: tuple[str, ...]) -> dict:
    """A subset of the SISO and MIMO GPU grids, named ``siso_<case>`` / ``mimo_<case>``: what
    the tests of a kernel setting run (``qk_heads``)."""
    cases = {"siso_" + name: test_triton_siso.GPU_CASES[name] for name in siso}
    return cases | {"mimo_" + name: GPU_CASES[name] for name in mimo}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_triton_mimo_matches_reference_gpu(name: str):
    c, prec = GPU_CASES[name]
    errs = check_gpu_case(c, prec)  # the SISO grid's tolerances
    print(f"\n{name}: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))


@pytest.mark.gpu
def test_mimo_compiles_once_per_configuration():
    """A new batch size or length reuses the compiled kernels. Triton specialises integer
    arguments on divisibility by 16 (which keeps the loads vectorised), so lengths that are
    multiples of 16 and odd lengths each compile once: count compilations within each kind."""
    from hybridkit.kernels.mamba3.chunkscan import backward, forward

    kernels = (forward._fwd_out_kernel, backward._bwd_x_kernel)

    def compiled() -> list[int]:
        dev = torch.cuda.current_device()
        return [len(k.device_caches[dev][0]) for k in kernels]

    def run(B, L):
        c = Case(B=B, L=L, R=4, H=4, N=64, P=64, S=16, C=16, halves=True)
        inp = {k: v.requires_grad_() if v is not None else v for k, v in
               _inputs(c, torch.bfloat16, "cuda", L).items()}  # fmt: skip
        y, _ = ops.mamba3_scan(**inp, pairing="halves", chunk_size=16, backend="triton")
        y.float().sum().backward()

    for lengths in ((2, 512), (1, 1024), (3, 4096)), ((2, 301), (1, 517), (3, 77)):
        run(*lengths[0])
        before = compiled()
        for B, L in lengths[1:]:
            run(B, L)
        assert compiled() == before, (lengths, before, compiled())
