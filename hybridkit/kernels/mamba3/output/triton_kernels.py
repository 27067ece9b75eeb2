"""Triton kernels of the Mamba-3 MIMO output: gate, output norm and rank sum in one pass.

Unfused, the output of a rank-R layer is R times the work of a SISO one in separate passes: z
is broadcast and scaled per rank (a (tokens, R, d_inner) tensor), the gated norm writes a float32
(tokens, R, d_inner) result, the ``mimo_o`` product another, and the rank sum reads it back; the
backward repeats that with the gradients and reduces three weight gradients over the tokens.
Here the forward reads y (R rows per token) and z once and writes the (tokens, d_inner) output
in y's dtype; the backward reads y, z and the output gradient once, writes dy and dz once, and
keeps its partial weight gradients (norm weight, ``mimo_z``, ``mimo_o``) in registers.

Tiles are 3-D, (tokens, R, group channels): the rank axis is whole in every tile, so the rank
sum and the ``mimo_*`` gradients are reductions inside the tile. Statistics in float32; the
backward recomputes each row's rms rather than storing it (y is read anyway).

``NORM``: the index of the mode in ``reference.MODES``: 0 no norm (``y_r * silu(z_r)``), 1
pre-gate, 2 post-gate.
Grids: flat, the NG norm groups varying fastest (``_group_slot``); the forward's programs take
one token tile each, the backward's stride over the token tiles so that their weight-gradient
partials stay in registers (summed by torch). Tile sizes and warps: the module constants below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridkit.kernels.layout import striding_programs, tile_warps
from hybridkit.kernels.mamba3.output.reference import MODES
from hybridkit.kernels.mamba3.output.tiles import TILE_ELEMENTS, tile

#: The launches, module-level so that ``benchmarks/mimo_output.py`` can sweep them without a
#: code change. Timed on the H100 at (4 x 4096 tokens, R 4, 32 heads x 64, grouped pre-gate
#: norm; ``benchmarks/results/mimo_output_launch_h100.md``): the forward took 0.158 ms at 2,048
#: elements (tokens x R x channels) and 2 warps, 32 elements per thread, against 1.25 ms at 8
#: warps (Inductor's fusion of the formula: 0.265, byte floor 0.140); the backward about 0.80 ms
#: at 256 elements and 2 warps against 1.62 at 512 / 8. In the forward fewer elements per thread
#: were slower, though not monotonically; in the backward the smallest tile was fastest: these
#: are measured, not derived. ``BWD_PROGRAMS_PER_SM``: the backward's programs, which stride over
#: the token tiles keeping their weight-gradient partials in registers (6 when it was timed).
#: One warp in the backward: forward + backward 0.916 against 0.961 ms at 2 warps
#: (``mimo_output_tuned_h100.md``); it passed the GPU tests on 2026-12-06.
FWD_TILE_ELEMENTS = TILE_ELEMENTS
FWD_WARPS = 2
BWD_TILE_ELEMENTS = 256
BWD_WARPS = 1
BWD_PROGRAMS_PER_SM = 6


@triton.jit
def _group_slot(HP: tl.constexpr, GS: tl.constexpr):
    """(norm group, slot along the tokens, slots) of this program. The grid is flat with the
    groups varying fastest, so the programs in flight together read whole token rows of y
    (R x HP contiguous) rather than one group's 128 bytes of thousands of rows."""
    flat = tl.program_id(0)
    return flat % (HP // GS), flat // (HP // GS), tl.num_programs(0) // (HP // GS)


@triton.jit
def _rank_weights(MZ, MO, r, ch, n_ok, R: tl.constexpr, HP: tl.constexpr):
    """The (R, channels) tiles of ``mimo_z`` and ``mimo_o`` for the group's channels ``ch``."""
    pm = (r < R)[:, None] & n_ok[None, :]
    mz = tl.load(MZ + r[:, None] * HP + ch[None, :], mask=pm, other=0.0)
    mo = tl.load(MO + r[:, None] * HP + ch[None, :], mask=pm, other=0.0)
    return mz, mo


@triton.jit
def _yz_loads(Y, Z, t, r, ch, n_ok, T, stride_yt, stride_yr, stride_zt, R: tl.constexpr):
    """The raw y (tokens, R, channels) and z tiles of tokens ``t`` (zeros past T), in their
    storage dtypes."""
    t64 = t.to(tl.int64)
    m2 = (t < T)[:, None] & n_ok[None, :]
    m3 = m2[:, None, :] & (r < R)[None, :, None]
    y_off = (
        t64[:, None, None] * stride_yt
        + r.to(tl.int64)[None, :, None] * stride_yr
        + ch[None, None, :]
    )
    y = tl.load(Y + y_off, mask=m3, other=0.0)
    z = tl.load(Z + t64[:, None] * stride_zt + ch[None, :], mask=m2, other=0.0)
    return y, z


@triton.jit
def _mimo_out_fwd_kernel(
    Y, Z, MZ, MO, W, O,
    T, stride_yt, stride_yr, stride_zt, stride_ot, eps,
    R: tl.constexpr, HP: tl.constexpr, GS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    group, slot, _slots = _group_slot(HP, GS)
    t = slot * BLOCK_T + tl.arange(0, BLOCK_T)
    r = tl.arange(0, R)
    n = tl.arange(0, BLOCK_N)
    ch = group * GS + n
    n_ok = n < GS
    y, z = _yz_loads(Y, Z, t, r, ch, n_ok, T, stride_yt, stride_yr, stride_zt, R)
    y, z = y.to(tl.float32), z.to(tl.float32)
    mz, mo = _rank_weights(MZ, MO, r, ch, n_ok, R, HP)
    zr = z[:, None, :] * mz[None, :, :]
    gate = zr * tl.sigmoid(zr)
    if NORM == 2:
        y = y * gate
    o = y
    if NORM != 0:
        rstd = 1.0 / tl.sqrt(tl.sum(y * y, 2) / GS + eps)
        w = tl.load(W + ch, mask=n_ok, other=0.0).to(tl.float32)
        o = y * rstd[:, :, None] * w[None, None, :]
    if NORM != 2:
        o = o * gate
    out = tl.sum(o * mo[None, :, :], 1)
    m2 = (t < T)[:, None] & n_ok[None, :]
    o_ptr = O + t.to(tl.int64)[:, None] * stride_ot + ch[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_loads(
    DO, Y, Z, t, r, ch, n_ok, T, stride_dot, stride_yt, stride_yr, stride_zt, R: tl.constexpr
):  # fmt: skip
    """The raw y (tokens, R, channels), z and output-gradient tiles of tokens ``t`` (zeros past
    T), in their storage dtypes."""
    y, z = _yz_loads(Y, Z, t, r, ch, n_ok, T, stride_yt, stride_yr, stride_zt, R)
    m2 = (t < T)[:, None] & n_ok[None, :]
    dout = tl.load(DO + t.to(tl.int64)[:, None] * stride_dot + ch[None, :], mask=m2, other=0.0)
    return y, z, dout


@triton.jit
def _mimo_out_bwd_kernel(
    DO, Y, Z, MZ, MO, W, DY, DZ, DW, DMZ, DMO,
    T, stride_dot, stride_yt, stride_yr, stride_zt, eps,
    R: tl.constexpr, HP: tl.constexpr, GS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    group, pid, programs = _group_slot(HP, GS)  # pid strides over token tiles by programs
    r = tl.arange(0, R)
    n = tl.arange(0, BLOCK_N)
    ch = group * GS + n
    n_ok = n < GS
    pm = (r < R)[:, None] & n_ok[None, :]
    mz, mo = _rank_weights(MZ, MO, r, ch, n_ok, R, HP)
    w = tl.load(W + ch, mask=n_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dmz = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    dmo = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    # software pipelining by hand: each iteration issues the next tile's loads before the
    # arithmetic on the current one, so they are in flight meanwhile (the raw bf16 inputs cost
    # few registers; the arithmetic's float32 tensors are what bound the tile)
    tt = tl.arange(0, BLOCK_T)
    step = programs * BLOCK_T
    y_next, z_next, do_next = _bwd_loads(
        DO, Y, Z, pid * BLOCK_T + tt, r, ch, n_ok, T, stride_dot, stride_yt, stride_yr, stride_zt, R
    )
    for start in range(pid * BLOCK_T, T, step):
        t = start + tt
        t64 = t.to(tl.int64)
        m2 = (t < T)[:, None] & n_ok[None, :]
        m3 = m2[:, None, :] & (r < R)[None, :, None]
        y, z, dout = y_next.to(tl.float32), z_next.to(tl.float32), do_next.to(tl.float32)
        y_next, z_next, do_next = _bwd_loads(
            DO, Y, Z, t + step, r, ch, n_ok, T, stride_dot, stride_yt, stride_yr, stride_zt, R
        )
        zr = z[:, None, :] * mz[None, :, :]
        sig = tl.sigmoid(zr)
        gate = zr * sig
        do = dout[:, None, :] * mo[None, :, :]  # gradient of each rank's o_r
        if NORM == 0:
            o = y * gate
            dy = do * gate
            dgate = do * y
        elif NORM == 1:  # o = w * y * rstd(y) * gate
            rstd = 1.0 / tl.sqrt(tl.sum(y * y, 2) / GS + eps)
            nrm = y * rstd[:, :, None]
            nw = nrm * w[None, None, :]
            o = nw * gate
            dn = do * w[None, None, :] * gate
            dw += tl.sum(tl.sum(do * nrm * gate, 1), 0)
            dgate = do * nw
            dy = rstd[:, :, None] * (dn - nrm * (tl.sum(dn * nrm, 2) / GS)[:, :, None])
        else:  # o = w * g * rstd(g), g = y * gate
            g = y * gate
            rstd = 1.0 / tl.sqrt(tl.sum(g * g, 2) / GS + eps)
            nrm = g * rstd[:, :, None]
            o = nrm * w[None, None, :]
            dn = do * w[None, None, :]
            dw += tl.sum(tl.sum(do * nrm, 1), 0)
            dg = rstd[:, :, None] * (dn - nrm * (tl.sum(dn * nrm, 2) / GS)[:, :, None])
            dy = dg * gate
            dgate = dg * y
        dmo += tl.sum(dout[:, None, :] * o, 0)
        dzr = dgate * sig * (1.0 + zr * (1.0 - sig))  # d silu(zr) / d zr
        dmz += tl.sum(dzr * z[:, None, :], 0)
        dz = tl.sum(dzr * mz[None, :, :], 1)
        dy_off = t64[:, None, None] * (R * HP) + r[None, :, None] * HP + ch[None, None, :]
        tl.store(DY + dy_off, dy.to(DY.dtype.element_ty), mask=m3)
        tl.store(DZ + t64[:, None] * HP + ch[None, :], dz.to(DZ.dtype.element_ty), mask=m2)
    base = pid.to(tl.int64) * R * HP
    tl.store(DMZ + base + r[:, None] * HP + ch[None, :], dmz, mask=pm)
    tl.store(DMO + base + r[:, None] * HP + ch[None, :], dmo, mask=pm)
    if NORM != 0:
        tl.store(DW + pid.to(tl.int64) * HP + ch, dw, mask=n_ok)


def mimo_output_forward(
    y: torch.Tensor,
    z: torch.Tensor,
    mz: torch.Tensor,
    mo: torch.Tensor,
    weight: torch.Tensor | None,
    out: torch.Tensor,
    group_size: int,
    eps: float,
    mode: str,
) -> None:
    """Fill ``out`` (T, HP). ``y`` (T, R, HP) and ``z`` (T, HP) with unit channel stride (any
    token and rank strides); ``mz`` / ``mo`` (R, HP) float32 contiguous; ``weight`` (HP,)."""
    T, R, HP = y.shape
    block_t, block_n = tile(R, group_size, FWD_TILE_ELEMENTS)
    grid = (triton.cdiv(T, block_t) * (HP // group_size),)
    _mimo_out_fwd_kernel[grid](
        y, z, mz, mo, mz if weight is None else weight, out,
        T, y.stride(0), y.stride(1), z.stride(0), out.stride(0), eps,
        R=R, HP=HP, GS=group_size, BLOCK_T=block_t, BLOCK_N=block_n, NORM=MODES.index(mode),
        num_warps=FWD_WARPS,
    )  # fmt: skip


def mimo_output_backward(
    dout: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    mz: torch.Tensor,
    mo: torch.Tensor,
    weight: torch.Tensor | None,
    dy: torch.Tensor,
    dz: torch.Tensor,
    group_size: int,
    eps: float,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fill ``dy`` (T, R, HP) and ``dz`` (T, HP), both contiguous, and return the float32
    gradients of ``mz``, ``mo`` (R, HP) and ``weight`` (HP,; None without a norm)."""
    T, R, HP = y.shape
    groups = HP // group_size
    block_t, block_n = tile(R, group_size, BWD_TILE_ELEMENTS)
    # a wide group gives a one-token tile larger than BWD_TILE_ELEMENTS: more warps, up to 8
    warps = tile_warps(BWD_WARPS, BWD_TILE_ELEMENTS, block_t * R * block_n, 8)
    programs = striding_programs(y.device, triton.cdiv(T, block_t), groups, BWD_PROGRAMS_PER_SM, 3)
    f32 = dict(dtype=torch.float32, device=y.device)
    dmz, dmo = torch.empty(programs, R, HP, **f32), torch.empty(programs, R, HP, **f32)
    dw = torch.empty(programs, HP, **f32) if weight is not None else dmz
    _mimo_out_bwd_kernel[(programs * groups,)](
        dout, y, z, mz, mo, mz if weight is None else weight, dy, dz, dw, dmz, dmo,
        T, dout.stride(0), y.stride(0), y.stride(1), z.stride(0), eps,
        R=R, HP=HP, GS=group_size, BLOCK_T=block_t, BLOCK_N=block_n, NORM=MODES.index(mode),
        num_warps=warps,
    )  # fmt: skip
    return dmz.sum(0), dmo.sum(0), None if weight is None else dw.sum(0)
