"""A Triton kernel for linears with few rows (decoding): ``y = x W^T (+ b)`` for x (M, K) with
M <= 16, W (N, K).

Why: at one token per sequence every projection is a matrix-vector product (or, at batch 16,
a 16-row one) whose time is reading W once. On the H200 one Mamba-3 layer's two projections at
batch 1 took ~22 us of its 27 us decode step against a 12.4 us floor (``docs/kernels.md``);
a GEMM library's output tiles are 64-256 columns wide, so a narrow output gets few thread
blocks. Here each program owns 16 or 32 output columns (8 for a single row, which needs no
tensor-core tile: ``_gemv_kernel``), so every projection of the 400M model gets 64 to 4,000
programs, and walks K with the loads software-pipelined (``tl.range(..., num_stages)``), so
every SM keeps several W tiles in flight. Whether that beats
cuBLAS is for the GPU to say (``benchmarks/skinny_linear.py``); the kernel setting
``skinny_linear`` is off until it has. The 16 rows pad one tensor-core tile (rows past M are
masked); the wasted arithmetic is free next to the bytes. No split over K: it would need
atomics (results differing run to run) or a second launch.

fp32 inputs multiply in full fp32 (``ieee``), so the CPU interpreter's tests compare against
``torch.nn.functional.linear`` tightly; bf16 / fp16 use the tensor cores with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridkit.kernels.config import interpreting

#: the most rows a call may have (one tensor-core tile tall)
MAX_ROWS = 16
BLOCK_K = 256
#: pipeline depth of the K loop (W tiles in flight per program)
STAGES = 4


@triton.jit
def _skinny_linear_kernel(
    X, W, B, Y,
    M, N, K, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, FP32: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if FP32:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemv_kernel(
    X, W, B, Y, N, K, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """One row (batch 1): no tensor-core tile to fill, so 8 output columns per program (four
    times the programs of the 16-row kernel: the 1,024-wide projections back to d_model get 128)
    and plain multiply-adds into a (BLOCK_N, BLOCK_K) fp32 accumulator, summed once at the end.
    The K loop is pipelined like the 16-row kernel's (compiled for sm_90: cp.async loads)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(X + offs_k, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=n_ok)


#: the one-row kernel's tile: 8 output columns x 512 of K (32 elements per thread at 4 warps)
GEMV_BLOCK_N = 8
GEMV_BLOCK_K = 512


def block_n(n: int) -> int:
    """Output columns per program: 32 for wide outputs, else 16 (more programs for the narrow
    projections back to d_model, which have the fewest columns)."""
    return 32 if n >= 8192 else 16


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for 2-D ``x`` (M <= 16, K) with a unit column stride and a
    contiguous ``weight`` (N, K); a fresh contiguous (M, N) result in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS or weight.shape[1] != k:
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    interp = interpreting()
    if m == 1:
        _gemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N),)](
            x, weight, weight if bias is None else bias, y, n, k, weight.stride(0),
            BLOCK_N=GEMV_BLOCK_N, BLOCK_K=GEMV_BLOCK_K, STAGES=1 if interp else STAGES,
            HAS_BIAS=bias is not None, num_warps=1 if interp else 4,
        )  # fmt: skip
        return y
    bn = block_n(n)
    _skinny_linear_kernel[(triton.cdiv(n, bn),)](
        x, weight, weight if bias is None else bias, y,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=BLOCK_K, STAGES=1 if interp else STAGES,
        HAS_BIAS=bias is not None, FP32=x.dtype == torch.float32,
        num_warps=1 if interp else 4,
    )  # fmt: skip
    return y
