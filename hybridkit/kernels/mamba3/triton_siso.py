"""Triton kernels for the Mamba-3 SISO chunked scan (forward and backward).

Work decomposition (spec 3.2, made chunk-parallel where the official kernel is not):

* A *segment* is a run of ``seg_chunks`` consecutive chunks of one sequence. One program owns one
  (segment, head) and walks the segment's chunks in order, carrying the P x N state in registers
  (as two P x N/2 tiles: even and odd state columns, so the interleaved rotary pairs are plain
  element-wise operations and no shuffles are needed).
* With one segment per sequence (large batch x heads) the forward is a single launch, like the
  official kernel. With several (small batch, long sequences) a *local* pass computes every
  segment's end state from zero in its own rotary frame, a short *chain* pass per (sequence,
  head) turns those into each segment's true start state (rotating the local states by the
  segment's start angle), and the main pass runs all segments in parallel. The backward mirrors
  this with the state gradient flowing in reverse.
* The state carried between chunks and segments is the "pre-added" one of spec 2.7, so every
  token of the next chunk sees the previous token's trapezoid term through the ordinary decay.

Precision: ``FAST`` selects bf16 tensor-core operands (fp32 accumulate) and PTX approximations
of tanh / sin / cos; otherwise dots are fp32 with ``input_precision="ieee"`` and transcendentals
are exact ``tl`` functions (also what the CPU interpreter can run). All offsets that involve a
token, batch or chunk index are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

PI = tl.constexpr(3.141592653589793)
TWO_PI = tl.constexpr(6.283185307179586)

# ----------------------------------------------------------------------------- helpers


@triton.jit
def _mod2pi(x):
    return x - TWO_PI * tl.floor(x * (1.0 / TWO_PI))


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _cos(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise(
            "cos.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.cos(x)


@triton.jit
def _sin(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise(
            "sin.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.sin(x)


@triton.jit
def _dot(a, b, FAST: tl.constexpr):
    if FAST:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _band(m, c):
    """``m & c`` for a boolean tile m and a scalar c, in a form the CPU interpreter accepts."""
    return m & ((m.to(tl.int32) * 0 + c.to(tl.int32)) != 0)


@triton.jit
def _segment(seg, SEGTAB, L, NSEG, SEG_CH, NC, C: tl.constexpr, VARLEN: tl.constexpr):
    """(batch, seq, tok_start, tok_end, seq_start, seq_end, chunk_base, is_first, is_last)."""
    if VARLEN:
        row = SEGTAB + seg.to(tl.int64) * 8
        seq = tl.load(row)
        tok_start = tl.load(row + 1)
        tok_end = tl.load(row + 2)
        seq_start = tl.load(row + 3)
        seq_end = tl.load(row + 4)
        chunk_base = tl.load(row + 5)
        is_first = tl.load(row + 6) != 0
        is_last = tl.load(row + 7) != 0
        bat = seq * 0
    else:
        seq = (seg // NSEG).to(tl.int64)
        j = (seg % NSEG).to(tl.int64)
        tok_start = j * SEG_CH * C
        tok_end = tl.minimum(tok_start + SEG_CH * C, L)
        seq_start = seq * 0
        seq_end = seq * 0 + L
        chunk_base = seq * NC + j * SEG_CH
        is_first = j == 0
        is_last = j == NSEG - 1
        bat = seq
    return bat, seq, tok_start, tok_end, seq_start, seq_end, chunk_base, is_first, is_last


@triton.jit
def _gates(
    ADT,
    DT,
    TRAP,
    bat,
    h,
    tt,
    mc,
    seq_end,
    s_ab,
    s_ah,
    s_al,
    s_db,
    s_dh,
    s_dl,
    s_tb,
    s_th,
    s_tl,
    HAS_TRAP: tl.constexpr,
):
    """Per-token scalars of one chunk: adt, dt, gamma, kappa (padded rows: zeros)."""
    adt = tl.load(ADT + bat * s_ab + h * s_ah + tt * s_al, mask=mc, other=0.0).to(tl.float32)
    dt = tl.load(DT + bat * s_db + h * s_dh + tt * s_dl, mask=mc, other=0.0).to(tl.float32)
    mn = mc & (tt + 1 < seq_end)
    dtn = tl.load(DT + bat * s_db + h * s_dh + (tt + 1) * s_dl, mask=mn, other=0.0).to(tl.float32)
    if HAS_TRAP:
        lam = tl.sigmoid(
            tl.load(TRAP + bat * s_tb + h * s_th + tt * s_tl, mask=mc, other=0.0).to(tl.float32)
        )
        lamn = tl.sigmoid(
            tl.load(TRAP + bat * s_tb + h * s_th + (tt + 1) * s_tl, mask=mn, other=0.0).to(
                tl.float32
            )
        )
        gamma = lam * dt
        eta = (1.0 - lamn) * dtn
    else:
        gamma = dt
        eta = dtn * 0.0
    return adt, dt, gamma, gamma + eta


@triton.jit
def _load_qk(
    Qp,
    QB,
    bat,
    g,
    h,
    tt,
    mc,
    offs_j,
    s_b,
    s_l,
    s_g,
    HAS_ANG: tl.constexpr,
    cosv,
    sinv,
):
    """Even / odd columns of q (or k) + per-head bias, rotated by the pair angles."""
    base = Qp + bat * s_b + tt[:, None] * s_l + g * s_g + 2 * offs_j[None, :]
    qe = tl.load(base, mask=mc[:, None], other=0.0).to(tl.float32)
    qo = tl.load(base + 1, mask=mc[:, None], other=0.0).to(tl.float32)
    be = tl.load(QB + h * (2 * offs_j.shape[0]) + 2 * offs_j).to(tl.float32)
    bo = tl.load(QB + h * (2 * offs_j.shape[0]) + 2 * offs_j + 1).to(tl.float32)
    qe = tl.where(mc[:, None], qe + be[None, :], 0.0)
    qo = tl.where(mc[:, None], qo + bo[None, :], 0.0)
    if HAS_ANG:
        re = qe * cosv - qo * sinv
        ro = qe * sinv + qo * cosv
        return re, ro, qe, qo
    else:
        return qe, qo, qe, qo


# ----------------------------------------------------------------------------- forward


@triton.jit
def _siso_fwd_kernel(
    Q,
    K,
    V,
    ADT,
    DT,
    TRAP,
    QB,
    KB,
    ANG,
    DSKIP,
    Z,
    OUT,
    SEGTAB,
    SSTART,
    THSTART,
    H0,
    TH0,
    KPREV,
    VPREV,
    FSSM,
    FANG,
    FK,
    FV,
    STC,
    THC,
    SLOC,
    SEGA,
    SEGOM,
    s_qb,
    s_ql,
    s_qg,
    s_kb,
    s_kl,
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
    s_gl,
    s_gh,
    s_zb,
    s_zl,
    s_zh,
    s_ob,
    s_ol,
    s_oh,
    L,
    H,
    HPG,
    NANG,
    NSEG,
    SEG_CH,
    NC,
    C: tl.constexpr,
    P: tl.constexpr,
    N2: tl.constexpr,
    LOCAL: tl.constexpr,
    HAS_TRAP: tl.constexpr,
    HAS_ANG: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_INIT: tl.constexpr,
    VARLEN: tl.constexpr,
    STORE: tl.constexpr,
    FAST: tl.constexpr,
):
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    seg = pid // H
    g = h // HPG
    bat, seq, tok_start, tok_end, seq_start, seq_end, chunk_base, is_first, is_last = _segment(
        seg, SEGTAB, L, NSEG, SEG_CH, NC, C, VARLEN
    )
    N: tl.constexpr = 2 * N2
    offs_c = tl.arange(0, C)
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    mj = offs_j < NANG
    pn = offs_p[:, None] * N + 2 * offs_j[None, :]  # even state columns of a (P, N) block
    nck = tl.cdiv(tok_end - tok_start, C)

    if LOCAL:
        # segment-local end state from zero, rotary frame starting at angle 0
        se = tl.zeros((P, N2), dtype=tl.float32)
        so = tl.zeros((P, N2), dtype=tl.float32)
        thc = tl.zeros((N2,), dtype=tl.float32)
        nck = tl.where(is_last, 0, nck)
    else:
        first = is_first.to(tl.float32)
        sb = SSTART + (seg.to(tl.int64) * H + h) * (P * N)
        nf = ~is_first
        se = tl.load(sb + pn, mask=_band((pn >= 0), nf), other=0.0).to(tl.float32)
        so = tl.load(sb + pn + 1, mask=_band((pn >= 0), nf), other=0.0).to(tl.float32)
        thc = tl.load(
            THSTART + (seg.to(tl.int64) * H + h) * NANG + offs_j, mask=_band(mj, nf), other=0.0
        ).to(tl.float32)
        if HAS_INIT:
            ib = H0 + (seq * H + h) * (P * N)
            se += tl.load(ib + pn, mask=_band((pn >= 0), is_first), other=0.0)
            so += tl.load(ib + pn + 1, mask=_band((pn >= 0), is_first), other=0.0)
            thc += tl.load(TH0 + (seq * H + h) * NANG + offs_j, mask=_band(mj, is_first), other=0.0)
            dt0 = tl.load(DT + bat * s_db + h * s_dh + seq_start * s_dl).to(tl.float32)
            if HAS_TRAP:
                lam0 = tl.sigmoid(
                    tl.load(TRAP + bat * s_tb + h * s_th + seq_start * s_tl).to(tl.float32)
                )
            else:
                lam0 = 1.0
            eta0 = (1.0 - lam0) * dt0 * first
            xp = tl.load(VPREV + (seq * H + h) * P + offs_p).to(tl.float32)
            kpe = tl.load(KPREV + (seq * H + h) * N + 2 * offs_j).to(tl.float32)
            kpo = tl.load(KPREV + (seq * H + h) * N + 2 * offs_j + 1).to(tl.float32)
            se += eta0 * xp[:, None] * kpe[None, :]
            so += eta0 * xp[:, None] * kpo[None, :]
        if HAS_D:
            dsk = tl.load(DSKIP + h).to(tl.float32)

    a_tot = 0.0
    for ci in range(0, nck):
        t0 = tok_start + ci * C
        tt = t0 + offs_c
        mc = tt < tok_end
        adt, dt, gamma, kappa = _gates(
            ADT,
            DT,
            TRAP,
            bat,
            h,
            tt,
            mc,
            seq_end,
            s_ab,
            s_ah,
            s_al,
            s_db,
            s_dh,
            s_dl,
            s_tb,
            s_th,
            s_tl,
            HAS_TRAP,
        )
        cs = tl.cumsum(adt, 0)
        a_c = tl.sum(adt, 0)
        if HAS_ANG:
            am = mc[:, None] & mj[None, :]
            ang = tl.load(
                ANG + bat * s_gb + tt[:, None] * s_gl + h * s_gh + offs_j[None, :],
                mask=am,
                other=0.0,
            ).to(tl.float32)
            om = PI * _tanh(ang, FAST) * dt[:, None]
            th = thc[None, :] + tl.cumsum(om, 0)
            cosv = _cos(th, FAST)
            sinv = _sin(th, FAST)
        else:
            cosv = 0.0
            sinv = 0.0
        kre, kro, _ke, _ko = _load_qk(
            K, KB, bat, g, h, tt, mc, offs_j, s_kb, s_kl, s_kg, HAS_ANG, cosv, sinv
        )
        x = tl.load(
            V + bat * s_vb + tt[:, None] * s_vl + h * s_vh + offs_p[None, :],
            mask=mc[:, None],
            other=0.0,
        ).to(tl.float32)
        if not LOCAL:
            gc = chunk_base + ci
            if STORE:
                cb = STC + (gc * H + h) * (P * N)
                tl.store(cb + pn, se.to(STC.dtype.element_ty))
                tl.store(cb + pn + 1, so.to(STC.dtype.element_ty))
                tl.store(THC + (gc * H + h) * NANG + offs_j, thc, mask=mj)
            qre, qro, _qe, _qo = _load_qk(
                Q, QB, bat, g, h, tt, mc, offs_j, s_qb, s_ql, s_qg, HAS_ANG, cosv, sinv
            )
            sc = _dot(qre, tl.trans(kre), FAST) + _dot(qro, tl.trans(kro), FAST)
            ii = offs_c[:, None]
            jj = offs_c[None, :]
            dec = tl.where(ii > jj, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)
            w = dec * kappa[None, :] + tl.where(ii == jj, gamma[None, :], 0.0)
            y = _dot(sc * w, x, FAST)
            y += tl.exp(cs)[:, None] * (
                _dot(qre, tl.trans(se), FAST) + _dot(qro, tl.trans(so), FAST)
            )
            if HAS_D:
                y += dsk * x
            if HAS_Z:
                zt = tl.load(
                    Z + bat * s_zb + tt[:, None] * s_zl + h * s_zh + offs_p[None, :],
                    mask=mc[:, None],
                    other=0.0,
                ).to(tl.float32)
                y = y * zt * tl.sigmoid(zt)
            tl.store(
                OUT + bat * s_ob + tt[:, None] * s_ol + h * s_oh + offs_p[None, :],
                y.to(OUT.dtype.element_ty),
                mask=mc[:, None],
            )
            # final k (rotated, unscaled) and v of the sequence's last token
            fm = _band(tt == seq_end - 1, is_last)
            fkb = FK + (seq * H + h) * N + 2 * offs_j[None, :] + offs_c[:, None] * 0
            tl.store(fkb, kre, mask=fm[:, None])
            tl.store(fkb + 1, kro, mask=fm[:, None])
            fvb = FV + (seq * H + h) * P + offs_p[None, :] + offs_c[:, None] * 0
            tl.store(fvb, x.to(FV.dtype.element_ty), mask=fm[:, None])
        # state update: S <- exp(A) S + (x * exp(A - cs) kappa)^T kbar
        u = tl.exp(a_c - cs) * kappa
        xu = x * u[:, None]
        ea = tl.exp(a_c)
        se = ea * se + _dot(tl.trans(xu), kre, FAST)
        so = ea * so + _dot(tl.trans(xu), kro, FAST)
        a_tot += a_c
        if HAS_ANG:
            thc = _mod2pi(thc + tl.sum(om, 0))

    if LOCAL:
        nl = ~is_last
        lb = SLOC + (seg.to(tl.int64) * H + h) * (P * N)
        tl.store(lb + pn, se, mask=_band((pn >= 0), nl))
        tl.store(lb + pn + 1, so, mask=_band((pn >= 0), nl))
        tl.store(SEGA + seg.to(tl.int64) * H + h, a_tot, mask=nl)
        tl.store(SEGOM + (seg.to(tl.int64) * H + h) * NANG + offs_j, thc, mask=_band(mj, nl))
    else:
        fb = FSSM + (seq * H + h) * (P * N)
        tl.store(fb + pn, se, mask=_band((pn >= 0), is_last))
        tl.store(fb + pn + 1, so, mask=_band((pn >= 0), is_last))
        tl.store(FANG + (seq * H + h) * NANG + offs_j, thc, mask=_band(mj, is_last))


@triton.jit
def _siso_fwd_chain_kernel(
    SEQTAB,
    SLOC,
    SEGA,
    SEGOM,
    SSTART,
    THSTART,
    H0,
    TH0,
    KPREV,
    VPREV,
    DT,
    TRAP,
    s_db,
    s_dh,
    s_dl,
    s_tb,
    s_th,
    s_tl,
    H,
    NANG,
    NSEG,
    P: tl.constexpr,
    N2: tl.constexpr,
    HAS_TRAP: tl.constexpr,
    HAS_INIT: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_ANG: tl.constexpr,
):
    """Per (sequence, head): true start state and angle of every segment after the first."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    seq = (pid // H).to(tl.int64)
    if VARLEN:
        first_seg = tl.load(SEQTAB + seq * 4)
        nseg = tl.load(SEQTAB + seq * 4 + 1)
        seq_start = tl.load(SEQTAB + seq * 4 + 2)
        bat = seq * 0
    else:
        first_seg = seq * NSEG
        nseg = seq * 0 + NSEG
        seq_start = seq * 0
        bat = seq
    N: tl.constexpr = 2 * N2
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    mj = offs_j < NANG
    pn = offs_p[:, None] * N + 2 * offs_j[None, :]
    se = tl.zeros((P, N2), dtype=tl.float32)
    so = tl.zeros((P, N2), dtype=tl.float32)
    th = tl.zeros((N2,), dtype=tl.float32)
    if HAS_INIT:
        ib = H0 + (seq * H + h) * (P * N)
        se += tl.load(ib + pn)
        so += tl.load(ib + pn + 1)
        th += tl.load(TH0 + (seq * H + h) * NANG + offs_j, mask=mj, other=0.0)
        dt0 = tl.load(DT + bat * s_db + h * s_dh + seq_start * s_dl).to(tl.float32)
        if HAS_TRAP:
            lam0 = tl.sigmoid(
                tl.load(TRAP + bat * s_tb + h * s_th + seq_start * s_tl).to(tl.float32)
            )
        else:
            lam0 = 1.0
        eta0 = (1.0 - lam0) * dt0
        xp = tl.load(VPREV + (seq * H + h) * P + offs_p).to(tl.float32)
        kpe = tl.load(KPREV + (seq * H + h) * N + 2 * offs_j).to(tl.float32)
        kpo = tl.load(KPREV + (seq * H + h) * N + 2 * offs_j + 1).to(tl.float32)
        se += eta0 * xp[:, None] * kpe[None, :]
        so += eta0 * xp[:, None] * kpo[None, :]
    for j in range(1, nseg):
        sp = (first_seg + j - 1) * H + h
        le = tl.load(SLOC + sp * (P * N) + pn)
        lo = tl.load(SLOC + sp * (P * N) + pn + 1)
        a = tl.load(SEGA + sp)
        om = tl.load(SEGOM + sp * NANG + offs_j, mask=mj, other=0.0)
        ea = tl.exp(a)
        if HAS_ANG:
            c = tl.cos(th)[None, :]
            s = tl.sin(th)[None, :]
            se = ea * se + (le * c - lo * s)
            so = ea * so + (le * s + lo * c)
        else:
            se = ea * se + le
            so = ea * so + lo
        th = _mod2pi(th + om)
        sn = (first_seg + j) * H + h
        tl.store(SSTART + sn * (P * N) + pn, se)
        tl.store(SSTART + sn * (P * N) + pn + 1, so)
        tl.store(THSTART + sn * NANG + offs_j, th, mask=mj)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _siso_bwd_kernel(
    Q,
    K,
    V,
    ADT,
    DT,
    TRAP,
    QB,
    KB,
    ANG,
    DSKIP,
    Z,
    DOUT,
    SEGTAB,
    STC,
    THC,
    DSEND,
    TH0,
    KPREV,
    VPREV,
    DFK,
    DFV,
    DQH,
    DKH,
    DX,
    DZ,
    DADT,
    DKAP,
    DGAM,
    DTH,
    DTHTOT,
    DQBP,
    DKBP,
    DDP,
    DH0,
    DKPREV,
    DVPREV,
    DETA0,
    GLOC,
    SEGA,
    s_qb,
    s_ql,
    s_qg,
    s_kb,
    s_kl,
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
    s_gl,
    s_gh,
    s_zb,
    s_zl,
    s_zh,
    s_ob,
    s_ol,
    s_oh,
    L,
    H,
    HPG,
    NANG,
    NSEG,
    SEG_CH,
    NC,
    C: tl.constexpr,
    P: tl.constexpr,
    N2: tl.constexpr,
    LOCAL: tl.constexpr,
    HAS_TRAP: tl.constexpr,
    HAS_ANG: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_INIT: tl.constexpr,
    VARLEN: tl.constexpr,
    FAST: tl.constexpr,
    FULL: tl.constexpr,
):
    """Reverse walk over one (segment, head). LOCAL: only the state gradient a segment sends to
    its start (from zero), for segments after the first; main: every gradient."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    seg = pid // H
    g = h // HPG
    bat, seq, tok_start, tok_end, seq_start, seq_end, chunk_base, is_first, is_last = _segment(
        seg, SEGTAB, L, NSEG, SEG_CH, NC, C, VARLEN
    )
    N: tl.constexpr = 2 * N2
    offs_c = tl.arange(0, C)
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    mj = offs_j < NANG
    pn = offs_p[:, None] * N + 2 * offs_j[None, :]
    nck = tl.cdiv(tok_end - tok_start, C)
    ii = offs_c[:, None]
    jj = offs_c[None, :]
    if LOCAL:
        dse = tl.zeros((P, N2), dtype=tl.float32)
        dso = tl.zeros((P, N2), dtype=tl.float32)
        nck = tl.where(is_first, 0, nck)
    else:
        db = DSEND + (seg.to(tl.int64) * H + h) * (P * N)
        dse = tl.load(db + pn)
        dso = tl.load(db + pn + 1)
        dqbe = tl.zeros((N2,), dtype=tl.float32)
        dqbo = tl.zeros((N2,), dtype=tl.float32)
        dkbe = tl.zeros((N2,), dtype=tl.float32)
        dkbo = tl.zeros((N2,), dtype=tl.float32)
        dd_acc = 0.0
    if HAS_D:
        dsk = tl.load(DSKIP + h).to(tl.float32)
    else:
        dsk = 0.0
    a_tot = 0.0
    for it in range(0, nck):
        ci = nck - 1 - it
        gc = chunk_base + ci
        t0 = tok_start + ci * C
        tt = t0 + offs_c
        mc = tt < tok_end
        adt, dt, gamma, kappa = _gates(
            ADT,
            DT,
            TRAP,
            bat,
            h,
            tt,
            mc,
            seq_end,
            s_ab,
            s_ah,
            s_al,
            s_db,
            s_dh,
            s_dl,
            s_tb,
            s_th,
            s_tl,
            HAS_TRAP,
        )
        cs = tl.cumsum(adt, 0)
        a_c = tl.sum(adt, 0)
        eq = tl.exp(cs)
        if HAS_ANG:
            am = mc[:, None] & mj[None, :]
            thc = tl.load(THC + (gc * H + h) * NANG + offs_j, mask=mj, other=0.0)
            ang = tl.load(
                ANG + bat * s_gb + tt[:, None] * s_gl + h * s_gh + offs_j[None, :],
                mask=am,
                other=0.0,
            ).to(tl.float32)
            om = PI * _tanh(ang, FAST) * dt[:, None]
            th = thc[None, :] + tl.cumsum(om, 0)
            cosv = _cos(th, FAST)
            sinv = _sin(th, FAST)
        else:
            cosv = 0.0
            sinv = 0.0
        qre, qro, _qe, _qo = _load_qk(
            Q, QB, bat, g, h, tt, mc, offs_j, s_qb, s_ql, s_qg, HAS_ANG, cosv, sinv
        )
        vo = bat * s_vb + tt[:, None] * s_vl + h * s_vh + offs_p[None, :]
        do = tl.load(
            DOUT + bat * s_ob + tt[:, None] * s_ol + h * s_oh + offs_p[None, :],
            mask=mc[:, None],
            other=0.0,
        ).to(tl.float32)
        if FULL:
            kre, kro, _ke, _ko = _load_qk(
                K, KB, bat, g, h, tt, mc, offs_j, s_kb, s_kl, s_kg, HAS_ANG, cosv, sinv
            )
            x = tl.load(V + vo, mask=mc[:, None], other=0.0).to(tl.float32)
            cb = STC + (gc * H + h) * (P * N)
            se = tl.load(cb + pn).to(tl.float32)
            so = tl.load(cb + pn + 1).to(tl.float32)
            sc = _dot(qre, tl.trans(kre), FAST) + _dot(qro, tl.trans(kro), FAST)
            dec = tl.where(ii > jj, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)
            w = dec * kappa[None, :] + tl.where(ii == jj, gamma[None, :], 0.0)
            scw = sc * w
            if HAS_Z:
                zt = tl.load(
                    Z + bat * s_zb + tt[:, None] * s_zl + h * s_zh + offs_p[None, :],
                    mask=mc[:, None],
                    other=0.0,
                ).to(tl.float32)
                y = _dot(scw, x, FAST)
                y += eq[:, None] * (_dot(qre, tl.trans(se), FAST) + _dot(qro, tl.trans(so), FAST))
                y += dsk * x
                sz = tl.sigmoid(zt)
                dy = do * zt * sz
                if not LOCAL:
                    dz = do * y * sz * (1.0 + zt * (1.0 - sz))
                    tl.store(
                        DZ + bat * s_zb + tt[:, None] * s_zl + h * s_zh + offs_p[None, :],
                        dz.to(DZ.dtype.element_ty),
                        mask=mc[:, None],
                    )
            else:
                dy = do
        else:
            dy = do
        if not LOCAL:
            dp = _dot(dy, tl.trans(x), FAST)
            pw = dp * w
            dwt = dp * sc
            ie = _dot(dy, se, FAST)
            io = _dot(dy, so, FAST)
            dqe = _dot(pw, kre, FAST) + eq[:, None] * ie
            dqo = _dot(pw, kro, FAST) + eq[:, None] * io
            ve = _dot(x, dse, FAST)
            vv = _dot(x, dso, FAST)
            u = tl.exp(a_c - cs) * kappa
            dke = _dot(tl.trans(pw), qre, FAST) + u[:, None] * ve
            dko = _dot(tl.trans(pw), qro, FAST) + u[:, None] * vv
            fm = _band((tt == seq_end - 1) & mc, is_last)
            fkb = DFK + (seq * H + h) * N + 2 * offs_j[None, :] + offs_c[:, None] * 0
            dke += tl.load(fkb, mask=fm[:, None], other=0.0).to(tl.float32)
            dko += tl.load(fkb + 1, mask=fm[:, None], other=0.0).to(tl.float32)
            dx = _dot(tl.trans(scw), dy, FAST)
            dx += u[:, None] * (_dot(kre, tl.trans(dse), FAST) + _dot(kro, tl.trans(dso), FAST))
            dx += dsk * dy
            fvb = DFV + (seq * H + h) * P + offs_p[None, :] + offs_c[:, None] * 0
            dx += tl.load(fvb, mask=fm[:, None], other=0.0).to(tl.float32)
            tl.store(DX + vo, dx.to(DX.dtype.element_ty), mask=mc[:, None])
            if HAS_D:
                dd_acc += tl.sum(tl.sum(dy * x, 1), 0)
            # scalar gradients
            g_in = eq * (tl.sum(ie * qre, 1) + tl.sum(io * qro, 1))
            du = tl.sum(ve * kre, 1) + tl.sum(vv * kro, 1)
            ea = tl.exp(a_c)
            d_a = ea * (tl.sum(tl.sum(se * dse, 1), 0) + tl.sum(tl.sum(so * dso, 1), 0))
            d_a += tl.sum(u * du, 0)
            ms = dwt * dec * kappa[None, :]
            dcs = g_in + tl.sum(ms, 1) - tl.sum(ms, 0) - u * du
            dkap = tl.exp(a_c - cs) * du + tl.sum(dwt * dec, 0)
            dgam = tl.sum(tl.where(ii == jj, dwt, 0.0), 1)
            dadt = tl.cumsum(dcs, 0, reverse=True) + d_a
            bo = (bat * H + h) * L + tt
            tl.store(DADT + bo, dadt, mask=mc)
            tl.store(DKAP + bo, dkap, mask=mc)
            tl.store(DGAM + bo, dgam, mask=mc)
            if HAS_ANG:
                dth = -dqe * qro + dqo * qre - dke * kro + dko * kre
                tl.store(
                    DTH + ((bat * L + tt[:, None]) * H + h) * NANG + offs_j[None, :],
                    dth,
                    mask=mc[:, None] & mj[None, :],
                )
                tl.store(DTHTOT + (gc * H + h) * NANG + offs_j, tl.sum(dth, 0), mask=mj)
                que = dqe * cosv + dqo * sinv
                quo = dqo * cosv - dqe * sinv
                kue = dke * cosv + dko * sinv
                kuo = dko * cosv - dke * sinv
            else:
                que = dqe
                quo = dqo
                kue = dke
                kuo = dko
            hb = ((bat * L + tt[:, None]) * H + h) * N + 2 * offs_j[None, :]
            tl.store(DQH + hb, que.to(DQH.dtype.element_ty), mask=mc[:, None])
            tl.store(DQH + hb + 1, quo.to(DQH.dtype.element_ty), mask=mc[:, None])
            tl.store(DKH + hb, kue.to(DKH.dtype.element_ty), mask=mc[:, None])
            tl.store(DKH + hb + 1, kuo.to(DKH.dtype.element_ty), mask=mc[:, None])
            dqbe += tl.sum(que, 0)
            dqbo += tl.sum(quo, 0)
            dkbe += tl.sum(kue, 0)
            dkbo += tl.sum(kuo, 0)
        # state gradient: dS <- exp(A) dS + (dy * exp(cs))^T qbar
        ea2 = tl.exp(a_c)
        dye = dy * eq[:, None]
        dse = ea2 * dse + _dot(tl.trans(dye), qre, FAST)
        dso = ea2 * dso + _dot(tl.trans(dye), qro, FAST)
        a_tot += a_c

    if LOCAL:
        nf = ~is_first
        lb = GLOC + (seg.to(tl.int64) * H + h) * (P * N)
        tl.store(lb + pn, dse, mask=_band((pn >= 0), nf))
        tl.store(lb + pn + 1, dso, mask=_band((pn >= 0), nf))
        tl.store(SEGA + seg.to(tl.int64) * H + h, a_tot, mask=nf)
    else:
        sh = seg.to(tl.int64) * H + h
        tl.store(DQBP + sh * N + 2 * offs_j, dqbe)
        tl.store(DQBP + sh * N + 2 * offs_j + 1, dqbo)
        tl.store(DKBP + sh * N + 2 * offs_j, dkbe)
        tl.store(DKBP + sh * N + 2 * offs_j + 1, dkbo)
        tl.store(DDP + sh, dd_acc)
        if HAS_INIT:
            ib = seq * H + h
            tl.store(DH0 + ib * (P * N) + pn, dse, mask=_band((pn >= 0), is_first))
            tl.store(DH0 + ib * (P * N) + pn + 1, dso, mask=_band((pn >= 0), is_first))
            dt0 = tl.load(DT + bat * s_db + h * s_dh + seq_start * s_dl).to(tl.float32)
            if HAS_TRAP:
                lam0 = tl.sigmoid(
                    tl.load(TRAP + bat * s_tb + h * s_th + seq_start * s_tl).to(tl.float32)
                )
            else:
                lam0 = 1.0
            eta0 = (1.0 - lam0) * dt0
            xp = tl.load(VPREV + ib * P + offs_p).to(tl.float32)
            kpe = tl.load(KPREV + ib * N + 2 * offs_j).to(tl.float32)
            kpo = tl.load(KPREV + ib * N + 2 * offs_j + 1).to(tl.float32)
            tk = dse * kpe[None, :] + dso * kpo[None, :]  # (P, N2)
            dxp = eta0 * tl.sum(tk, 1)
            tl.store(DVPREV + ib * P + offs_p, dxp, mask=_band((offs_p >= 0), is_first))
            tl.store(
                DKPREV + ib * N + 2 * offs_j,
                eta0 * tl.sum(dse * xp[:, None], 0),
                mask=_band((offs_j >= 0), is_first),
            )
            tl.store(
                DKPREV + ib * N + 2 * offs_j + 1,
                eta0 * tl.sum(dso * xp[:, None], 0),
                mask=_band((offs_j >= 0), is_first),
            )
            tl.store(DETA0 + ib, tl.sum(tl.sum(tk * xp[:, None], 1), 0), mask=is_first)


@triton.jit
def _siso_bwd_chain_kernel(
    SEQTAB,
    GLOC,
    SEGA,
    DFSSM,
    DSEND,
    H,
    NSEG,
    P: tl.constexpr,
    N2: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Per (sequence, head): the state gradient at the end of every segment, last to first."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    seq = (pid // H).to(tl.int64)
    if VARLEN:
        first_seg = tl.load(SEQTAB + seq * 4)
        nseg = tl.load(SEQTAB + seq * 4 + 1)
    else:
        first_seg = seq * NSEG
        nseg = seq * 0 + NSEG
    N: tl.constexpr = 2 * N2
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    pn = offs_p[:, None] * N + 2 * offs_j[None, :]
    fb = DFSSM + (seq * H + h) * (P * N)
    dse = tl.load(fb + pn)
    dso = tl.load(fb + pn + 1)
    for it in range(0, nseg):
        j = nseg - 1 - it
        sn = (first_seg + j) * H + h
        tl.store(DSEND + sn * (P * N) + pn, dse)
        tl.store(DSEND + sn * (P * N) + pn + 1, dso)
        mk = j > 0  # segment 0 sends nothing further back
        ea = tl.exp(tl.load(SEGA + sn, mask=mk, other=0.0))
        dse = ea * dse + tl.load(GLOC + sn * (P * N) + pn, mask=_band((pn >= 0), mk), other=0.0)
        dso = ea * dso + tl.load(GLOC + sn * (P * N) + pn + 1, mask=_band((pn >= 0), mk), other=0.0)


@triton.jit
def _siso_bwd_gates_kernel(
    ANG,
    DT,
    TRAP,
    DKAP,
    DGAM,
    DETA0,
    DTH,
    CARRY,
    CHTAB,
    DANG,
    DDT,
    DTRAP,
    s_db,
    s_dh,
    s_dl,
    s_tb,
    s_th,
    s_tl,
    s_gb,
    s_gl,
    s_gh,
    L,
    H,
    NANG,
    NC,
    C: tl.constexpr,
    N2: tl.constexpr,
    HAS_TRAP: tl.constexpr,
    HAS_ANG: tl.constexpr,
    HAS_INIT: tl.constexpr,
    VARLEN: tl.constexpr,
    FAST: tl.constexpr,
):
    """Per (chunk, head): dt, trap and angle gradients from dkappa, dgamma and dTheta."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    if VARLEN:
        seq = tl.load(CHTAB + gc * 4)
        tok_start = tl.load(CHTAB + gc * 4 + 1)
        tok_end = tl.load(CHTAB + gc * 4 + 2)
        seq_start = tl.load(CHTAB + gc * 4 + 3)
        bat = seq * 0
    else:
        seq = gc // NC
        tok_start = (gc % NC) * C
        tok_end = tl.minimum(tok_start + C, L)
        seq_start = seq * 0
        bat = seq
    offs_c = tl.arange(0, C)
    tt = tok_start + offs_c
    mc = tt < tok_end
    bo = (bat * H + h) * L + tt
    dkap = tl.load(DKAP + bo, mask=mc, other=0.0)
    dgt = tl.load(DGAM + bo, mask=mc, other=0.0) + dkap
    dt = tl.load(DT + bat * s_db + h * s_dh + tt * s_dl, mask=mc, other=0.0).to(tl.float32)
    if HAS_TRAP:
        lam = tl.sigmoid(
            tl.load(TRAP + bat * s_tb + h * s_th + tt * s_tl, mask=mc, other=0.0).to(tl.float32)
        )
        dkp = tl.load(DKAP + bo - 1, mask=mc & (tt > seq_start), other=0.0)
        if HAS_INIT:
            de0 = tl.load(DETA0 + seq * H + h)
            dkp = tl.where(tt == seq_start, de0, dkp)
        ddt = dgt * lam + dkp * (1.0 - lam)
        dtrap = (dgt - dkp) * dt * lam * (1.0 - lam)
        tl.store(DTRAP + bo, dtrap, mask=mc)
    else:
        ddt = dgt
    if HAS_ANG:
        offs_j = tl.arange(0, N2)
        mj = offs_j < NANG
        am = mc[:, None] & mj[None, :]
        dth = tl.load(
            DTH + ((bat * L + tt[:, None]) * H + h) * NANG + offs_j[None, :], mask=am, other=0.0
        )
        carry = tl.load(CARRY + (gc * H + h) * NANG + offs_j, mask=mj, other=0.0)
        dom = tl.cumsum(dth, 0, reverse=True) + carry[None, :]
        ang = tl.load(
            ANG + bat * s_gb + tt[:, None] * s_gl + h * s_gh + offs_j[None, :], mask=am, other=0.0
        ).to(tl.float32)
        t = _tanh(ang, FAST)
        dang = dom * PI * (1.0 - t * t) * dt[:, None]
        tl.store(
            DANG + ((bat * L + tt[:, None]) * H + h) * NANG + offs_j[None, :],
            dang.to(DANG.dtype.element_ty),
            mask=am,
        )
        ddt += tl.sum(tl.where(am, dom * PI * t, 0.0), 1)
    tl.store(DDT + bo, ddt, mask=mc)
