"""Forward kernels with state chunks of several tiles (``KernelConfig.state_tiles`` = NT > 1).

The kernels of :mod:`.forward` keep one P x N state per chunk of C tokens. For MIMO the chunk
is short (C x R rows per tile, so 16 tokens at R 4) and those states are most of the forward's
memory traffic: each is written by ``_fwd_state``, read and rewritten by ``_fwd_pass`` and
read by ``_fwd_out`` (about 4.3 GB at B 8, L 4096, H 32, P 64, N 128 in bf16, a third of the
forward's time at the copy bandwidth). Here a *state chunk* is NT tiles of C tokens: both chunk
kernels walk the tiles in order with the running state in registers, so only one state per
NT tiles goes through memory and the pass walks NT times fewer steps. The tile is still the
tensor-core tile (C x R rows); each tile costs one more (P x CR) x (CR x N) product, which
advances the running state past it.

Frames: q and k of every tile are rotated by the angle accumulated since the state chunk's
start (``_rotation`` with ``TH0``), so the running state stays in the state chunk's frame and
the pass is unchanged at C * NT tokens. A tile's own start state, in its own frame, is the
running state rotated by that accumulated angle -- what the C-token chunk kernels keep per
chunk; ``_fwd_out_tiled`` stores those (``SAVE_TILES``) when a backward will run, which then
runs unchanged on C-token chunks. The math is that of ``docs/mamba3.md`` section 3.2 applied
twice: chunk = state chunk for the pass, chunk = tile for the intra-chunk products.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hybridkit.kernels.mamba3.chunkscan.common import (
    _chunk,
    _cos,
    _dot,
    _expand_rows,
    _gate_offsets,
    _gates,
    _load_gates,
    _load_qk,
    _mod2pi,
    _operand,
    _rotation,
    _row_offsets,
    _rows,
    _scores,
    _sin,
    _state_tile,
    _store_gates,
    _tokens,
    _widen,
    _x_rows,
)


@triton.jit
def _fwd_state_tiled_kernel(
    K,
    V,
    PSI,
    ADT,
    DT,
    TRAP,
    KB,
    ANG,
    CHTAB,
    STATES,
    DECAY,
    OMEGA,
    GATES,
    s_kb,
    s_kl,
    s_kr,
    s_kg,
    s_vb,
    s_vl,
    s_vh,
    s_ab,
    s_ah,
    s_al,
    s_db,
    s_dh,
    s_dl,
    s_tb,
    s_th,
    s_tl,
    s_gb,
    s_gs,
    s_gh,
    L,
    H,
    HPG,
    NANG,
    NC,
    C: tl.constexpr,
    P: tl.constexpr,
    N2: tl.constexpr,
    NA: tl.constexpr,
    HAS_TRAP: tl.constexpr,
    HAS_ANG: tl.constexpr,
    VARLEN: tl.constexpr,
    FAST: tl.constexpr,
    R: tl.constexpr,
    HALVES: tl.constexpr,
    NT: tl.constexpr,
):
    """Per (state chunk, head): the state chunk's own contribution to its end state (its
    frame), its total log decay and total angle, tile by tile; saves each tile's gates
    (gamma, kappa, in-tile cumsum of adt) for ``_fwd_out_tiled``."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    g = h // HPG
    bat, seq, chunk_start, chunk_end, seq_end = _chunk(gc, CHTAB, L, NC, C * NT, VARLEN)
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    acc_e = tl.zeros((P, N2), dtype=tl.float32)
    acc_o = tl.zeros((P, N2), dtype=tl.float32)
    a_tot = tl.sum(tl.zeros((C,), dtype=tl.float32), 0)
    th0 = tl.zeros((NA,), dtype=tl.float32)  # angle since the state chunk's start, mod 2 pi
    om_tot = tl.zeros((NA,), dtype=tl.float32)
    for s in range(NT):
        tok_start = chunk_start + s * C
        tok_end = tl.minimum(tok_start + C, chunk_end)
        tt, rr, mc = _rows(tok_start, tok_end, C, R)
        tok, mtok = _tokens(tok_start, tok_end, C)
        adt, dt, gamma, kappa = _gates(
            ADT, DT, TRAP, bat, h, tok, mtok, seq_end, s_ab, s_ah, s_al, s_db, s_dh, s_dl,
            s_tb, s_th, s_tl, HAS_TRAP, FAST,
        )  # fmt: skip
        cs = tl.cumsum(adt, 0)
        a_c = tl.sum(adt, 0)
        _store_gates(GATES, bat, h, H, L, tok, mtok, gamma, kappa, cs)
        cs = _expand_rows(cs, R)
        kappa = _expand_rows(kappa, R)
        if HAS_ANG:
            om, _c, _s, cosv, sinv = _rotation(
                ANG, bat, h, tok, mtok, dt, NANG, s_gb, s_gs, s_gh, N2, NA, R, FAST, th0, True
            )  # fmt: skip
            th0 = _mod2pi(th0 + om)
            om_tot += om
        else:
            cosv = 0.0
            sinv = 0.0
        ke, ko = _load_qk(
            K, KB, bat, g, h, tt, rr, mc, offs_j, s_kb, s_kl, s_kr, s_kg, HAS_ANG, cosv, sinv,
            R, HALVES,
        )  # fmt: skip
        x, _x = _x_rows(V, PSI, bat, tt, rr, mc, h, s_vb, s_vl, s_vh, P, R)
        xu = _operand(x * (tl.exp(a_c - cs) * kappa)[:, None], FAST)
        ea = tl.exp(a_c)
        acc_e = ea * acc_e + _dot(tl.trans(xu), _operand(ke, FAST), FAST)
        acc_o = ea * acc_o + _dot(tl.trans(xu), _operand(ko, FAST), FAST)
        a_tot += a_c
    pe, po = _state_tile(STATES, gc, h, H, offs_p, offs_j, N2, P)
    tl.store(pe, acc_e.to(STATES.dtype.element_ty))
    tl.store(po, acc_o.to(STATES.dtype.element_ty))
    tl.store(DECAY + gc * H + h, a_tot)
    if HAS_ANG:
        offs_a = tl.arange(0, NA)
        tl.store(OMEGA + (gc * H + h) * NANG + offs_a, om_tot, mask=offs_a < NANG)


@triton.jit
def _fwd_out_tiled_kernel(
    Q,
    K,
    V,
    PSI,
    GATES,
    DT,
    QB,
    KB,
    ANG,
    DSKIP,
    OUT,
    CHTAB,
    STATES,
    TILE_STATES,
    TILE_SLOT,
    s_qb,
    s_ql,
    s_qr,
    s_qg,
    s_kb,
    s_kl,
    s_kr,
    s_kg,
    s_vb,
    s_vl,
    s_vh,
    s_db,
    s_dh,
    s_dl,
    s_gb,
    s_gs,
    s_gh,
    s_ob,
    s_ol,
    s_or,
    s_oh,
    L,
    H,
    HPG,
    NANG,
    NC,
    NCT,
    C: tl.constexpr,
    P: tl.constexpr,
    N2: tl.constexpr,
    NA: tl.constexpr,
    HAS_ANG: tl.constexpr,
    HAS_D: tl.constexpr,
    VARLEN: tl.constexpr,
    FAST: tl.constexpr,
    R: tl.constexpr,
    HALVES: tl.constexpr,
    NT: tl.constexpr,
    SAVE_TILES: tl.constexpr,
):
    """Per (state chunk, head), tile by tile: y = (q~k~^T * W) x~ + exp(cs) q~ S^T + D x~ with
    S the running state (the state chunk's start state advanced past the earlier tiles).
    ``SAVE_TILES``: also store every tile's start state in its own frame into ``TILE_STATES``,
    the per-chunk states of C-token chunks (slot of the first tile: ``TILE_SLOT`` per state
    chunk when packed, else ``bat * NCT + (gc % NC) * NT`` with NCT chunks of C per sequence)."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    g = h // HPG
    bat, seq, chunk_start, chunk_end, seq_end = _chunk(gc, CHTAB, L, NC, C * NT, VARLEN)
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    pe, po = _state_tile(STATES, gc, h, H, offs_p, offs_j, N2, P)
    se = tl.load(pe).to(tl.float32)
    so = tl.load(po).to(tl.float32)
    th0 = tl.zeros((NA,), dtype=tl.float32)
    if SAVE_TILES:
        if VARLEN:
            slot0 = tl.load(TILE_SLOT + gc)
        else:
            slot0 = bat * NCT + (gc % NC) * NT
    for s in range(NT):
        tok_start = chunk_start + s * C
        tok_end = tl.minimum(tok_start + C, chunk_end)
        if SAVE_TILES:
            if HAS_ANG:  # the running state in the tile's frame: rotated by th0
                cw = _widen(_cos(th0, FAST)[None, :], 1.0, N2)
                sw = _widen(_sin(th0, FAST)[None, :], 0.0, N2)
                te = cw * se + sw * so
                to = cw * so - sw * se
            else:
                te = se
                to = so
            if tok_start < chunk_end:  # tiles past a short last chunk have no slot
                qe_, qo_ = _state_tile(TILE_STATES, slot0 + s, h, H, offs_p, offs_j, N2, P)
                tl.store(qe_, te.to(TILE_STATES.dtype.element_ty))
                tl.store(qo_, to.to(TILE_STATES.dtype.element_ty))
        tt, rr, mc = _rows(tok_start, tok_end, C, R)
        tok, mtok = _tokens(tok_start, tok_end, C)
        gamma, kappa, cs = _load_gates(GATES, bat, h, H, L, tok, mtok, R)
        # the tile's total log decay: the in-tile cumsum at its last token
        a_c = tl.load(
            GATES + _gate_offsets(bat, h, H, L, tok_end - 1) + 2 * L,
            mask=tok_end > tok_start,
            other=0.0,
        )
        if HAS_ANG:
            dt = tl.load(DT + bat * s_db + h * s_dh + tok * s_dl, mask=mtok, other=0.0)
            om, _c, _s, cosv, sinv = _rotation(
                ANG, bat, h, tok, mtok, dt.to(tl.float32), NANG, s_gb, s_gs, s_gh, N2, NA, R,
                FAST, th0, True,
            )  # fmt: skip
            th0 = _mod2pi(th0 + om)
        else:
            cosv = 0.0
            sinv = 0.0
        qe, qo = _load_qk(
            Q, QB, bat, g, h, tt, rr, mc, offs_j, s_qb, s_ql, s_qr, s_qg, HAS_ANG, cosv, sinv,
            R, HALVES,
        )  # fmt: skip
        qe = _operand(qe, FAST)
        qo = _operand(qo, FAST)
        ke, ko = _load_qk(
            K, KB, bat, g, h, tt, rr, mc, offs_j, s_kb, s_kl, s_kr, s_kg, HAS_ANG, cosv, sinv,
            R, HALVES,
        )  # fmt: skip
        ke = _operand(ke, FAST)
        ko = _operand(ko, FAST)
        y = tl.exp(cs)[:, None] * (
            _dot(qe, tl.trans(_operand(se, FAST)), FAST)
            + _dot(qo, tl.trans(_operand(so, FAST)), FAST)
        )
        x, _x = _x_rows(V, PSI, bat, tt, rr, mc, h, s_vb, s_vl, s_vh, P, R)
        sc, _dec, w = _scores(qe, qo, ke, ko, cs, gamma, kappa, C * R, R, FAST)
        y += _dot(sc * w, x, FAST)
        if HAS_D:
            y += tl.load(DSKIP + h).to(tl.float32) * x
        tl.store(
            OUT + _row_offsets(bat, tt, rr, h, s_ob, s_ol, s_or, s_oh, P, R),
            y.to(OUT.dtype.element_ty),
            mask=mc[:, None],
        )
        # advance the running state past this tile
        xu = _operand(x * (tl.exp(a_c - cs) * kappa)[:, None], FAST)
        ea = tl.exp(a_c)
        se = ea * se + _dot(tl.trans(xu), ke, FAST)
        so = ea * so + _dot(tl.trans(xu), ko, FAST)
