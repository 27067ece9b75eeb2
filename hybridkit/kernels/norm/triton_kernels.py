"""Triton kernels of RMSNorm and the gated grouped RMSNorm, forward and backward.

One kernel pair serves every variant. Rows are the flattened leading axes of a (M, D) input
whose D channels form ``NG = D / GS`` groups of ``GS`` channels, each normalised on its own
(plain RMSNorm: one group of D). Optional gate ``z`` (same shape): ``PRE_GATE`` normalises
``x`` and multiplies by ``silu(z)`` afterwards (``o = w * x * rstd * silu(z)``), otherwise the
gate is applied first (``g = x * silu(z)``, ``o = w * g * rstd(g)``). Everything is computed
in float32; the forward stores one float32 ``rstd`` per (row, group) for the backward.

Why fused: in eager mode the torch formula is ~8 element-wise kernels forward and more in the
backward, each a full pass over (tokens x d_inner) activations; here the forward reads x (and
z) once and writes the output once, and the backward reads x, z, dout once and writes dx, dz
once, with the weight gradient reduced in registers per program (one small (programs, D)
float32 partial sum, added up by torch).

Grids: forward ``(cdiv(M, BLOCK_M), NG)``, one tile of rows of one group per program;
backward ``(programs, NG)``, each program striding over row tiles so its weight-gradient
partial stays in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridkit.kernels.layout import striding_programs, tile_warps
from hybridkit.kernels.pdl import launch_options, use_pdl

#: elements per (rows x channels) tile with 8 warps: 8 per thread and tensor. Compiled for
#: sm_90 (local Triton, ptxas -v) the widest variant (gated, group 64) then needs 57 registers
#: forward / 101 backward and nothing spills; 4096-element tiles on 4 warps spilled 124 bytes
#: in the gated backward (255 registers).
_TILE_ELEMENTS = 2048
#: the widest group a single tile holds (wider inputs take the torch path)
MAX_GROUP = 8192
#: The launches of the training kernels (forward, backward), module-level so that
#: ``benchmarks/norm.py`` can sweep them without a code change: tile elements, warps and the
#: backward's programs per SM (its programs stride over the row tiles). Swept on the H100
#: (``benchmarks/results/norm_launch_h100.md``): the forward is the same at every launch tried;
#: the backward was 1.23x faster at 512 elements / 1 warp / 16 per SM than at the former
#: 2,048 / 8 / 4 (gated pre-gate norm, 16,384 x 2,048, group 64: forward + backward 0.262 vs
#: 0.322 ms), and passed the GPU tests there (2026-12-06), so it is the default; the plain
#: RMSNorm was not timed at it. The decode path's add + norm keeps its own launch.
FWD_TILE_ELEMENTS = _TILE_ELEMENTS
FWD_WARPS = 8
BWD_TILE_ELEMENTS = 512
BWD_WARPS = 1
BWD_PROGRAMS_PER_SM = 16


@triton.jit
def _norm_fwd_kernel(
    X, Z, W, O, RSTD,
    M, stride_x, stride_z, stride_o, eps,
    NG: tl.constexpr, GS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_Z: tl.constexpr, PRE_GATE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    group = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < GS
    mask = row_ok[:, None] & col_ok[None, :]
    ch = group * GS + cols
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + ch[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + r64 * stride_z + ch[None, :], mask=mask, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if not PRE_GATE:
            x = x * gate
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / GS + eps)
    w = tl.load(W + ch, mask=col_ok, other=0.0).to(tl.float32)
    out = x * rstd[:, None] * w[None, :]
    if HAS_Z:  # noqa: SIM102  (nested constexpr ifs: static in every Triton version)
        if PRE_GATE:
            out = out * gate
    tl.store(O + r64 * stride_o + ch[None, :], out.to(O.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows.to(tl.int64) * NG + group, rstd, mask=row_ok)


@triton.jit
def _norm_bwd_kernel(
    X, Z, W, DO, RSTD, DX, DZ, DW, DRES, DX2,
    M, stride_x, stride_z, stride_do, stride_dx, stride_dz, stride_dres, stride_dx2,
    D: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_Z: tl.constexpr, PRE_GATE: tl.constexpr,
    HAS_DRES: tl.constexpr, HAS_DX2: tl.constexpr,
):  # fmt: skip
    """``HAS_DRES``: x is a residual sum whose other use's gradient ``DRES`` is added to dx
    (the residual stream's gradient, one pass instead of an add kernel); ``HAS_DX2``: the same
    dx stored a second time into ``DX2`` in its own dtype (the gradient of the add's other
    operand, a bf16 block output, without a cast kernel)."""
    pid = tl.program_id(0)
    group = tl.program_id(1)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < GS
    ch = group * GS + cols
    w = tl.load(W + ch, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + ch[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + r64 * stride_do + ch[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows.to(tl.int64) * NG + group, mask=row_ok, other=0.0)
        if HAS_Z:
            z = tl.load(Z + r64 * stride_z + ch[None, :], mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            gate = z * sig
            dgate = sig * (1.0 + z * (1.0 - sig))  # d silu(z) / dz
            if PRE_GATE:
                normed = x * rstd[:, None]
                dn = do * w[None, :] * gate
                dz = do * normed * w[None, :] * dgate
                dw += tl.sum(do * normed * gate, 0)
            else:
                normed = x * gate * rstd[:, None]
                dn = do * w[None, :]
                dw += tl.sum(do * normed, 0)
        else:
            normed = x * rstd[:, None]
            dn = do * w[None, :]
            dw += tl.sum(do * normed, 0)
        # d/dg of g * rstd(g): rstd * (dn - normed * mean(dn * normed)) over the group
        dg = rstd[:, None] * (dn - normed * (tl.sum(dn * normed, 1) / GS)[:, None])
        dx = dg
        if HAS_Z:  # noqa: SIM102
            if not PRE_GATE:
                dx = dg * gate
                dz = dg * x * dgate
        if HAS_DRES:
            dres = tl.load(DRES + r64 * stride_dres + ch[None, :], mask=mask, other=0.0)
            dx = dx + dres.to(tl.float32)
        tl.store(DX + r64 * stride_dx + ch[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DX2:
            tl.store(DX2 + r64 * stride_dx2 + ch[None, :], dx.to(DX2.dtype.element_ty), mask=mask)
        if HAS_Z:
            tl.store(DZ + r64 * stride_dz + ch[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
    tl.store(DW + pid.to(tl.int64) * D + ch, dw, mask=col_ok)


@triton.jit
def _add_norm_fwd_kernel(
    H, DELTA, W, S, O, RSTD,
    M, stride_h, stride_d, stride_s, stride_o, eps,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
    STORE_RSTD: tl.constexpr,
):  # fmt: skip
    """s = h + delta rounded to s's dtype (as torch's add rounds it), stored, and
    RMSNorm(s) * w in O's dtype; the residual stream is read once and the launch of the add is
    saved. ``STORE_RSTD``: also the float32 rstd per row, for the backward (training).
    ``USE_PDL``: the norm weight is read before waiting for the previous kernel
    (``hybridkit/kernels/pdl.py``)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h = tl.load(H + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    d = tl.load(DELTA + r64 * stride_d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = (h + d).to(S.dtype.element_ty)
    tl.store(S + r64 * stride_s + cols[None, :], s, mask=mask)
    x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    out = x * rstd[:, None] * w[None, :]
    tl.store(O + r64 * stride_o + cols[None, :], out.to(O.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(RSTD + rows.to(tl.int64), rstd, mask=rows < M)


def add_norm_forward(
    h: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
    rstd: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h + delta, rms_norm(h + delta) * weight)`` for 2-D (M, D) inputs with unit column
    stride, both results fresh and contiguous: the sum in h's dtype, the norm in ``out_dtype``
    (default h's). ``rstd`` (M,) float32: filled for a backward (training; then without PDL,
    as the other training kernels)."""
    m, d = h.shape
    s, out = (
        torch.empty_like(h, memory_format=torch.contiguous_format),
        torch.empty(m, d, dtype=out_dtype or h.dtype, device=h.device),
    )
    block_m, block_n, warps = _tile(d, _TILE_ELEMENTS, 8)
    pdl = rstd is None and use_pdl(h)
    _add_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        h, delta, weight, s, out, out if rstd is None else rstd,
        m, h.stride(0), delta.stride(0), s.stride(0), out.stride(0), eps,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, USE_PDL=pdl, STORE_RSTD=rstd is not None,
        num_warps=warps, **launch_options(pdl),
    )  # fmt: skip
    return s, out


def _tile(group_size: int, elements: int, warps: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps) for a group of ``group_size`` channels in tiles of about
    ``elements`` at ``warps``: a group wider than that gets a one-row tile and proportionally
    more warps (at most 16), so its elements per thread stay where the launch put them."""
    if group_size > MAX_GROUP:
        raise ValueError(f"norm kernels: group of {group_size} channels exceeds {MAX_GROUP}")
    block_n = triton.next_power_of_2(group_size)
    block_m = max(1, min(64, elements // block_n))
    return block_m, block_n, tile_warps(warps, elements, block_m * block_n, 16)


def norm_forward(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    out: torch.Tensor,
    rstd: torch.Tensor,
    group_size: int,
    eps: float,
    pre_gate: bool,
) -> None:
    """Fill ``out`` (M, D) and ``rstd`` (M, D / group_size) float32; 2-D inputs, unit column
    stride (any row stride)."""
    M, D = x.shape
    block_m, block_n, warps = _tile(group_size, FWD_TILE_ELEMENTS, FWD_WARPS)
    grid = (triton.cdiv(M, block_m), D // group_size)
    _norm_fwd_kernel[grid](
        x, x if z is None else z, weight, out, rstd,
        M, x.stride(0), 0 if z is None else z.stride(0), out.stride(0), eps,
        NG=D // group_size, GS=group_size, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_Z=z is not None, PRE_GATE=pre_gate, num_warps=warps,
    )  # fmt: skip


def norm_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dx: torch.Tensor,
    dz: torch.Tensor | None,
    group_size: int,
    pre_gate: bool,
    dres: torch.Tensor | None = None,
    dx2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill ``dx`` (and ``dz``) and return the weight gradient (D,) in float32. ``dres``: a
    gradient added to dx (x was a residual sum); ``dx2``: dx stored again in its dtype."""
    M, D = x.shape
    groups = D // group_size
    block_m, block_n, warps = _tile(group_size, BWD_TILE_ELEMENTS, BWD_WARPS)
    programs = striding_programs(x.device, triton.cdiv(M, block_m), groups, BWD_PROGRAMS_PER_SM, 4)
    dw = torch.empty(programs, D, dtype=torch.float32, device=x.device)
    _norm_bwd_kernel[(programs, groups)](
        x, x if z is None else z, weight, dout, rstd, dx, dx if dz is None else dz, dw,
        dx if dres is None else dres, dx if dx2 is None else dx2,
        M, x.stride(0), 0 if z is None else z.stride(0), dout.stride(0), dx.stride(0),
        0 if dz is None else dz.stride(0), 0 if dres is None else dres.stride(0),
        0 if dx2 is None else dx2.stride(0),
        D=D, NG=groups, GS=group_size, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_Z=z is not None, PRE_GATE=pre_gate, HAS_DRES=dres is not None,
        HAS_DX2=dx2 is not None, num_warps=warps,
    )  # fmt: skip
    return dw.sum(0)
