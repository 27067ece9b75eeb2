"""Backward kernels of the Triton SISO scan, launched in this order by :mod:`.op`:

1. ``_bwd_dstate_kernel`` (chunk x head): the state gradient each chunk's outputs send to its
   start state; saves the per-token gates and the cos / sin of the in-chunk angles;
2. ``_bwd_pass_kernel`` (sequence x head x row tile, last chunk first): turns those into the
   gradient of every chunk's end state and of the initial state;
3. ``_bwd_q_kernel``, ``_bwd_k_kernel``, ``_bwd_x_kernel`` (chunk x head): the gradients of
   q, k, x and of the per-token gates;
4. ``_bwd_gates_kernel`` (chunk x head): the angle, dt and trapezoid gradients, which need
   reverse scans over the tokens.

Per-head dq / dk (or, with the ``qk_heads`` setting, partial sums over a few heads each) and
the bias / D partial sums are reduced over heads and chunks by torch in :mod:`.op`. See
``docs/mamba3.md`` section 3.3 and ``docs/kernels.md``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hybridkit.kernels.mamba3.chunkscan.common import (
    PI,
    _chunk,
    _csn_offsets,
    _dot,
    _expand_rows,
    _gates,
    _load_csn,
    _load_gates,
    _load_qk,
    _masked_weights,
    _narrow,
    _operand,
    _pass_load,
    _pass_setup,
    _rank_sum,
    _rank_sum2,
    _rotation,
    _row_index,
    _row_offsets,
    _rows,
    _scores,
    _sigmoid,
    _state_load,
    _state_tile,
    _store_gates,
    _tanh,
    _token_pairs,
    _tokens,
    _x_rows,
)


@triton.jit
def _bwd_dstate_kernel(
    Q,
    ADT,
    DT,
    TRAP,
    QB,
    ANG,
    DOUT,
    CHTAB,
    DSTATES,
    DECAY,
    OMEGA,
    COS_SIN,
    GATES,
    s_qb,
    s_ql,
    s_qr,
    s_qg,
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
    HAS_TRAP: tl.constexpr,
    HAS_ANG: tl.constexpr,
    VARLEN: tl.constexpr,
    FAST: tl.constexpr,
    R: tl.constexpr,
    HALVES: tl.constexpr,
):
    """Per (chunk, head): the state gradient the chunk's outputs send to its start state,
    sum_t exp(cs_t) dy_t q~_t^T, plus A_c and Omega_c for the reverse pass, and the cos / sin
    of the in-chunk angles (``COS_SIN``) that the other backward chunk kernels load instead of
    recomputing the angle scan."""
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
    tl.store(DECAY + gc * H + h, tl.sum(adt, 0))
    _store_gates(
        GATES, bat, h, H, L, tok, mtok, gamma, kappa, cs
    )  # for ``_bwd_q`` / ``_k`` / ``_x``
    cs = _expand_rows(cs, R)
    if HAS_ANG:
        om, cos_a, sin_a, cosv, sinv = _rotation(
            ANG, bat, h, tok, mtok, dt, NANG, s_gb, s_gs, s_gh, N2, NA, R, FAST
        )  # fmt: skip
        offs_a = tl.arange(0, NA)
        ma = offs_a < NANG
        tl.store(OMEGA + (gc * H + h) * NANG + offs_a, om, mask=ma)
        # stored from the scan's own (pairs x tokens) tiles; see ``_csn_offsets``
        o = _csn_offsets(bat, tok, h, L, H, offs_a, NANG)
        m = ma[:, None] & mtok[None, :]
        tl.store(COS_SIN + o, cos_a.to(COS_SIN.dtype.element_ty), mask=m)
        tl.store(COS_SIN + o + NANG * L, sin_a.to(COS_SIN.dtype.element_ty), mask=m)
    else:
        cosv = 0.0
        sinv = 0.0
    qe, qo = _load_qk(
        Q, QB, bat, g, h, tt, rr, mc, offs_j, s_qb, s_ql, s_qr, s_qg, HAS_ANG, cosv, sinv, R,
        HALVES,
    )  # fmt: skip
    dy = tl.load(
        DOUT + _row_offsets(bat, tt, rr, h, s_ob, s_ol, s_or, s_oh, P, R),
        mask=mc[:, None],
        other=0.0,
    ).to(tl.float32)
    dye = _operand(dy * tl.exp(cs)[:, None], FAST)
    qe = _operand(qe, FAST)
    qo = _operand(qo, FAST)
    pe, po = _state_tile(DSTATES, gc, h, H, offs_p, offs_j, N2, P)
    tl.store(pe, _dot(tl.trans(dye), qe, FAST).to(DSTATES.dtype.element_ty))
    tl.store(po, _dot(tl.trans(dye), qo, FAST).to(DSTATES.dtype.element_ty))


@triton.jit
def _bwd_pass_kernel(
    DSTATES,
    DECAY,
    OMEGA,
    DEND_STATE,
    DINIT,
    SEQTAB,
    H,
    NANG,
    NC,
    NT,
    P: tl.constexpr,
    N2: tl.constexpr,
    PB: tl.constexpr,
    HAS_ANG: tl.constexpr,
    HAS_DSEND: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Per (sequence, head, PB state rows), last chunk first: replace each chunk's own
    state gradient in ``DSTATES`` by the gradient of its end state (in its frame, before the
    rotation by Omega_c) and write the gradient of the start state of the sequence.

    The scalars that need G^ and the start state S~ together (d A_c, the state's share of
    d Omega_c) are left to ``_bwd_x``: computed here, as row-tile partial sums, their
    reductions (across warps, in every step of a chain of dependent steps) and the extra read
    of S~ more than doubled this pass's time (docs/kernels.md, "Tried and dropped")."""
    seq, h, c0, nch, tile, offs_p = _pass_setup(SEQTAB, NC, NT, H, P, PB, VARLEN)
    offs_j = tl.arange(0, N2)
    mj = offs_j < NANG
    if HAS_DSEND:
        fe, fo = _state_tile(DEND_STATE, seq, h, H, offs_p, offs_j, N2, P)
        ge = tl.load(fe)
        go = tl.load(fo)
    else:  # the end state was not used
        ge = tl.zeros((PB, N2), dtype=tl.float32)
        go = tl.zeros((PB, N2), dtype=tl.float32)
    top = c0 + tl.maximum(nch - 1, 0)
    de, do, a, om = _pass_load(DSTATES, DECAY, OMEGA, top, h, H, NANG, offs_p, offs_j, mj, N2, P)
    for it in range(0, nch):
        slot = top - it
        # the next (earlier) chunk's tiles load while this one is processed
        prev = tl.maximum(slot - 1, c0)
        ne, no, na, nom = _pass_load(
            DSTATES, DECAY, OMEGA, prev, h, H, NANG, offs_p, offs_j, mj, N2, P
        )
        if HAS_ANG:
            cw = tl.cos(om)[None, :]
            sw = tl.sin(om)[None, :]
            re = cw * ge - sw * go
            ro = sw * ge + cw * go
        else:
            re = ge
            ro = go
        pe, po = _state_tile(DSTATES, slot, h, H, offs_p, offs_j, N2, P)
        tl.store(pe, re.to(DSTATES.dtype.element_ty))
        tl.store(po, ro.to(DSTATES.dtype.element_ty))
        ea = tl.exp(a)
        ge = ea * re + de
        go = ea * ro + do
        de, do, a, om = ne, no, na, nom
    ie, io = _state_tile(DINIT, seq, h, H, offs_p, offs_j, N2, P)
    tl.store(ie, ge)
    tl.store(io, go)


@triton.jit
def _chunk_tokens(CHTAB, gc, L, NC, C: tl.constexpr, R: tl.constexpr, VARLEN: tl.constexpr):
    """(batch row, sequence, row tokens, row ranks, row mask, tokens, token mask) of chunk slot
    ``gc``: the C * R (token, rank) rows and the C tokens (the same for SISO)."""
    bat, seq, tok_start, tok_end, _seq_end = _chunk(gc, CHTAB, L, NC, C, VARLEN)
    tt, rr, mc = _rows(tok_start, tok_end, C, R)
    if R == 1:
        return bat, seq, tt, rr, mc, tt, mc
    else:
        tok, mtok = _tokens(tok_start, tok_end, C)
        return bat, seq, tt, rr, mc, tok, mtok


@triton.jit
def _saved_gates(GATES, DECAY, bat, gc, h, H, L, tok, mtok, R: tl.constexpr):
    """gamma, kappa and the in-chunk cumsum of adt that ``_bwd_dstate`` saved, and the chunk's
    total log decay A_c."""
    gamma, kappa, cs = _load_gates(GATES, bat, h, H, L, tok, mtok, R)
    return gamma, kappa, cs, tl.load(DECAY + gc * H + h)


@triton.jit
def _rotated_qk(
    Q, K, QB, KB, COS_SIN, bat, h, HPG, tt, rr, mc, tok, mtok, L, H, NANG, s_qb, s_ql, s_qr,
    s_qg, s_kb, s_kl, s_kr, s_kg, N2: tl.constexpr, NA: tl.constexpr, HAS_ANG: tl.constexpr,
    FAST: tl.constexpr, R: tl.constexpr, HALVES: tl.constexpr,
):  # fmt: skip
    """q~ and k~ of one chunk's rows (bias added, rotated by the in-chunk angles whose cos / sin
    ``_bwd_dstate`` stored in ``COS_SIN``) as pair-half dot operands (bf16 in fast mode: half the
    registers of four C x N/2 tiles)."""
    offs_j = tl.arange(0, N2)
    if HAS_ANG:
        cosv, sinv = _load_csn(COS_SIN, bat, tok, mtok, h, L, H, NANG, N2, NA, R)
    else:
        cosv = 0.0
        sinv = 0.0
    g = h // HPG
    qe, qo = _load_qk(
        Q, QB, bat, g, h, tt, rr, mc, offs_j, s_qb, s_ql, s_qr, s_qg, HAS_ANG, cosv, sinv, R,
        HALVES,
    )  # fmt: skip
    ke, ko = _load_qk(
        K, KB, bat, g, h, tt, rr, mc, offs_j, s_kb, s_kl, s_kr, s_kg, HAS_ANG, cosv, sinv, R,
        HALVES,
    )  # fmt: skip
    return _operand(qe, FAST), _operand(qo, FAST), _operand(ke, FAST), _operand(ko, FAST)


@triton.jit
def _dy_rows(DY, bat, tt, rr, mc, h, s_b, s_l, s_r, s_h, P: tl.constexpr, R: tl.constexpr,
             FAST: tl.constexpr):  # fmt: skip
    """The (C * R) x P rows of dy of one head as a dot operand; padded tokens are zero."""
    rows = tl.load(
        DY + _row_offsets(bat, tt, rr, h, s_b, s_l, s_r, s_h, P, R), mask=mc[:, None], other=0.0
    )
    return _operand(rows, FAST)


@triton.jit
def _store_qk_grad(
    DHEADS, DBIAS_PART, de, do, COS_SIN, NANG, bat, L, tt, rr, mc, tok, mtok, H, h, gc, i,
    N2: tl.constexpr, NA: tl.constexpr, HAS_ANG: tl.constexpr, R: tl.constexpr,
    HALVES: tl.constexpr, HS: tl.constexpr,
):  # fmt: skip
    """Rotate a q~ / k~ gradient back to the input frame (cos / sin loaded again from
    ``COS_SIN``); store it per (row, head) in the input's pair order, and its per-(chunk, head,
    rank) column sum (the bias gradient's partial sum).

    With ``HS`` > 1 heads per program, ``DHEADS`` has one fp32 slot per ``HS`` heads (head
    ``h`` goes to slot ``h // HS``) and the program's ``i``-th head adds to what its earlier
    heads stored there: the partial group sum the caller finishes."""
    if HAS_ANG:
        cosv, sinv = _load_csn(COS_SIN, bat, tok, mtok, h, L, H, NANG, N2, NA, R)
        ue = de * cosv + do * sinv
        uo = do * cosv - de * sinv
    else:
        ue = de
        uo = do
    if HALVES:  # [first half, second half]
        u = tl.reshape(tl.permute(tl.join(ue, uo), (0, 2, 1)), (tt.shape[0], 2 * N2))
    else:  # interleaved pairs again: whole contiguous rows
        u = tl.reshape(tl.join(ue, uo), (tt.shape[0], 2 * N2))
    offs_n = tl.arange(0, 2 * N2)
    slots = H // HS
    slot = h // HS
    if R == 1:
        hb = ((bat * L + tt[:, None]) * slots + slot) * (2 * N2) + offs_n[None, :]
    else:  # (B, L, R, slots, N)
        hb = ((bat * L + tt[:, None]) * R + rr[:, None]) * slots + slot
        hb = hb * (2 * N2) + offs_n[None, :]
    if HS == 1:
        tl.store(DHEADS + hb, u.to(DHEADS.dtype.element_ty), mask=mc[:, None])
    else:
        # the earlier heads' stores to these addresses were made by other threads of this
        # program: the barrier makes them visible (global memory, one CTA)
        tl.debug_barrier()
        before = tl.load(DHEADS + hb, mask=mc[:, None] & (i > 0), other=0.0)
        tl.store(DHEADS + hb, before + u, mask=mc[:, None])
    if R == 1:
        tl.store(DBIAS_PART + (gc * H + h) * (2 * N2) + offs_n, tl.sum(u, 0))
    else:  # (chunks, H, R, N) partial sums
        part = tl.sum(tl.reshape(u, (tt.shape[0] // R, R, 2 * N2)), 0)
        offs_r = tl.arange(0, R)
        tl.store(
            DBIAS_PART + ((gc * H + h) * R + offs_r[:, None]) * (2 * N2) + offs_n[None, :], part
        )


@triton.jit
def _pw(dy, x, cs, gamma, kappa, CR: tl.constexpr, R: tl.constexpr, FAST: tl.constexpr):
    """dP * W: the gradient of the masked score matrix (dP = dy x~^T)."""
    _dec, w = _masked_weights(cs, gamma, kappa, CR, R)
    return _dot(dy, tl.trans(x), FAST) * w


@triton.jit
def _head_rows(
    Q, K, V, PSI, GATES, DECAY, QB, KB, ANG, DY, CHTAB, s_qb, s_ql, s_qr, s_qg, s_kb, s_kl,
    s_kr, s_kg, s_vb, s_vl, s_vh, s_yb, s_yl, s_yr, s_yh, L, H, HPG, NANG, NC, gc, h,
    C: tl.constexpr, P: tl.constexpr, N2: tl.constexpr, NA: tl.constexpr,
    HAS_ANG: tl.constexpr, VARLEN: tl.constexpr, FAST: tl.constexpr, R: tl.constexpr,
    HALVES: tl.constexpr,
):  # fmt: skip
    """What the q and k sides load for head ``h`` of chunk slot ``gc``: the chunk's rows and
    tokens, the saved gates, the rotated q~ / k~ (even and odd halves), the x~ and dy rows as
    dot operands, and the offsets of the per-token and per-row buffers (the compiler drops what
    a side does not use). One function for the three sides, in one order: their kernels compile
    as when each loaded these itself."""
    bat, seq, tt, rr, mc, tok, mtok = _chunk_tokens(CHTAB, gc, L, NC, C, R, VARLEN)
    gamma, kappa, cs, a_c = _saved_gates(GATES, DECAY, bat, gc, h, H, L, tok, mtok, R)
    u = tl.exp(a_c - cs) * kappa  # the k and x sides' weight of the end state (q drops it)
    qe, qo, ke, ko = _rotated_qk(
        Q, K, QB, KB, ANG, bat, h, HPG, tt, rr, mc, tok, mtok, L, H, NANG, s_qb, s_ql, s_qr,
        s_qg, s_kb, s_kl, s_kr, s_kg, N2, NA, HAS_ANG, FAST, R, HALVES,
    )  # fmt: skip
    x_t, _x = _x_rows(V, PSI, bat, tt, rr, mc, h, s_vb, s_vl, s_vh, P, R)
    x = _operand(x_t, FAST)
    dy = _dy_rows(DY, bat, tt, rr, mc, h, s_yb, s_yl, s_yr, s_yh, P, R, FAST)
    bo = (bat * H + h) * L + tok  # (B, H, L) per-token buffers (the x side's)
    bw = (bat * H + h) * (L * R) + _row_index(tt, rr, R)  # (B, H, L * R) per-row buffers
    return bat, seq, tt, rr, mc, tok, mtok, gamma, kappa, cs, a_c, u, qe, qo, ke, ko, x, dy, bo, bw


@triton.jit
def _bwd_q_head(
    Q, K, V, PSI, GATES, DECAY, QB, KB, ANG, DY, CHTAB, STATES, DQ_HEADS, DQ_BIAS_PART, DTHETA,
    DCS_STATE, s_qb, s_ql, s_qr, s_qg, s_kb, s_kl, s_kr, s_kg, s_vb, s_vl, s_vh, s_yb, s_yl, s_yr,
    s_yh, L, H, HPG, NANG, NC, gc, h, i, C: tl.constexpr, P: tl.constexpr, N2: tl.constexpr,
    NA: tl.constexpr, HAS_ANG: tl.constexpr, HAS_D: tl.constexpr, VARLEN: tl.constexpr,
    FAST: tl.constexpr, R: tl.constexpr, HALVES: tl.constexpr, HS: tl.constexpr,
):  # fmt: skip
    """One head of ``_bwd_q_kernel``'s program (the ``i``-th of its ``HS``)."""
    bat, seq, tt, rr, mc, tok, mtok, gamma, kappa, cs, a_c, u, qe, qo, ke, ko, x, dy, bo, bw = (
        _head_rows(
            Q, K, V, PSI, GATES, DECAY, QB, KB, ANG, DY, CHTAB, s_qb, s_ql, s_qr, s_qg, s_kb,
            s_kl, s_kr, s_kg, s_vb, s_vl, s_vh, s_yb, s_yl, s_yr, s_yh, L, H, HPG, NANG, NC, gc,
            h, C, P, N2, NA, HAS_ANG, VARLEN, FAST, R, HALVES,
        )
    )  # fmt: skip
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    eq = tl.exp(cs)
    pe, po = _state_tile(STATES, gc, h, H, offs_p, offs_j, N2, P)
    se = _operand(tl.load(pe), FAST)
    so = _operand(tl.load(po), FAST)
    pw = _operand(_pw(dy, x, cs, gamma, kappa, C * R, R, FAST), FAST)
    ie = _dot(dy, se, FAST)
    io = _dot(dy, so, FAST)
    tl.store(DCS_STATE + bw, eq * (tl.sum(ie * qe, 1) + tl.sum(io * qo, 1)), mask=mc)
    dqe = _dot(pw, ke, FAST) + eq[:, None] * ie
    dqo = _dot(pw, ko, FAST) + eq[:, None] * io
    if HAS_ANG:  # the q share of d theta per token (scanned by ``_bwd_gates``), tokens last
        offs_a = tl.arange(0, NA)
        tl.store(
            DTHETA + ((bat * H + h) * NANG + offs_a[None, :]) * L + tok[:, None],
            _rank_sum2(_narrow(dqo * qe - dqe * qo, NA), R),
            mask=mtok[:, None] & (offs_a < NANG)[None, :],
        )
    _store_qk_grad(
        DQ_HEADS, DQ_BIAS_PART, dqe, dqo, ANG, NANG, bat, L, tt, rr, mc, tok, mtok, H, h, gc, i,
        N2, NA, HAS_ANG, R, HALVES, HS,
    )  # fmt: skip


_bwd_q_head_call = triton.jit(noinline=True)(_bwd_q_head.fn)


@triton.jit
def _bwd_q_kernel(
    Q,
    K,
    V,
    PSI,
    GATES,
    DECAY,
    QB,
    KB,
    ANG,
    DY,
    CHTAB,
    STATES,
    DQ_HEADS,
    DQ_BIAS_PART,
    DTHETA,
    DCS_STATE,
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
    s_yb,
    s_yl,
    s_yr,
    s_yh,
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
    HS: tl.constexpr,
):
    """Per (chunk, ``HS`` heads of one group), q side: dq per head, or with ``HS`` > 1 added
    over the program's heads (summed over the group by the caller), its bias partial sum, the
    per-token q share of d theta (``DTHETA``, tokens last), and ``DCS_STATE`` (d cs through
    exp(cs) q~ S~) for ``_bwd_x``. (d A_c and the state's share of
    d Omega_c, which pair S~ with the end-state gradient, are computed at the end of
    ``_bwd_x``.)

    The q and k sides are separate kernels: merged, they were barely faster and made an
    illegal memory access at bf16, N 64, P 64 (docs/kernels.md, "Tried and dropped")."""
    pid = tl.program_id(0)
    first = (pid % (H // HS)).to(tl.int64) * HS  # this program's first head (of HS, one group)
    gc = (pid // (H // HS)).to(tl.int64)
    if HS == 1:
        _bwd_q_head(
            Q, K, V, PSI, GATES, DECAY, QB, KB, ANG, DY, CHTAB, STATES, DQ_HEADS, DQ_BIAS_PART,
            DTHETA, DCS_STATE, s_qb, s_ql, s_qr, s_qg, s_kb, s_kl, s_kr, s_kg, s_vb, s_vl, s_vh,
            s_yb, s_yl, s_yr, s_yh, L, H, HPG, NANG, NC, gc, first, 0, C, P, N2, NA, HAS_ANG, HAS_D,
            VARLEN, FAST, R, HALVES, HS,
        )  # fmt: skip
    else:  # a call per head, not inlined: the body inlined in a loop (or unrolled) spilled
        # 550-3,300 bytes for sm_90, called 20 + 92 (ptxas; it serializes the callee's wgmma)
        for i in range(HS):
            _bwd_q_head_call(
                Q, K, V, PSI, GATES, DECAY, QB, KB, ANG, DY, CHTAB, STATES, DQ_HEADS, DQ_BIAS_PART,
                DTHETA, DCS_STATE, s_qb, s_ql, s_qr, s_qg, s_kb, s_kl, s_kr, s_kg, s_vb, s_vl, s_vh,
                s_yb, s_yl, s_yr, s_yh, L, H, HPG, NANG, NC, gc, first + i, i, C, P, N2, NA,
                HAS_ANG, HAS_D, VARLEN, FAST, R, HALVES, HS,
            )  # fmt: skip


@triton.jit
def _bwd_k_head(
    Q, K, V, PSI, GATES, DECAY, QB, KB, ANG, DY, CHTAB, DSTATES, DTOTAL_ANGLE, DTHETA, DOMEGA,
    DK_HEADS, DK_BIAS_PART, DU, s_qb, s_ql, s_qr, s_qg, s_kb, s_kl, s_kr, s_kg, s_vb, s_vl, s_vh,
    s_yb, s_yl, s_yr, s_yh, L, H, HPG, NANG, NC, gc, h, i, C: tl.constexpr, P: tl.constexpr,
    N2: tl.constexpr, NA: tl.constexpr, HAS_ANG: tl.constexpr, HAS_D: tl.constexpr,
    VARLEN: tl.constexpr, FAST: tl.constexpr, HAS_DTOT: tl.constexpr, R: tl.constexpr,
    HALVES: tl.constexpr, HS: tl.constexpr,
):  # fmt: skip
    """One head of ``_bwd_k_kernel``'s program (the ``i``-th of its ``HS``)."""
    bat, seq, tt, rr, mc, tok, mtok, gamma, kappa, cs, a_c, u, qe, qo, ke, ko, x, dy, bo, bw = (
        _head_rows(
            Q, K, V, PSI, GATES, DECAY, QB, KB, ANG, DY, CHTAB, s_qb, s_ql, s_qr, s_qg, s_kb,
            s_kl, s_kr, s_kg, s_vb, s_vl, s_vh, s_yb, s_yl, s_yr, s_yh, L, H, HPG, NANG, NC, gc,
            h, C, P, N2, NA, HAS_ANG, VARLEN, FAST, R, HALVES,
        )
    )  # fmt: skip
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    mj = offs_j < NANG
    pe, po = _state_tile(DSTATES, gc, h, H, offs_p, offs_j, N2, P)
    ge = _operand(tl.load(pe), FAST)
    go = _operand(tl.load(po), FAST)
    ve = _dot(x, ge, FAST)
    vv = _dot(x, go, FAST)
    tl.store(DU + bw, tl.sum(ve * ke, 1) + tl.sum(vv * ko, 1), mask=mc)
    pw = _operand(_pw(dy, x, cs, gamma, kappa, C * R, R, FAST), FAST)
    dke = _dot(tl.trans(pw), qe, FAST) + u[:, None] * ve
    dko = _dot(tl.trans(pw), qo, FAST) + u[:, None] * vv
    if HAS_ANG:
        # in-chunk angles: every later token of the chunk; Omega_c: the whole chunk (through
        # the rotation of the end state); the sequence total: every token of the sequence
        d_om = tl.sum(u[:, None] * (ve * ko - vv * ke), 0)
        if HAS_DTOT:  # the sequence's total angle was used
            d_om += tl.load(DTOTAL_ANGLE + (seq * H + h) * NANG + offs_j, mask=mj, other=0.0)
        tl.store(DOMEGA + (gc * H + h) * NANG + offs_j, d_om, mask=mj)  # ``_bwd_x`` completes it
        offs_a = tl.arange(0, NA)
        am = mtok[:, None] & (offs_a < NANG)[None, :]
        ao = ((bat * H + h) * NANG + offs_a[None, :]) * L + tok[:, None]
        r = _rank_sum2(_narrow(dko * ke - dke * ko, NA), R)
        tl.store(DTHETA + ao, r + tl.load(DTHETA + ao, mask=am, other=0.0), mask=am)
    _store_qk_grad(
        DK_HEADS, DK_BIAS_PART, dke, dko, ANG, NANG, bat, L, tt, rr, mc, tok, mtok, H, h, gc, i,
        N2, NA, HAS_ANG, R, HALVES, HS,
    )  # fmt: skip


_bwd_k_head_call = triton.jit(noinline=True)(_bwd_k_head.fn)


@triton.jit
def _bwd_k_kernel(
    Q,
    K,
    V,
    PSI,
    GATES,
    DECAY,
    QB,
    KB,
    ANG,
    DY,
    CHTAB,
    DSTATES,
    DTOTAL_ANGLE,
    DTHETA,
    DOMEGA,
    DK_HEADS,
    DK_BIAS_PART,
    DU,
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
    s_yb,
    s_yl,
    s_yr,
    s_yh,
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
    HAS_DTOT: tl.constexpr,
    R: tl.constexpr,
    HALVES: tl.constexpr,
    HS: tl.constexpr,
):
    """Per (chunk, ``HS`` heads of one group), k side: dk as the q side's dq, its bias
    partial sum, ``DU`` (d u per token)
    and the angle-gradient terms ``_bwd_gates`` finishes: the per-token k share of d theta added
    to the q share in ``DTHETA``, and in ``DOMEGA`` the whole gradient every token of the chunk gets
    (d Omega_c through the rotation of the end state, plus the sequence total's ``DTOTAL_ANGLE``;
    ``_bwd_x`` adds the share of the state S~)."""
    pid = tl.program_id(0)
    first = (pid % (H // HS)).to(tl.int64) * HS  # this program's first head (of HS, one group)
    gc = (pid // (H // HS)).to(tl.int64)
    if HS == 1:
        _bwd_k_head(
            Q, K, V, PSI, GATES, DECAY, QB, KB, ANG, DY, CHTAB, DSTATES, DTOTAL_ANGLE, DTHETA,
            DOMEGA, DK_HEADS, DK_BIAS_PART, DU, s_qb, s_ql, s_qr, s_qg, s_kb, s_kl, s_kr, s_kg,
            s_vb, s_vl, s_vh, s_yb, s_yl, s_yr, s_yh, L, H, HPG, NANG, NC, gc, first, 0, C, P, N2,
            NA, HAS_ANG, HAS_D, VARLEN, FAST, HAS_DTOT, R, HALVES, HS,
        )  # fmt: skip
    else:  # a call per head, not inlined: the body inlined in a loop (or unrolled) spilled
        # 550-3,300 bytes for sm_90, called 20 + 92 (ptxas; it serializes the callee's wgmma)
        for i in range(HS):
            _bwd_k_head_call(
                Q, K, V, PSI, GATES, DECAY, QB, KB, ANG, DY, CHTAB, DSTATES, DTOTAL_ANGLE, DTHETA,
                DOMEGA, DK_HEADS, DK_BIAS_PART, DU, s_qb, s_ql, s_qr, s_qg, s_kb, s_kl, s_kr, s_kg,
                s_vb, s_vl, s_vh, s_yb, s_yl, s_yr, s_yh, L, H, HPG, NANG, NC, gc, first + i, i, C,
                P, N2, NA, HAS_ANG, HAS_D, VARLEN, FAST, HAS_DTOT, R, HALVES, HS,
            )  # fmt: skip


@triton.jit
def _bwd_gates_kernel(
    ANG,
    DT,
    TRAP,
    DTHETA,
    DOMEGA,
    CHTAB,
    SEQTAB,
    DGAMMA,
    DKAPPA,
    DANG,
    DDT,
    DTRAP,
    s_gb,
    s_gs,
    s_gh,
    s_db,
    s_dh,
    s_dl,
    s_tb,
    s_th,
    s_tl,
    L,
    H,
    NANG,
    NC,
    C: tl.constexpr,
    NA: tl.constexpr,
    HAS_ANG: tl.constexpr,
    HAS_TRAP: tl.constexpr,
    VARLEN: tl.constexpr,
    FAST: tl.constexpr,
):
    """Per (chunk, head), after ``_bwd_x``: d angles and the gradients of dt and trap.

    d theta_t is the reverse in-chunk cumsum of the per-token terms (``DTHETA``, q and k shares)
    plus the chunk's ``DOMEGA``; d omega = d theta * pi (1 - tanh^2) dt, and dt gets
    sum_j d theta * pi tanh. The scan runs here because a scan over tokens is cheap only along
    a tile's contiguous axis (pairs x tokens, tokens contiguous); inside ``_bwd_q`` / ``_bwd_k``
    it was ~550 shared-memory instructions per thread in kernels already at 255 registers.

    Gates (gamma_t = lam_t dt_t, kappa_t = gamma_t + (1 - lam_{t+1}) dt_{t+1}): with
    dg_t = d gamma_t + d kappa_t and the predecessor's d kappa_{t-1} (none at a sequence
    start), d dt_t = lam_t dg_t + (1 - lam_t) d kappa_{t-1} and d trap_t = (dg_t - d kappa_{t-1})
    dt_t lam_t (1 - lam_t). Done here instead of ~11 torch ops on (B, H, L) tensors, which at
    batch 1 were host time on the critical path."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    bat, seq, tok_start, tok_end, seq_end = _chunk(gc, CHTAB, L, NC, C, VARLEN)
    offs_c = tl.arange(0, C)
    tt = tok_start + offs_c
    mc = tt < tok_end
    dt = tl.load(DT + bat * s_db + h * s_dh + tt * s_dl, mask=mc, other=0.0).to(tl.float32)
    bo = (bat * H + h) * L + tt
    dg = tl.load(DGAMMA + bo, mask=mc, other=0.0) + tl.load(DKAPPA + bo, mask=mc, other=0.0)
    if HAS_ANG:
        offs_j = tl.arange(0, NA)  # the rotated pairs only (see ``_rotation``)
        mj = offs_j < NANG
        am = mj[:, None] & mc[None, :]
        ang = tl.load(
            ANG + bat * s_gb + h * s_gh + offs_j[:, None] * s_gs + tt[None, :], mask=am, other=0.0
        ).to(tl.float32)
        t = _tanh(ang, FAST)
        a = tl.load(
            DTHETA + ((bat * H + h) * NANG + offs_j[:, None]) * L + tt[None, :], mask=am, other=0.0
        )
        d_om = tl.load(DOMEGA + (gc * H + h) * NANG + offs_j, mask=mj, other=0.0)
        dth = tl.where(am, tl.cumsum(a, 1, reverse=True) + d_om[:, None], 0.0)
        tl.store(
            DANG + ((bat * L + tt[None, :]) * H + h) * NANG + offs_j[:, None],
            (dth * PI * (1.0 - t * t) * dt[None, :]).to(DANG.dtype.element_ty),
            mask=am,
        )
        d_dt = tl.sum(dth * PI * t, 0)
    else:
        d_dt = dt * 0.0
    if HAS_TRAP:
        lam = _sigmoid(
            tl.load(TRAP + bat * s_tb + h * s_th + tt * s_tl, mask=mc, other=0.0).to(tl.float32),
            FAST,
        )
        # the first token of a sequence has no predecessor; its chunk is the sequence's first
        if VARLEN:
            c0 = tl.load(SEQTAB + seq * 2)
        else:
            c0 = gc - gc % NC
        mp = mc & ((tt > tok_start) | (offs_c * 0 + gc > c0))
        dkp = tl.load(DKAPPA + bo - 1, mask=mp, other=0.0)
        d_dt += lam * dg + (1.0 - lam) * dkp
        dtr = (dg - dkp) * dt * lam * (1.0 - lam)
        tl.store(DTRAP + bo, dtr.to(DTRAP.dtype.element_ty), mask=mc)
    else:
        d_dt += dg
    tl.store(DDT + bo, d_dt.to(DDT.dtype.element_ty), mask=mc)


@triton.jit
def _bwd_x_kernel(
    Q,
    K,
    V,
    PSI,
    GATES,
    DECAY,
    QB,
    KB,
    ANG,
    DSKIP,
    DY,
    CHTAB,
    DSTATES,
    DCS_STATE,
    DU,
    STATES,
    DOMEGA,
    DX,
    DADT,
    DKAPPA,
    DGAMMA,
    DD_PART,
    DPSI_PART,
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
    s_yb,
    s_yl,
    s_yr,
    s_yh,
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
    """Per (chunk, head): dx (intra-chunk, through the end state, D skip), D's partial sum and
    the gradients of the per-token gates (d adt, d kappa, d gamma), using the per-token terms
    ``_bwd_q`` and ``_bwd_k`` stored."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    bat, seq, tt, rr, mc, tok, mtok, gamma, kappa, cs, a_c, u, qe, qo, ke, ko, x, dy, bo, bw = (
        _head_rows(
            Q, K, V, PSI, GATES, DECAY, QB, KB, ANG, DY, CHTAB, s_qb, s_ql, s_qr, s_qg, s_kb,
            s_kl, s_kr, s_kg, s_vb, s_vl, s_vh, s_yb, s_yl, s_yr, s_yh, L, H, HPG, NANG, NC, gc,
            h, C, P, N2, NA, HAS_ANG, VARLEN, FAST, R, HALVES,
        )
    )  # fmt: skip
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    mj = offs_j < NANG
    sc, dec, w = _scores(qe, qo, ke, ko, cs, gamma, kappa, C * R, R, FAST)
    pe, po = _state_tile(DSTATES, gc, h, H, offs_p, offs_j, N2, P)
    ge = _operand(tl.load(pe), FAST)
    go = _operand(tl.load(po), FAST)
    dx = _dot(tl.trans(sc * w), dy, FAST)
    dx += u[:, None] * (_dot(ke, tl.trans(ge), FAST) + _dot(ko, tl.trans(go), FAST))
    if HAS_D:
        dx += tl.load(DSKIP + h).to(tl.float32) * dy
        tl.store(DD_PART + gc * H + h, tl.sum(tl.sum(dy.to(tl.float32) * x.to(tl.float32), 1), 0))
    if R == 1:
        co = ((bat * L + tt[:, None]) * H + h) * P + offs_p[None, :]  # dx is contiguous
        tl.store(DX + co, dx.to(DX.dtype.element_ty), mask=mc[:, None])
    else:  # dx = sum_r psi_r dx~_r; d psi_r = sum_t x_t dx~_{t,r} (per-chunk partial sums)
        # psi and the raw x rows are loaded again here (L1 / L2 hits) rather than kept live
        # through the kernel: two more fp32 tiles there spilled
        _xt, x_raw = _x_rows(V, PSI, bat, tt, rr, mc, h, s_vb, s_vl, s_vh, P, R)
        psi = tl.load(PSI + (h * R + rr[:, None]) * P + offs_p[None, :]).to(tl.float32)
        co = ((bat * L + tok[:, None]) * H + h) * P + offs_p[None, :]
        tl.store(DX + co, _rank_sum2(dx * psi, R).to(DX.dtype.element_ty), mask=mtok[:, None])
        dpsi = tl.sum(tl.reshape(dx * x_raw, (C, R, P)), 0)
        offs_r = tl.arange(0, R)
        tl.store(DPSI_PART + ((gc * H + h) * R + offs_r[:, None]) * P + offs_p[None, :], dpsi)
    dwt = _dot(dy, tl.trans(x), FAST) * sc
    du = tl.load(DU + bw, mask=mc, other=0.0)
    wd = dwt * dec
    # column sums cross warps (shared memory): sum_i wd_ij kappa_j is kappa_j times the one
    # column sum that d kappa needs too, so one such reduction serves both
    cd = tl.sum(wd, 0)
    tl.store(DKAPPA + bo, _rank_sum(tl.exp(a_c - cs) * du + cd, R), mask=mtok)
    dcs = tl.load(DCS_STATE + bw, mask=mc, other=0.0) + tl.sum(wd * kappa[None, :], 1)
    dcs -= kappa * cd + u * du
    # d adt_t: every row of a token at or after t
    dadt = tl.cumsum(_rank_sum(dcs, R), 0, reverse=True)
    dadt += tl.sum(u * du, 0)
    _ii, _jj = _token_pairs(C * R, R)
    tl.store(DGAMMA + bo, _rank_sum(tl.sum(tl.where(_ii == _jj, dwt, 0.0), 1), R), mask=mtok)
    # last, when the chunk tiles are dead: G^ (again, from L2) and the start state S~ for
    # d A_c's state term exp(A_c) <S~, G^> and the state's share of d Omega_c,
    # exp(A_c) sum_p (G^e S~o - G^o S~e)
    ea = tl.exp(a_c)
    ge, go = _state_load(DSTATES, gc, h, H, offs_p, offs_j, N2, P)
    se, so = _state_load(STATES, gc, h, H, offs_p, offs_j, N2, P)
    tl.store(DADT + bo, dadt + ea * tl.sum(tl.sum(se * ge + so * go, 1), 0), mask=mtok)
    if HAS_ANG:
        om = DOMEGA + (gc * H + h) * NANG + offs_j
        d_om = ea * tl.sum(ge * so - go * se, 0)
        tl.store(om, tl.load(om, mask=mj, other=0.0) + d_om, mask=mj)
