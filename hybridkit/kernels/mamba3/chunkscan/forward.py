"""Forward kernels of the Triton SISO scan, launched in this order by :mod:`.op`:

1. ``_fwd_state_kernel`` (chunk x head): each chunk's own state contribution, its total log
   decay A_c and total angle Omega_c; saves the per-token gates for step 3;
2. ``_fwd_pass_kernel`` (sequence x head x row tile): the only sequential step, an
   element-wise walk over chunks that turns contributions into chunk start states;
3. ``_fwd_out_kernel`` (chunk x head): intra-chunk products plus the start state's
   contribution plus the D skip.

The math and the relative rotation frame are in ``docs/mamba3.md`` section 3.2.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hybridkit.kernels.mamba3.chunkscan.common import (
    _chunk,
    _dot,
    _expand_rows,
    _gates,
    _load_gates,
    _load_qk,
    _mod2pi,
    _operand,
    _pass_load,
    _pass_setup,
    _rotation,
    _row_offsets,
    _rows,
    _scores,
    _state_tile,
    _store_gates,
    _tokens,
    _x_rows,
)


@triton.jit
def _fwd_state_kernel(
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
):
    """Per (chunk, head): the chunk's own state contribution sum_t u_t x_t k~_t^T (its frame),
    its total log decay A_c and its total angle Omega_c."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    g = h // HPG
    bat, seq, tok_start, tok_end, seq_end = _chunk(gc, CHTAB, L, NC, C, VARLEN)
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    tt, rr, mc = _rows(tok_start, tok_end, C, R)
    tok, mtok = _tokens(tok_start, tok_end, C)
    adt, dt, gamma, kappa = _gates(
        ADT, DT, TRAP, bat, h, tok, mtok, seq_end, s_ab, s_ah, s_al, s_db, s_dh, s_dl, s_tb,
        s_th, s_tl, HAS_TRAP, FAST,
    )  # fmt: skip
    cs = tl.cumsum(adt, 0)
    a_c = tl.sum(adt, 0)
    _store_gates(GATES, bat, h, H, L, tok, mtok, gamma, kappa, cs)
    cs = _expand_rows(cs, R)
    kappa = _expand_rows(kappa, R)
    if HAS_ANG:
        om, _c, _s, cosv, sinv = _rotation(
            ANG, bat, h, tok, mtok, dt, NANG, s_gb, s_gs, s_gh, N2, NA, R, FAST
        )  # fmt: skip
        offs_a = tl.arange(0, NA)
        tl.store(OMEGA + (gc * H + h) * NANG + offs_a, om, mask=offs_a < NANG)
    else:
        cosv = 0.0
        sinv = 0.0
    ke, ko = _load_qk(
        K, KB, bat, g, h, tt, rr, mc, offs_j, s_kb, s_kl, s_kr, s_kg, HAS_ANG, cosv, sinv, R,
        HALVES,
    )  # fmt: skip
    ke = _operand(ke, FAST)
    ko = _operand(ko, FAST)
    x, _x = _x_rows(V, PSI, bat, tt, rr, mc, h, s_vb, s_vl, s_vh, P, R)
    xu = _operand(x * (tl.exp(a_c - cs) * kappa)[:, None], FAST)
    pe, po = _state_tile(STATES, gc, h, H, offs_p, offs_j, N2, P)
    tl.store(pe, _dot(tl.trans(xu), ke, FAST).to(STATES.dtype.element_ty))
    tl.store(po, _dot(tl.trans(xu), ko, FAST).to(STATES.dtype.element_ty))
    tl.store(DECAY + gc * H + h, a_c)


@triton.jit
def _fwd_pass_kernel(
    STATES,
    DECAY,
    OMEGA,
    INIT,
    END_STATE,
    TOTAL_ANGLE,
    SEQTAB,
    H,
    NANG,
    NC,
    NT,
    P: tl.constexpr,
    N2: tl.constexpr,
    PB: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_ANG: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Per (sequence, head, PB state rows): walk the chunks, replacing each chunk's own
    contribution in ``STATES`` by its start state (relative frame), then write the end state and
    the sequence's total angle (mod 2 pi). The next chunk's tile is loaded before the current
    one is used, so two loads are in flight per program."""
    seq, h, c0, nch, tile, offs_p = _pass_setup(SEQTAB, NC, NT, H, P, PB, VARLEN)
    offs_j = tl.arange(0, N2)
    mj = offs_j < NANG
    ie, io = _state_tile(INIT, seq, h, H, offs_p, offs_j, N2, P)
    if HAS_INIT:
        se = tl.load(ie)
        so = tl.load(io)
    else:
        se = tl.zeros((PB, N2), dtype=tl.float32)
        so = tl.zeros((PB, N2), dtype=tl.float32)
    tot = tl.zeros((N2,), dtype=tl.float32)
    last = tl.maximum(nch - 1, 0)
    de, do, a, om = _pass_load(STATES, DECAY, OMEGA, c0, h, H, NANG, offs_p, offs_j, mj, N2, P)
    for c in range(0, nch):
        slot = c0 + c
        ne, no, na, nom = _pass_load(
            STATES,
            DECAY,
            OMEGA,
            c0 + tl.minimum(c + 1, last),
            h,
            H,
            NANG,
            offs_p,
            offs_j,
            mj,
            N2,
            P,
        )
        pe, po = _state_tile(STATES, slot, h, H, offs_p, offs_j, N2, P)
        tl.store(pe, se.to(STATES.dtype.element_ty))
        tl.store(po, so.to(STATES.dtype.element_ty))
        ea = tl.exp(a)
        te = ea * se + de
        to = ea * so + do
        if HAS_ANG:
            cw = tl.cos(om)[None, :]
            sw = tl.sin(om)[None, :]
            se = cw * te + sw * to
            so = cw * to - sw * te
            tot = _mod2pi(tot + om)
        else:
            se = te
            so = to
        de, do, a, om = ne, no, na, nom
    fe, fo = _state_tile(END_STATE, seq, h, H, offs_p, offs_j, N2, P)
    tl.store(fe, se)
    tl.store(fo, so)
    if HAS_ANG:
        tl.store(
            TOTAL_ANGLE + (seq * H + h) * NANG + offs_j, tot, mask=mj & ((offs_j * 0 + tile) == 0)
        )


@triton.jit
def _fwd_out_kernel(
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
):
    """Per (chunk, head): y = (q~k~^T * W) x~ + exp(cs) q~ S~_c^T + D x~ on the chunk's rows."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    g = h // HPG
    bat, seq, tok_start, tok_end, seq_end = _chunk(gc, CHTAB, L, NC, C, VARLEN)
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    tt, rr, mc = _rows(tok_start, tok_end, C, R)
    tok, mtok = _tokens(tok_start, tok_end, C)
    gamma, kappa, cs = _load_gates(GATES, bat, h, H, L, tok, mtok, R)  # ``_fwd_state`` saved them
    if HAS_ANG:
        dt = tl.load(DT + bat * s_db + h * s_dh + tok * s_dl, mask=mtok, other=0.0)
        _om, _c, _s, cosv, sinv = _rotation(
            ANG, bat, h, tok, mtok, dt.to(tl.float32), NANG, s_gb, s_gs, s_gh, N2, NA, R, FAST
        )  # fmt: skip
    else:
        cosv = 0.0
        sinv = 0.0
    # rotate q and k right away (cos / sin die), keep them as dot operands only
    qe, qo = _load_qk(
        Q, QB, bat, g, h, tt, rr, mc, offs_j, s_qb, s_ql, s_qr, s_qg, HAS_ANG, cosv, sinv, R,
        HALVES,
    )  # fmt: skip
    qe = _operand(qe, FAST)
    qo = _operand(qo, FAST)
    ke, ko = _load_qk(
        K, KB, bat, g, h, tt, rr, mc, offs_j, s_kb, s_kl, s_kr, s_kg, HAS_ANG, cosv, sinv, R,
        HALVES,
    )  # fmt: skip
    ke = _operand(ke, FAST)
    ko = _operand(ko, FAST)
    # inter-chunk term first, so the state tile is dead before the C x C work starts
    pe, po = _state_tile(STATES, gc, h, H, offs_p, offs_j, N2, P)
    se = _operand(tl.load(pe), FAST)
    so = _operand(tl.load(po), FAST)
    y = tl.exp(cs)[:, None] * (_dot(qe, tl.trans(se), FAST) + _dot(qo, tl.trans(so), FAST))
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
