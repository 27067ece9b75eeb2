"""Triton kernels for the Mamba-3 SISO chunked scan (forward and backward).

Work decomposition (spec 3.2), chunk-parallel everywhere except one element-wise pass:

* Every (chunk, head) is one program. All heavy work (scores, masked intra-chunk products,
  rotations, the chunk's own state contribution and every gradient) depends on the chunk's
  inputs plus *one* state tile, so it runs fully in parallel: 16k programs at
  (B 8, L 4096, H 32), 8k at (B 1, L 16384); batch 1 fills the GPU as well as batch 8.
* The only sequential dependency, ``S_{c+1} = R(-Omega_c) (exp(A_c) S_c + dS_c)``, is an
  element-wise pass over chunks per (sequence, head, tile of state rows) (``_fwd_pass``
  forward, ``_bwd_pass`` in reverse for the state gradient). It reads and writes one tile per
  chunk (prefetching the next) and does no matrix products.
* Kernels: forward ``_fwd_state`` -> ``_fwd_pass`` -> ``_fwd_out``; backward ``_bwd_dstate`` ->
  ``_bwd_pass`` -> ``_bwd_q`` -> ``_bwd_k`` -> ``_bwd_x`` -> ``_bwd_gates`` (the launch order
  in ``siso_op``).
  Per-head dq / dk and the bias / D partial sums are reduced by torch afterwards.
* The first chunk kernel of each pass (``_fwd_state``, ``_bwd_dstate``) also saves the per-token
  gates (gamma, kappa and the in-chunk cumsum of adt) in a (B, H, 3, L) buffer, and the in-chunk
  angle pipeline runs only over the pairs that rotate (N/4 of them at rope_fraction 0.5).
* **Frames.** A rotation by the absolute angle ``Theta_t`` would make every chunk depend on all
  earlier angles. Instead each chunk works in its own frame: ``q~_t = R(theta_t) q_t`` with
  ``theta_t`` the angle accumulated *inside the chunk* (so ``q~_t . k~_s`` is exact within a
  chunk), and the state of chunk c is stored rotated back by the chunk's start angle,
  ``S~_c = R(-Theta_c) S_c``, which turns ``S_c qbar_t`` into ``S~_c q~_t``. Chunks only
  exchange their total angle ``Omega_c``, applied in the element-wise pass. The initial and
  final states are converted between the absolute and the relative frame by the caller (plain
  differentiable torch on (sequences, H, P, N) tensors).
* The state carried between chunks is the "pre-added" one of spec 2.7 (it already holds the next
  token's trapezoid term), so every chunk sees its predecessor through the ordinary decay.
* Internal state buffers store a P x N state with its columns de-interleaved (the N/2 even
  columns of the rotary pairs, then the N/2 odd ones): the pair rotation is element-wise on two
  contiguous halves and every contraction is a ``tl.dot`` over N/2.

Precision: ``FAST`` selects bf16 tensor-core operands (fp32 accumulate), bf16 state buffers and
PTX approximations of tanh / sin / cos; otherwise dots are fp32 with ``input_precision="ieee"``,
buffers fp32 and transcendentals exact ``tl`` functions (also what the CPU interpreter can run).
All offsets that involve a token, batch or chunk index are int64; grids put (chunk, head) or
(sequence, head, tile) on axis 0.
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
def _sigmoid(x, FAST: tl.constexpr):
    """``tl.sigmoid`` divides with IEEE rounding (a ~10-instruction sequence with a branch);
    per token it was 3-5 % of every chunk kernel's stall samples. Fast: ex2 + rcp.approx."""
    if FAST:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + tl.exp(-x)], dtype=tl.float32,
            is_pure=True, pack=1,
        )  # fmt: skip
    else:
        return tl.sigmoid(x)


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
def _operand(x, FAST: tl.constexpr):
    """A tile used only as a dot operand: bf16 in fast mode (half the registers), else fp32."""
    if FAST:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float32)


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
    FAST: tl.constexpr,
):
    """Per-token scalars of one chunk: adt, dt, gamma, kappa (padded rows: zeros)."""
    adt = tl.load(ADT + bat * s_ab + h * s_ah + tt * s_al, mask=mc, other=0.0).to(tl.float32)
    dt = tl.load(DT + bat * s_db + h * s_dh + tt * s_dl, mask=mc, other=0.0).to(tl.float32)
    mn = mc & (tt + 1 < seq_end)
    dtn = tl.load(DT + bat * s_db + h * s_dh + (tt + 1) * s_dl, mask=mn, other=0.0).to(tl.float32)
    if HAS_TRAP:
        lam = _sigmoid(
            tl.load(TRAP + bat * s_tb + h * s_th + tt * s_tl, mask=mc, other=0.0).to(tl.float32),
            FAST,
        )
        lamn = _sigmoid(
            tl.load(TRAP + bat * s_tb + h * s_th + (tt + 1) * s_tl, mask=mn, other=0.0).to(
                tl.float32
            ),
            FAST,
        )
        gamma = lam * dt
        eta = (1.0 - lamn) * dtn
    else:
        gamma = dt
        eta = dtn * 0.0
    return adt, dt, gamma, gamma + eta


@triton.jit
def _gate_offsets(bat, h, H, L, tt):
    """Offsets of gamma in the per-token gate buffer (B, H, 3, L): gamma, kappa, cs planes."""
    return ((bat * H + h) * 3) * L + tt


@triton.jit
def _store_gates(GK, bat, h, H, L, tt, mc, gamma, kappa, cs):
    """Save a chunk's gamma, kappa and in-chunk cumsum of adt for the kernels after this one.

    ``_gates`` is ~450 PTX instructions per thread where its results meet C x C tiles (two
    sigmoids, shifted loads, a scan, each rematerialised in every layout that needs them), a
    tenth of a backward chunk kernel; loading three vectors costs a few."""
    o = _gate_offsets(bat, h, H, L, tt)
    tl.store(GK + o, gamma, mask=mc)
    tl.store(GK + o + L, kappa, mask=mc)
    tl.store(GK + o + 2 * L, cs, mask=mc)


@triton.jit
def _load_gates(GK, bat, h, H, L, tt, mc):
    """gamma, kappa and cs of one chunk as ``_store_gates`` saved them (padded tokens: 0)."""
    o = _gate_offsets(bat, h, H, L, tt)
    gamma = tl.load(GK + o, mask=mc, other=0.0)
    kappa = tl.load(GK + o + L, mask=mc, other=0.0)
    cs = tl.load(GK + o + 2 * L, mask=mc, other=0.0)
    return gamma, kappa, cs


@triton.jit
def _chunk(gc, CHTAB, L, NC, C: tl.constexpr, VARLEN: tl.constexpr):
    """(batch, sequence, first token, end token, sequence end) of chunk slot ``gc``."""
    if VARLEN:
        row = CHTAB + gc * 4
        seq = tl.load(row)
        tok_start = tl.load(row + 1)
        tok_end = tl.load(row + 2)
        seq_end = tl.load(row + 3)
        bat = seq * 0
    else:
        seq = gc // NC
        tok_start = (gc % NC) * C
        tok_end = tl.minimum(tok_start + C, L)
        seq_end = seq * 0 + L
        bat = seq
    return bat, seq, tok_start, tok_end, seq_end


@triton.jit
def _widen(a, fill, N2: tl.constexpr):
    """A C x NA tile as C x N2 (NA = N2 or N2 / 2): the rotated pairs, then ``fill`` for the
    pairs that do not rotate (cos 1, sin 0). Concatenation is a join plus a transpose of the
    two halves (``tl.reshape`` keeps the logical order)."""
    if a.shape[1] == N2:
        return a
    else:
        b = tl.join(a, tl.full(a.shape, fill, a.dtype))  # C x NA x 2
        return tl.reshape(tl.permute(b, (0, 2, 1)), (a.shape[0], N2))


@triton.jit
def _narrow(a, NA: tl.constexpr):
    """The first NA columns of a C x N2 tile (the rotated pairs; inverse of ``_widen``)."""
    if a.shape[1] == NA:
        return a
    else:
        lo, _hi = tl.split(tl.permute(tl.reshape(a, (a.shape[0], 2, NA)), (0, 2, 1)))
        return lo


@triton.jit
def _rotation(
    ANG, bat, h, tt, mc, dt, NANG, s_gb, s_gs, s_gh, N2: tl.constexpr, NA: tl.constexpr,
    FAST: tl.constexpr,
):  # fmt: skip
    """The in-chunk rotation: per-pair angle increments, their in-chunk cumsum and its cos /
    sin. Returns the chunk's total angle per pair (NA), the cos / sin as NA x C tiles (tokens
    last, as scanned) and as C x N2 tiles for rotating q / k.

    The angles arrive with tokens contiguous (pairs x tokens, see ``siso_op``), so the tile is
    loaded as NA x C and scanned along its contiguous axis, which Triton keeps inside a warp
    (in-thread + shuffles). Scanning a C x N/2 tile over tokens went through shared memory
    ~120 times per thread and was a third of the instructions of the chunk kernels.

    Only the first NANG pairs rotate; with the default rope_fraction 0.5 that is half of them,
    so the angle pipeline (tanh, scan, mod 2 pi, cos, sin) runs on an NA = N2 / 2 wide tile and
    is widened with cos 1 / sin 0 afterwards (``_widen``), instead of computing a masked
    N2-wide tile whose second half is thrown away."""
    offs_a = tl.arange(0, NA)
    am = (offs_a < NANG)[:, None] & mc[None, :]
    ang = tl.load(
        ANG + bat * s_gb + h * s_gh + offs_a[:, None] * s_gs + tt[None, :], mask=am, other=0.0
    ).to(tl.float32)
    om = PI * _tanh(ang, FAST) * dt[None, :]
    th = _mod2pi(tl.cumsum(om, 1))
    cos_a = _cos(th, FAST)
    sin_a = _sin(th, FAST)
    cosv = _widen(tl.trans(cos_a), 1.0, N2)
    sinv = _widen(tl.trans(sin_a), 0.0, N2)
    return tl.sum(om, 1), cos_a, sin_a, cosv, sinv


@triton.jit
def _csn_offsets(bat, tt, h, L, H, offs_j, NANG):
    """Offsets of the cos half of an N/2 x C tile of the per-token cos / sin buffer, laid out
    tokens last, (B, H, 2, S, L), like the angles: ``_bwd_dstate`` stores the tiles its scan
    produced without a layout change. (Stored tokens-first, Triton 3.6 recomputed the whole
    angle scan in a second layout for the store: 168 -> 241 registers, 2 programs per SM.)"""
    return ((bat * H + h) * (2 * NANG) + offs_j[:, None]) * L + tt[None, :]


@triton.jit
def _load_csn(CSN, bat, tt, mc, h, L, H, NANG, N2: tl.constexpr, NA: tl.constexpr):
    """cos / sin of the in-chunk angles as C x N/2 tiles, as ``_bwd_dstate`` stored them:
    loaded NA wide (the rotated pairs; padded pairs and tokens: cos 1, sin 0) and widened
    (``_widen``). Loaded where used, so the two C x N/2 fp32 tiles (64 registers per thread at
    4 warps, C 64, N 128) need not stay live through a kernel."""
    offs_a = tl.arange(0, NA)
    o = _csn_offsets(bat, tt, h, L, H, offs_a, NANG)
    m = (offs_a < NANG)[:, None] & mc[None, :]
    cosv = tl.load(CSN + o, mask=m, other=1.0).to(tl.float32)
    sinv = tl.load(CSN + o + NANG * L, mask=m, other=0.0).to(tl.float32)
    return _widen(tl.trans(cosv), 1.0, N2), _widen(tl.trans(sinv), 0.0, N2)


@triton.jit
def _load_qk(Qp, QB, bat, g, h, tt, mc, offs_j, s_b, s_l, s_g, HAS_ANG: tl.constexpr, cosv, sinv):
    """Even / odd columns of q (or k) + per-head bias, rotated by the in-chunk angles.

    Rows are loaded whole (16-byte vectors) and split into the pair halves in registers: two
    stride-2 loads issued one 2-byte load per element and kept the load unit saturated."""
    offs_n = tl.arange(0, 2 * offs_j.shape[0])
    qv = tl.load(
        Qp + bat * s_b + tt[:, None] * s_l + g * s_g + offs_n[None, :], mask=mc[:, None], other=0.0
    ).to(tl.float32)
    bv = tl.load(QB + h * offs_n.shape[0] + offs_n).to(tl.float32)
    qv = tl.where(mc[:, None], qv + bv[None, :], 0.0)
    qe, qo = tl.split(tl.reshape(qv, (tt.shape[0], offs_j.shape[0], 2)))
    if HAS_ANG:
        return qe * cosv - qo * sinv, qe * sinv + qo * cosv
    else:
        return qe, qo


@triton.jit
def _scores(qe, qo, ke, ko, cs, gamma, kappa, C: tl.constexpr, FAST: tl.constexpr):
    """q~ k~^T, the strictly-lower decay mask and the masked weights W (gamma on the diagonal)."""
    offs_c = tl.arange(0, C)
    ii = offs_c[:, None]
    jj = offs_c[None, :]
    sc = _dot(qe, tl.trans(ke), FAST) + _dot(qo, tl.trans(ko), FAST)
    dec = tl.where(ii > jj, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)
    w = dec * kappa[None, :] + tl.where(ii == jj, gamma[None, :], 0.0)
    return sc, dec, w


@triton.jit
def _state_tile(buf, slot, h, H, offs_p, offs_j, N2: tl.constexpr, P: tl.constexpr):
    """Addresses of the even / odd halves of rows ``offs_p`` of one (slot, head) P x N state
    (de-interleaved columns)."""
    base = buf + (slot * H + h) * (P * 2 * N2)
    pe = base + offs_p[:, None] * (2 * N2) + offs_j[None, :]
    return pe, pe + N2


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_state_kernel(
    K,
    V,
    ADT,
    DT,
    TRAP,
    KB,
    ANG,
    CHTAB,
    ST,
    CA,
    COM,
    GK,
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
):
    """Per (chunk, head): the chunk's own state contribution sum_t u_t x_t k~_t^T (its frame),
    its total log decay A_c and its total angle Omega_c."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    g = h // HPG
    bat, seq, tok_start, tok_end, seq_end = _chunk(gc, CHTAB, L, NC, C, VARLEN)
    offs_c = tl.arange(0, C)
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    tt = tok_start + offs_c
    mc = tt < tok_end
    adt, dt, gamma, kappa = _gates(
        ADT, DT, TRAP, bat, h, tt, mc, seq_end, s_ab, s_ah, s_al, s_db, s_dh, s_dl, s_tb, s_th,
        s_tl, HAS_TRAP, FAST,
    )  # fmt: skip
    cs = tl.cumsum(adt, 0)
    a_c = tl.sum(adt, 0)
    _store_gates(GK, bat, h, H, L, tt, mc, gamma, kappa, cs)
    if HAS_ANG:
        om, _c, _s, cosv, sinv = _rotation(
            ANG, bat, h, tt, mc, dt, NANG, s_gb, s_gs, s_gh, N2, NA, FAST
        )  # fmt: skip
        offs_a = tl.arange(0, NA)
        tl.store(COM + (gc * H + h) * NANG + offs_a, om, mask=offs_a < NANG)
    else:
        cosv = 0.0
        sinv = 0.0
    ke, ko = _load_qk(K, KB, bat, g, h, tt, mc, offs_j, s_kb, s_kl, s_kg, HAS_ANG, cosv, sinv)
    ke = _operand(ke, FAST)
    ko = _operand(ko, FAST)
    x = tl.load(
        V + bat * s_vb + tt[:, None] * s_vl + h * s_vh + offs_p[None, :],
        mask=mc[:, None],
        other=0.0,
    ).to(tl.float32)
    xu = _operand(x * (tl.exp(a_c - cs) * kappa)[:, None], FAST)
    pe, po = _state_tile(ST, gc, h, H, offs_p, offs_j, N2, P)
    tl.store(pe, _dot(tl.trans(xu), ke, FAST).to(ST.dtype.element_ty))
    tl.store(po, _dot(tl.trans(xu), ko, FAST).to(ST.dtype.element_ty))
    tl.store(CA + gc * H + h, a_c)


@triton.jit
def _pass_setup(SEQTAB, NC, NT, H, P: tl.constexpr, PB: tl.constexpr, VARLEN: tl.constexpr):
    """(sequence, head, first chunk slot, chunk count, state rows) of an element-wise pass
    program; a program owns PB full rows of the P x N state (coalesced, no pair split)."""
    pid = tl.program_id(0)
    tile = pid % NT
    h = ((pid // NT) % H).to(tl.int64)
    seq = (pid // (NT * H)).to(tl.int64)
    if VARLEN:
        c0 = tl.load(SEQTAB + seq * 2)
        nch = tl.load(SEQTAB + seq * 2 + 1)
    else:
        c0 = seq * NC
        nch = seq * 0 + NC
    return seq, h, c0, nch, tile, tile * PB + tl.arange(0, PB)


@triton.jit
def _state_load(buf, slot, h, H, offs_p, offs_j, N2: tl.constexpr, P: tl.constexpr):
    """Even / odd halves of rows ``offs_p`` of one (slot, head) state, as fp32 tiles."""
    pe, po = _state_tile(buf, slot, h, H, offs_p, offs_j, N2, P)
    return tl.load(pe).to(tl.float32), tl.load(po).to(tl.float32)


@triton.jit
def _pass_load(
    buf, CA, COM, slot, h, H, NANG, offs_p, offs_j, mj, N2: tl.constexpr, P: tl.constexpr
):
    de, do = _state_load(buf, slot, h, H, offs_p, offs_j, N2, P)
    a = tl.load(CA + slot * H + h)
    om = tl.load(COM + (slot * H + h) * NANG + offs_j, mask=mj, other=0.0)
    return de, do, a, om


@triton.jit
def _fwd_pass_kernel(
    ST,
    CA,
    COM,
    S0,
    SEND,
    TOT,
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
    contribution in ``ST`` by its start state (relative frame), then write the end state and
    the sequence's total angle (mod 2 pi). The next chunk's tile is loaded before the current
    one is used, so two loads are in flight per program."""
    seq, h, c0, nch, tile, offs_p = _pass_setup(SEQTAB, NC, NT, H, P, PB, VARLEN)
    offs_j = tl.arange(0, N2)
    mj = offs_j < NANG
    ie, io = _state_tile(S0, seq, h, H, offs_p, offs_j, N2, P)
    if HAS_INIT:
        se = tl.load(ie)
        so = tl.load(io)
    else:
        se = tl.zeros((PB, N2), dtype=tl.float32)
        so = tl.zeros((PB, N2), dtype=tl.float32)
    tot = tl.zeros((N2,), dtype=tl.float32)
    last = tl.maximum(nch - 1, 0)
    de, do, a, om = _pass_load(ST, CA, COM, c0, h, H, NANG, offs_p, offs_j, mj, N2, P)
    for c in range(0, nch):
        slot = c0 + c
        ne, no, na, nom = _pass_load(
            ST, CA, COM, c0 + tl.minimum(c + 1, last), h, H, NANG, offs_p, offs_j, mj, N2, P
        )
        pe, po = _state_tile(ST, slot, h, H, offs_p, offs_j, N2, P)
        tl.store(pe, se.to(ST.dtype.element_ty))
        tl.store(po, so.to(ST.dtype.element_ty))
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
    fe, fo = _state_tile(SEND, seq, h, H, offs_p, offs_j, N2, P)
    tl.store(fe, se)
    tl.store(fo, so)
    if HAS_ANG:
        tl.store(TOT + (seq * H + h) * NANG + offs_j, tot, mask=mj & ((offs_j * 0 + tile) == 0))


@triton.jit
def _fwd_out_kernel(
    Q,
    K,
    V,
    GK,
    DT,
    QB,
    KB,
    ANG,
    DSKIP,
    Z,
    OUT,
    YPRE,
    CHTAB,
    ST,
    s_qb,
    s_ql,
    s_qg,
    s_kb,
    s_kl,
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
    NC,
    C: tl.constexpr,
    P: tl.constexpr,
    N2: tl.constexpr,
    NA: tl.constexpr,
    HAS_ANG: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    SAVE_Y: tl.constexpr,
    VARLEN: tl.constexpr,
    FAST: tl.constexpr,
):
    """Per (chunk, head): y = (q~k~^T * W) x + exp(cs) q~ S~_c^T + D x, times silu(z)."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    g = h // HPG
    bat, seq, tok_start, tok_end, seq_end = _chunk(gc, CHTAB, L, NC, C, VARLEN)
    offs_c = tl.arange(0, C)
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    tt = tok_start + offs_c
    mc = tt < tok_end
    gamma, kappa, cs = _load_gates(GK, bat, h, H, L, tt, mc)  # ``_fwd_state`` saved them
    if HAS_ANG:
        dt = tl.load(DT + bat * s_db + h * s_dh + tt * s_dl, mask=mc, other=0.0).to(tl.float32)
        _om, _c, _s, cosv, sinv = _rotation(
            ANG, bat, h, tt, mc, dt, NANG, s_gb, s_gs, s_gh, N2, NA, FAST
        )  # fmt: skip
    else:
        cosv = 0.0
        sinv = 0.0
    # rotate q and k right away (cos / sin die), keep them as dot operands only
    qe, qo = _load_qk(Q, QB, bat, g, h, tt, mc, offs_j, s_qb, s_ql, s_qg, HAS_ANG, cosv, sinv)
    qe = _operand(qe, FAST)
    qo = _operand(qo, FAST)
    ke, ko = _load_qk(K, KB, bat, g, h, tt, mc, offs_j, s_kb, s_kl, s_kg, HAS_ANG, cosv, sinv)
    ke = _operand(ke, FAST)
    ko = _operand(ko, FAST)
    # inter-chunk term first, so the state tile is dead before the C x C work starts
    pe, po = _state_tile(ST, gc, h, H, offs_p, offs_j, N2, P)
    se = _operand(tl.load(pe), FAST)
    so = _operand(tl.load(po), FAST)
    y = tl.exp(cs)[:, None] * (_dot(qe, tl.trans(se), FAST) + _dot(qo, tl.trans(so), FAST))
    vo = bat * s_vb + tt[:, None] * s_vl + h * s_vh + offs_p[None, :]
    x = tl.load(V + vo, mask=mc[:, None], other=0.0).to(tl.float32)
    sc, _dec, w = _scores(qe, qo, ke, ko, cs, gamma, kappa, C, FAST)
    y += _dot(sc * w, x, FAST)
    if HAS_D:
        y += tl.load(DSKIP + h).to(tl.float32) * x
    if HAS_Z:
        zo = bat * s_zb + tt[:, None] * s_zl + h * s_zh + offs_p[None, :]
        zt = tl.load(Z + zo, mask=mc[:, None], other=0.0).to(tl.float32)
        if SAVE_Y:
            co = ((bat * L + tt[:, None]) * H + h) * P + offs_p[None, :]
            tl.store(YPRE + co, y.to(YPRE.dtype.element_ty), mask=mc[:, None])
        y = y * zt * _sigmoid(zt, FAST)
    tl.store(
        OUT + bat * s_ob + tt[:, None] * s_ol + h * s_oh + offs_p[None, :],
        y.to(OUT.dtype.element_ty),
        mask=mc[:, None],
    )


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_dstate_kernel(
    Q,
    ADT,
    DT,
    TRAP,
    QB,
    ANG,
    Z,
    YPRE,
    DOUT,
    CHTAB,
    DY,
    DZ,
    DG,
    CA,
    COM,
    CSN,
    GK,
    s_qb,
    s_ql,
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
    NC,
    C: tl.constexpr,
    P: tl.constexpr,
    N2: tl.constexpr,
    NA: tl.constexpr,
    HAS_TRAP: tl.constexpr,
    HAS_ANG: tl.constexpr,
    HAS_Z: tl.constexpr,
    VARLEN: tl.constexpr,
    FAST: tl.constexpr,
):
    """Per (chunk, head): the state gradient the chunk's outputs send to its start state,
    sum_t exp(cs_t) dy_t q~_t^T, plus A_c and Omega_c for the reverse pass (and dz, dy when
    the output is gated), and the cos / sin of the in-chunk angles (``CSN``) that the other
    backward chunk kernels load instead of recomputing the angle scan."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    g = h // HPG
    bat, seq, tok_start, tok_end, seq_end = _chunk(gc, CHTAB, L, NC, C, VARLEN)
    offs_c = tl.arange(0, C)
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    tt = tok_start + offs_c
    mc = tt < tok_end
    adt, dt, gamma, kappa = _gates(
        ADT, DT, TRAP, bat, h, tt, mc, seq_end, s_ab, s_ah, s_al, s_db, s_dh, s_dl, s_tb, s_th,
        s_tl, HAS_TRAP, FAST,
    )  # fmt: skip
    cs = tl.cumsum(adt, 0)
    tl.store(CA + gc * H + h, tl.sum(adt, 0))
    _store_gates(GK, bat, h, H, L, tt, mc, gamma, kappa, cs)  # for ``_bwd_q`` / ``_k`` / ``_x``
    if HAS_ANG:
        om, cos_a, sin_a, cosv, sinv = _rotation(
            ANG, bat, h, tt, mc, dt, NANG, s_gb, s_gs, s_gh, N2, NA, FAST
        )  # fmt: skip
        offs_a = tl.arange(0, NA)
        ma = offs_a < NANG
        tl.store(COM + (gc * H + h) * NANG + offs_a, om, mask=ma)
        # stored from the scan's own (pairs x tokens) tiles; see ``_csn_offsets``
        o = _csn_offsets(bat, tt, h, L, H, offs_a, NANG)
        m = ma[:, None] & mc[None, :]
        tl.store(CSN + o, cos_a.to(CSN.dtype.element_ty), mask=m)
        tl.store(CSN + o + NANG * L, sin_a.to(CSN.dtype.element_ty), mask=m)
    else:
        cosv = 0.0
        sinv = 0.0
    qe, qo = _load_qk(Q, QB, bat, g, h, tt, mc, offs_j, s_qb, s_ql, s_qg, HAS_ANG, cosv, sinv)
    dy = tl.load(
        DOUT + bat * s_ob + tt[:, None] * s_ol + h * s_oh + offs_p[None, :],
        mask=mc[:, None],
        other=0.0,
    ).to(tl.float32)
    if HAS_Z:
        vo = ((bat * L + tt[:, None]) * H + h) * P + offs_p[None, :]  # contiguous buffers
        zo = bat * s_zb + tt[:, None] * s_zl + h * s_zh + offs_p[None, :]
        zt = tl.load(Z + zo, mask=mc[:, None], other=0.0).to(tl.float32)
        yp = tl.load(YPRE + vo, mask=mc[:, None], other=0.0).to(tl.float32)
        sz = _sigmoid(zt, FAST)
        tl.store(DZ + vo, (dy * yp * sz * (1.0 + zt * (1.0 - sz))).to(DZ.dtype.element_ty),
                 mask=mc[:, None])  # fmt: skip
        dy = dy * zt * sz
        tl.store(DY + vo, dy.to(DY.dtype.element_ty), mask=mc[:, None])
    dye = _operand(dy * tl.exp(cs)[:, None], FAST)
    qe = _operand(qe, FAST)
    qo = _operand(qo, FAST)
    pe, po = _state_tile(DG, gc, h, H, offs_p, offs_j, N2, P)
    tl.store(pe, _dot(tl.trans(dye), qe, FAST).to(DG.dtype.element_ty))
    tl.store(po, _dot(tl.trans(dye), qo, FAST).to(DG.dtype.element_ty))


@triton.jit
def _bwd_pass_kernel(
    DG,
    CA,
    COM,
    DSEND,
    DS0,
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
    state gradient in ``DG`` by the gradient of its end state (in its frame, before the
    rotation by Omega_c) and write the gradient of the start state of the sequence.

    The scalars that need G^ and the start state S~ together (d A_c, the state's share of
    d Omega_c) are left to ``_bwd_x``: computed here, as row-tile partial sums, their
    reductions (across warps, every step of a chain of dependent steps) and the extra read of
    S~ took this pass from 0.20 to 0.46-0.50 ms at (8, 4096, 32, 64, 128) on the H100."""
    seq, h, c0, nch, tile, offs_p = _pass_setup(SEQTAB, NC, NT, H, P, PB, VARLEN)
    offs_j = tl.arange(0, N2)
    mj = offs_j < NANG
    if HAS_DSEND:
        fe, fo = _state_tile(DSEND, seq, h, H, offs_p, offs_j, N2, P)
        ge = tl.load(fe)
        go = tl.load(fo)
    else:  # the end state was not used
        ge = tl.zeros((PB, N2), dtype=tl.float32)
        go = tl.zeros((PB, N2), dtype=tl.float32)
    top = c0 + tl.maximum(nch - 1, 0)
    de, do, a, om = _pass_load(DG, CA, COM, top, h, H, NANG, offs_p, offs_j, mj, N2, P)
    for it in range(0, nch):
        slot = top - it
        # the next (earlier) chunk's tiles load while this one is processed
        prev = tl.maximum(slot - 1, c0)
        ne, no, na, nom = _pass_load(DG, CA, COM, prev, h, H, NANG, offs_p, offs_j, mj, N2, P)
        if HAS_ANG:
            cw = tl.cos(om)[None, :]
            sw = tl.sin(om)[None, :]
            re = cw * ge - sw * go
            ro = sw * ge + cw * go
        else:
            re = ge
            ro = go
        pe, po = _state_tile(DG, slot, h, H, offs_p, offs_j, N2, P)
        tl.store(pe, re.to(DG.dtype.element_ty))
        tl.store(po, ro.to(DG.dtype.element_ty))
        ea = tl.exp(a)
        ge = ea * re + de
        go = ea * ro + do
        de, do, a, om = ne, no, na, nom
    ie, io = _state_tile(DS0, seq, h, H, offs_p, offs_j, N2, P)
    tl.store(ie, ge)
    tl.store(io, go)


@triton.jit
def _bwd_prologue(
    Q, K, V, GK, CA, QB, KB, ANG, DY, CHTAB, h, gc, s_qb, s_ql, s_qg, s_kb, s_kl, s_kg,
    s_vb, s_vl, s_vh, s_yb, s_yl, s_yh, L, H, HPG, NANG, NC, C: tl.constexpr, P: tl.constexpr,
    N2: tl.constexpr, NA: tl.constexpr, HAS_ANG: tl.constexpr, VARLEN: tl.constexpr,
    FAST: tl.constexpr,
):  # fmt: skip
    """What every backward chunk kernel loads or recomputes: the gates ``_bwd_dstate`` saved,
    the in-chunk rotation, q~, k~, x, dy."""
    g = h // HPG
    bat, seq, tok_start, tok_end, seq_end = _chunk(gc, CHTAB, L, NC, C, VARLEN)
    offs_c = tl.arange(0, C)
    offs_p = tl.arange(0, P)
    offs_j = tl.arange(0, N2)
    mj = offs_j < NANG
    tt = tok_start + offs_c
    mc = tt < tok_end
    gamma, kappa, cs = _load_gates(GK, bat, h, H, L, tt, mc)
    a_c = tl.load(CA + gc * H + h)
    u = tl.exp(a_c - cs) * kappa
    if HAS_ANG:  # ``ANG`` is the cos / sin buffer ``_bwd_dstate`` wrote
        cosv, sinv = _load_csn(ANG, bat, tt, mc, h, L, H, NANG, N2, NA)
    else:
        cosv = 0.0
        sinv = 0.0
    qe, qo = _load_qk(Q, QB, bat, g, h, tt, mc, offs_j, s_qb, s_ql, s_qg, HAS_ANG, cosv, sinv)
    ke, ko = _load_qk(K, KB, bat, g, h, tt, mc, offs_j, s_kb, s_kl, s_kg, HAS_ANG, cosv, sinv)
    # rotated q~ / k~ as dot operands (bf16 in fast mode: half the registers of four tiles)
    qe = _operand(qe, FAST)
    qo = _operand(qo, FAST)
    ke = _operand(ke, FAST)
    ko = _operand(ko, FAST)
    vo = bat * s_vb + tt[:, None] * s_vl + h * s_vh + offs_p[None, :]
    x = _operand(tl.load(V + vo, mask=mc[:, None], other=0.0), FAST)
    dy = _operand(
        tl.load(
            DY + bat * s_yb + tt[:, None] * s_yl + h * s_yh + offs_p[None, :],
            mask=mc[:, None],
            other=0.0,
        ),
        FAST,
    )
    bo = (bat * H + h) * L + tt
    return (
        bat, seq, tt, mc, offs_c, offs_p, offs_j, mj, gamma, kappa, cs, a_c, u, cosv, sinv,
        qe, qo, ke, ko, x, dy, vo, bo,
    )  # fmt: skip


@triton.jit
def _store_qk_grad(
    DH, DBP, de, do, CSN, NANG, bat, L, tt, mc, H, h, gc, N2: tl.constexpr, NA: tl.constexpr,
    HAS_ANG: tl.constexpr,
):  # fmt: skip
    """Rotate a q~ / k~ gradient back to the input frame (cos / sin loaded again from
    ``CSN``); store it per head (interleaved pairs) and its per-(chunk, head) column sum (the
    bias gradient's partial sum)."""
    if HAS_ANG:
        cosv, sinv = _load_csn(CSN, bat, tt, mc, h, L, H, NANG, N2, NA)
        ue = de * cosv + do * sinv
        uo = do * cosv - de * sinv
    else:
        ue = de
        uo = do
    # interleaved pairs again: whole contiguous rows
    u = tl.reshape(tl.join(ue, uo), (tt.shape[0], 2 * N2))
    offs_n = tl.arange(0, 2 * N2)
    hb = ((bat * L + tt[:, None]) * H + h) * (2 * N2) + offs_n[None, :]
    tl.store(DH + hb, u.to(DH.dtype.element_ty), mask=mc[:, None])
    tl.store(DBP + (gc * H + h) * (2 * N2) + offs_n, tl.sum(u, 0))


@triton.jit
def _pw(dy, x, cs, gamma, kappa, C: tl.constexpr, FAST: tl.constexpr):
    """dP * W: the gradient of the masked score matrix (dP = dy x^T)."""
    offs_c = tl.arange(0, C)
    ii = offs_c[:, None]
    jj = offs_c[None, :]
    dec = tl.where(ii > jj, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)
    w = dec * kappa[None, :] + tl.where(ii == jj, gamma[None, :], 0.0)
    return _dot(dy, tl.trans(x), FAST) * w


@triton.jit
def _bwd_q_kernel(
    Q,
    K,
    V,
    GK,
    CA,
    QB,
    KB,
    ANG,
    DY,
    CHTAB,
    ST,
    DQH,
    DQBP,
    RQ,
    GIN,
    s_qb,
    s_ql,
    s_qg,
    s_kb,
    s_kl,
    s_kg,
    s_vb,
    s_vl,
    s_vh,
    s_yb,
    s_yl,
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
):
    """Per (chunk, head), q side: per-head dq (summed over the group's heads by the caller)
    and its bias partial sum, the per-token q share of d theta (``RQ``, tokens last),
    and ``GIN`` (d cs through exp(cs) q~ S~) for ``_bwd_x``. (d A_c and the state's share of
    d Omega_c, which pair S~ with the end-state gradient, are computed at the end of
    ``_bwd_x``.)

    One kernel for the q and k sides was 1.2x faster at N = 128 on the H100 but, with bf16
    operands at N = 64, P = 64, made an illegal memory access (Triton 3.6; the same code runs
    in fp32 and at N = 128): both halves fill the 255 registers, so the split costs little."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    bat, seq, tt, mc, offs_c, offs_p, offs_j, mj, gamma, kappa, cs, a_c, u, cosv, sinv, \
        qe, qo, ke, ko, x, dy, vo, bo = _bwd_prologue(
            Q, K, V, GK, CA, QB, KB, ANG, DY, CHTAB, h, gc, s_qb, s_ql, s_qg, s_kb, s_kl, s_kg,
            s_vb, s_vl, s_vh, s_yb, s_yl, s_yh, L, H, HPG, NANG, NC, C, P, N2, NA, HAS_ANG,
            VARLEN, FAST,
        )  # fmt: skip
    eq = tl.exp(cs)
    pe, po = _state_tile(ST, gc, h, H, offs_p, offs_j, N2, P)
    se = _operand(tl.load(pe), FAST)
    so = _operand(tl.load(po), FAST)
    pw = _operand(_pw(dy, x, cs, gamma, kappa, C, FAST), FAST)
    ie = _dot(dy, se, FAST)
    io = _dot(dy, so, FAST)
    tl.store(GIN + bo, eq * (tl.sum(ie * qe, 1) + tl.sum(io * qo, 1)), mask=mc)
    dqe = _dot(pw, ke, FAST) + eq[:, None] * ie
    dqo = _dot(pw, ko, FAST) + eq[:, None] * io
    if HAS_ANG:  # the q share of d theta per token (scanned by ``_bwd_gates``), tokens last
        offs_a = tl.arange(0, NA)
        tl.store(
            RQ + ((bat * H + h) * NANG + offs_a[None, :]) * L + tt[:, None],
            _narrow(dqo * qe - dqe * qo, NA),
            mask=mc[:, None] & (offs_a < NANG)[None, :],
        )
    _store_qk_grad(
        DQH, DQBP, dqe, dqo, ANG, NANG, bat, L, tt, mc, H, h, gc, N2, NA, HAS_ANG
    )  # fmt: skip


@triton.jit
def _bwd_k_kernel(
    Q,
    K,
    V,
    GK,
    CA,
    QB,
    KB,
    ANG,
    DY,
    CHTAB,
    DG,
    DTOT,
    RQ,
    DOMS,
    DKH,
    DKBP,
    DU,
    s_qb,
    s_ql,
    s_qg,
    s_kb,
    s_kl,
    s_kg,
    s_vb,
    s_vl,
    s_vh,
    s_yb,
    s_yl,
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
):
    """Per (chunk, head), k side: per-head dk and its bias partial sum, ``DU`` (d u per token)
    and the angle-gradient terms ``_bwd_gates`` finishes: the per-token k share of d theta added
    to the q share in ``RQ``, and in ``DOMS`` the whole gradient every token of the chunk gets
    (d Omega_c through the rotation of the end state, plus the sequence total's ``DTOT``;
    ``_bwd_x`` adds the share of the state S~)."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    bat, seq, tt, mc, offs_c, offs_p, offs_j, mj, gamma, kappa, cs, a_c, u, cosv, sinv, \
        qe, qo, ke, ko, x, dy, vo, bo = _bwd_prologue(
            Q, K, V, GK, CA, QB, KB, ANG, DY, CHTAB, h, gc, s_qb, s_ql, s_qg, s_kb, s_kl, s_kg,
            s_vb, s_vl, s_vh, s_yb, s_yl, s_yh, L, H, HPG, NANG, NC, C, P, N2, NA, HAS_ANG,
            VARLEN, FAST,
        )  # fmt: skip
    pe, po = _state_tile(DG, gc, h, H, offs_p, offs_j, N2, P)
    ge = _operand(tl.load(pe), FAST)
    go = _operand(tl.load(po), FAST)
    ve = _dot(x, ge, FAST)
    vv = _dot(x, go, FAST)
    tl.store(DU + bo, tl.sum(ve * ke, 1) + tl.sum(vv * ko, 1), mask=mc)
    pw = _operand(_pw(dy, x, cs, gamma, kappa, C, FAST), FAST)
    dke = _dot(tl.trans(pw), qe, FAST) + u[:, None] * ve
    dko = _dot(tl.trans(pw), qo, FAST) + u[:, None] * vv
    if HAS_ANG:
        # in-chunk angles: every later token of the chunk; Omega_c: the whole chunk (through
        # the rotation of the end state); the sequence total: every token of the sequence
        d_om = tl.sum(u[:, None] * (ve * ko - vv * ke), 0)
        if HAS_DTOT:  # the sequence's total angle was used
            d_om += tl.load(DTOT + (seq * H + h) * NANG + offs_j, mask=mj, other=0.0)
        tl.store(DOMS + (gc * H + h) * NANG + offs_j, d_om, mask=mj)  # ``_bwd_x`` completes it
        offs_a = tl.arange(0, NA)
        am = mc[:, None] & (offs_a < NANG)[None, :]
        ao = ((bat * H + h) * NANG + offs_a[None, :]) * L + tt[:, None]
        r = _narrow(dko * ke - dke * ko, NA)
        tl.store(RQ + ao, r + tl.load(RQ + ao, mask=am, other=0.0), mask=am)
    _store_qk_grad(
        DKH, DKBP, dke, dko, ANG, NANG, bat, L, tt, mc, H, h, gc, N2, NA, HAS_ANG
    )  # fmt: skip


@triton.jit
def _bwd_gates_kernel(
    ANG,
    DT,
    TRAP,
    RQ,
    DOMS,
    CHTAB,
    SEQTAB,
    DGAM,
    DKAP,
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

    d theta_t is the reverse in-chunk cumsum of the per-token terms (``RQ``, q and k shares)
    plus the chunk's ``DOMS``; d omega = d theta * pi (1 - tanh^2) dt, and dt gets
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
    dg = tl.load(DGAM + bo, mask=mc, other=0.0) + tl.load(DKAP + bo, mask=mc, other=0.0)
    if HAS_ANG:
        offs_j = tl.arange(0, NA)  # the rotated pairs only (see ``_rotation``)
        mj = offs_j < NANG
        am = mj[:, None] & mc[None, :]
        ang = tl.load(
            ANG + bat * s_gb + h * s_gh + offs_j[:, None] * s_gs + tt[None, :], mask=am, other=0.0
        ).to(tl.float32)
        t = _tanh(ang, FAST)
        a = tl.load(
            RQ + ((bat * H + h) * NANG + offs_j[:, None]) * L + tt[None, :], mask=am, other=0.0
        )
        d_om = tl.load(DOMS + (gc * H + h) * NANG + offs_j, mask=mj, other=0.0)
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
        dkp = tl.load(DKAP + bo - 1, mask=mp, other=0.0)
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
    GK,
    CA,
    QB,
    KB,
    ANG,
    DSKIP,
    DY,
    CHTAB,
    DG,
    GIN,
    DU,
    ST,
    DOMS,
    DX,
    DADT,
    DKAP,
    DGAM,
    DDP,
    s_qb,
    s_ql,
    s_qg,
    s_kb,
    s_kl,
    s_kg,
    s_vb,
    s_vl,
    s_vh,
    s_yb,
    s_yl,
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
):
    """Per (chunk, head): dx (intra-chunk, through the end state, D skip), D's partial sum and
    the gradients of the per-token gates (d adt, d kappa, d gamma), using the per-token terms
    ``_bwd_q`` and ``_bwd_k`` stored."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gc = (pid // H).to(tl.int64)
    bat, seq, tt, mc, offs_c, offs_p, offs_j, mj, gamma, kappa, cs, a_c, u, cosv, sinv, \
        qe, qo, ke, ko, x, dy, vo, bo = _bwd_prologue(
            Q, K, V, GK, CA, QB, KB, ANG, DY, CHTAB, h, gc, s_qb, s_ql, s_qg, s_kb, s_kl, s_kg,
            s_vb, s_vl, s_vh, s_yb, s_yl, s_yh, L, H, HPG, NANG, NC, C, P, N2, NA, HAS_ANG,
            VARLEN, FAST,
        )  # fmt: skip
    sc, dec, w = _scores(qe, qo, ke, ko, cs, gamma, kappa, C, FAST)
    pe, po = _state_tile(DG, gc, h, H, offs_p, offs_j, N2, P)
    ge = _operand(tl.load(pe), FAST)
    go = _operand(tl.load(po), FAST)
    dx = _dot(tl.trans(sc * w), dy, FAST)
    dx += u[:, None] * (_dot(ke, tl.trans(ge), FAST) + _dot(ko, tl.trans(go), FAST))
    if HAS_D:
        dx += tl.load(DSKIP + h).to(tl.float32) * dy
        tl.store(DDP + gc * H + h, tl.sum(tl.sum(dy.to(tl.float32) * x.to(tl.float32), 1), 0))
    co = ((bat * L + tt[:, None]) * H + h) * P + offs_p[None, :]  # dx is contiguous
    tl.store(DX + co, dx.to(DX.dtype.element_ty), mask=mc[:, None])
    dwt = _dot(dy, tl.trans(x), FAST) * sc
    du = tl.load(DU + bo, mask=mc, other=0.0)
    ms = dwt * dec * kappa[None, :]
    dcs = tl.load(GIN + bo, mask=mc, other=0.0) + tl.sum(ms, 1) - tl.sum(ms, 0) - u * du
    dadt = tl.cumsum(dcs, 0, reverse=True) + tl.sum(u * du, 0)
    tl.store(DKAP + bo, tl.exp(a_c - cs) * du + tl.sum(dwt * dec, 0), mask=mc)
    offs_c2 = offs_c[:, None]
    tl.store(DGAM + bo, tl.sum(tl.where(offs_c2 == offs_c[None, :], dwt, 0.0), 1), mask=mc)
    # last, when the chunk tiles are dead: G^ (again, from L2) and the start state S~ for
    # d A_c's state term exp(A_c) <S~, G^> and the state's share of d Omega_c,
    # exp(A_c) sum_p (G^e S~o - G^o S~e)
    ea = tl.exp(a_c)
    ge, go = _state_load(DG, gc, h, H, offs_p, offs_j, N2, P)
    se, so = _state_load(ST, gc, h, H, offs_p, offs_j, N2, P)
    tl.store(DADT + bo, dadt + ea * tl.sum(tl.sum(se * ge + so * go, 1), 0), mask=mc)
    if HAS_ANG:
        om = DOMS + (gc * H + h) * NANG + offs_j
        d_om = ea * (tl.sum(ge * so, 0) - tl.sum(go * se, 0))
        tl.store(om, tl.load(om, mask=mj, other=0.0) + d_om, mask=mj)
