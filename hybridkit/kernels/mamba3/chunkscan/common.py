"""Triton helpers shared by the SISO forward and backward kernels.

Per-token gates (dt, gamma, kappa and the in-chunk cumsum of adt) and the buffer that carries
them from a pass's first chunk kernel to the later ones; chunk-slot bookkeeping (dense or
packed); the in-chunk rotation (angle scan, cos / sin, pair widening); loads of q / k with bias
and rotation; the masked score matrix; addresses of de-interleaved P x N state tiles; and the
set-up of the element-wise passes over chunks. Every function here is inlined into the kernels
of :mod:`.forward` and :mod:`.backward`. The design is in ``docs/kernels.md``.
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
def _rows(tok_start, tok_end, C: tl.constexpr, R: tl.constexpr):
    """(token, rank, mask) of the C * R rows of a chunk: row i is token ``tok_start + i // R``,
    rank ``i % R``. MIMO runs the SISO algorithm on these rows; only the masks (a token's ranks
    see each other) and the per-token sums differ (``docs/mamba3.md`` section 3.9)."""
    offs = tl.arange(0, C * R)
    if R == 1:
        tt = tok_start + offs
        rr = offs * 0
    else:
        tt = tok_start + offs // R
        rr = offs % R
    return tt, rr, tt < tok_end


@triton.jit
def _row_index(tt, rr, R: tl.constexpr):
    """Global row index token * R + rank of the chunk's rows, written so the compiler sees
    consecutive rows as consecutive (vectorised loads / stores of per-row buffers)."""
    if R == 1:
        return tt
    else:
        offs = tl.arange(0, tt.shape[0])
        return (tt - offs // R) * R + offs


@triton.jit
def _rank_sum(x, R: tl.constexpr):
    """Per-row vector (C * R,) -> per-token sums (C,)."""
    if R == 1:
        return x
    else:
        return tl.sum(tl.reshape(x, (x.shape[0] // R, R)), 1)


@triton.jit
def _rank_sum2(x, R: tl.constexpr):
    """Per-row tile (C * R, K) -> per-token sums (C, K)."""
    if R == 1:
        return x
    else:
        return tl.sum(tl.reshape(x, (x.shape[0] // R, R, x.shape[1])), 1)


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
def _store_gates(GATES, bat, h, H, L, tt, mc, gamma, kappa, cs):
    """Save a chunk's gamma, kappa and in-chunk cumsum of adt for the kernels after this one.

    ``_gates`` is ~450 PTX instructions per thread where its results meet C x C tiles (two
    sigmoids, shifted loads, a scan, each rematerialised in every layout that needs them), a
    tenth of a backward chunk kernel; loading three vectors costs a few."""
    o = _gate_offsets(bat, h, H, L, tt)
    tl.store(GATES + o, gamma, mask=mc)
    tl.store(GATES + o + L, kappa, mask=mc)
    tl.store(GATES + o + 2 * L, cs, mask=mc)


@triton.jit
def _load_gates(GATES, bat, h, H, L, tok, mtok, R: tl.constexpr):
    """gamma, kappa and cs of one chunk's rows as ``_store_gates`` saved them (padded tokens:
    0): loaded once per token and repeated for its R rows (``_expand_rows``)."""
    o = _gate_offsets(bat, h, H, L, tok)
    gamma = tl.load(GATES + o, mask=mtok, other=0.0)
    kappa = tl.load(GATES + o + L, mask=mtok, other=0.0)
    cs = tl.load(GATES + o + 2 * L, mask=mtok, other=0.0)
    return _expand_rows(gamma, R), _expand_rows(kappa, R), _expand_rows(cs, R)


@triton.jit
def _expand_rows(x, R: tl.constexpr):
    """A per-token vector (C,) as the chunk's per-row vector (C * R,): each value R times.
    (Loading the repeated tokens directly issues one scalar load per row.)"""
    if R == 1:
        return x
    else:
        return tl.reshape(tl.broadcast_to(x[:, None], (x.shape[0], R)), (x.shape[0] * R,))


@triton.jit
def _expand_rows2(x, R: tl.constexpr):
    """A per-token tile (C, K) as the chunk's row tile (C * R, K): each token's row R times."""
    if R == 1:
        return x
    else:
        return tl.reshape(
            tl.broadcast_to(x[:, None, :], (x.shape[0], R, x.shape[1])),
            (x.shape[0] * R, x.shape[1]),
        )


@triton.jit
def _tokens(tok_start, tok_end, C: tl.constexpr):
    """The chunk's token indices and mask."""
    tok = tok_start + tl.arange(0, C)
    return tok, tok < tok_end


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
    R: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """The in-chunk rotation of the chunk's tokens ``tt`` (dt per token): per-pair angle
    increments, their in-chunk cumsum and its cos / sin. Returns the chunk's total angle per
    pair (NA), the cos / sin as NA x C tiles (tokens last, as scanned) and as (C * R) x N2 row
    tiles for rotating q / k (each token's rows share its angle).

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
    cosv = _widen(_expand_rows2(tl.trans(cos_a), R), 1.0, N2)
    sinv = _widen(_expand_rows2(tl.trans(sin_a), R), 0.0, N2)
    return tl.sum(om, 1), cos_a, sin_a, cosv, sinv


@triton.jit
def _csn_offsets(bat, tt, h, L, H, offs_j, NANG):
    """Offsets of the cos half of an N/2 x C tile of the per-token cos / sin buffer, laid out
    tokens last, (B, H, 2, S, L), like the angles: ``_bwd_dstate`` stores the tiles its scan
    produced without a layout change. (Stored tokens-first, the compiler recomputed the whole
    angle scan in a second layout for the store; docs/kernels.md, "Tried and dropped".)"""
    return ((bat * H + h) * (2 * NANG) + offs_j[:, None]) * L + tt[None, :]


@triton.jit
def _load_csn(
    COS_SIN, bat, tok, mtok, h, L, H, NANG, N2: tl.constexpr, NA: tl.constexpr, R: tl.constexpr
):  # fmt: skip
    """cos / sin of the in-chunk angles as (C * R) x N/2 row tiles, as ``_bwd_dstate`` stored
    them: loaded per token (``tok``), NA wide (the rotated pairs; padded pairs and tokens: cos 1,
    sin 0), repeated for the R rows of each token and widened (``_widen``). Loaded where used,
    so the two C x N/2 fp32 tiles (64 registers per thread at 4 warps, C 64, N 128) need not stay
    live through a kernel. (Loading the R-fold repeated tokens directly was scalar 2-byte
    loads: addresses that repeat cannot be vectorised.)"""
    offs_a = tl.arange(0, NA)
    o = _csn_offsets(bat, tok, h, L, H, offs_a, NANG)
    m = (offs_a < NANG)[:, None] & mtok[None, :]
    cosv = tl.trans(tl.load(COS_SIN + o, mask=m, other=1.0).to(tl.float32))
    sinv = tl.trans(tl.load(COS_SIN + o + NANG * L, mask=m, other=0.0).to(tl.float32))
    return _widen(_expand_rows2(cosv, R), 1.0, N2), _widen(_expand_rows2(sinv, R), 0.0, N2)


@triton.jit
def _load_qk(
    Qp, QB, bat, g, h, tt, rr, mc, offs_j, s_b, s_l, s_r, s_g, HAS_ANG: tl.constexpr, cosv, sinv,
    R: tl.constexpr, HALVES: tl.constexpr,
):  # fmt: skip
    """The two pair halves of q (or k) + per-head bias, rotated by the in-chunk angles.

    Rows are the chunk's (token, rank) rows (``_rows``). Pairs are (2j, 2j + 1) (SISO) or
    (j, j + N/2) (``HALVES``, MIMO). Rows are loaded whole (16-byte vectors) and split into the
    pair halves in registers: two stride-2 loads issued one 2-byte load per element and kept the
    load unit saturated."""
    offs_n = tl.arange(0, 2 * offs_j.shape[0])
    rows = bat * s_b + tt[:, None] * s_l + g * s_g + offs_n[None, :]
    if R > 1:
        rows += rr[:, None] * s_r
    qv = tl.load(Qp + rows, mask=mc[:, None], other=0.0).to(tl.float32)
    if R == 1:
        bv = tl.load(QB + h * offs_n.shape[0] + offs_n).to(tl.float32)[None, :]
    else:  # one bias per (head, rank): loaded R x N, repeated over the chunk's tokens
        offs_r = tl.arange(0, R)
        bv = tl.load(QB + (h * R + offs_r[:, None]) * offs_n.shape[0] + offs_n[None, :])
        bv = tl.reshape(
            tl.broadcast_to(bv.to(tl.float32)[None, :, :], (tt.shape[0] // R, R, offs_n.shape[0])),
            (tt.shape[0], offs_n.shape[0]),
        )
    qv = tl.where(mc[:, None], qv + bv, 0.0)
    if HALVES:
        qe, qo = tl.split(tl.permute(tl.reshape(qv, (tt.shape[0], 2, offs_j.shape[0])), (0, 2, 1)))
    else:
        qe, qo = tl.split(tl.reshape(qv, (tt.shape[0], offs_j.shape[0], 2)))
    if HAS_ANG:
        return qe * cosv - qo * sinv, qe * sinv + qo * cosv
    else:
        return qe, qo


@triton.jit
def _token_pairs(CR: tl.constexpr, R: tl.constexpr):
    """Token indices within the chunk of the rows (column vector) and columns (row vector) of a
    CR x CR score tile: row i is token i // R."""
    offs = tl.arange(0, CR)
    if R > 1:
        offs = offs // R
    return offs[:, None], offs[None, :]


@triton.jit
def _decay_mask(cs, CR: tl.constexpr, R: tl.constexpr):
    """exp(cs_i - cs_j) where row i's token comes after column j's, else 0 (strictly lower
    block-triangular); and the same-token test (the diagonal, or R x R diagonal blocks)."""
    ii, jj = _token_pairs(CR, R)
    dec = tl.where(ii > jj, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)
    return dec, ii == jj


@triton.jit
def _x_rows(V, PSI, bat, tt, rr, mc, h, s_b, s_l, s_h, P: tl.constexpr, R: tl.constexpr):
    """fp32 (C * R, P) rows of x~ = x[token] * psi[h, rank] (MIMO's per-rank input scaling;
    SISO: x itself) and of the raw x (for the gradient of psi)."""
    offs_p = tl.arange(0, P)
    x = tl.load(
        V + bat * s_b + tt[:, None] * s_l + h * s_h + offs_p[None, :], mask=mc[:, None], other=0.0
    ).to(tl.float32)
    if R == 1:
        return x, x
    else:
        psi = tl.load(PSI + (h * R + rr[:, None]) * P + offs_p[None, :]).to(tl.float32)
        return x * psi, x


@triton.jit
def _row_offsets(bat, tt, rr, h, s_b, s_l, s_r, s_h, P: tl.constexpr, R: tl.constexpr):
    """Offsets of the (C * R, P) rows of a (B, L, R, H, P) tensor (y, dy)."""
    o = bat * s_b + tt[:, None] * s_l + h * s_h + tl.arange(0, P)[None, :]
    if R > 1:
        o += rr[:, None] * s_r
    return o


@triton.jit
def _masked_weights(cs, gamma, kappa, CR: tl.constexpr, R: tl.constexpr):
    """The strictly-lower decay mask and the masked weights W (gamma on the diagonal, or on
    the diagonal R x R blocks for MIMO: the ranks of one token see each other)."""
    dec, same = _decay_mask(cs, CR, R)
    return dec, dec * kappa[None, :] + tl.where(same, gamma[None, :], 0.0)


@triton.jit
def _scores(qe, qo, ke, ko, cs, gamma, kappa, CR: tl.constexpr, R: tl.constexpr,
            FAST: tl.constexpr):  # fmt: skip
    """q~ k~^T, the decay mask and the masked weights W (``_masked_weights``)."""
    sc = _dot(qe, tl.trans(ke), FAST) + _dot(qo, tl.trans(ko), FAST)
    dec, w = _masked_weights(cs, gamma, kappa, CR, R)
    return sc, dec, w


@triton.jit
def _state_tile(buf, slot, h, H, offs_p, offs_j, N2: tl.constexpr, P: tl.constexpr):
    """Addresses of the even / odd halves of rows ``offs_p`` of one (slot, head) P x N state
    (de-interleaved columns)."""
    base = buf + (slot * H + h) * (P * 2 * N2)
    pe = base + offs_p[:, None] * (2 * N2) + offs_j[None, :]
    return pe, pe + N2


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
    buf, DECAY, OMEGA, slot, h, H, NANG, offs_p, offs_j, mj, N2: tl.constexpr, P: tl.constexpr
):
    de, do = _state_load(buf, slot, h, H, offs_p, offs_j, N2, P)
    a = tl.load(DECAY + slot * H + h)
    om = tl.load(OMEGA + (slot * H + h) * NANG + offs_j, mask=mj, other=0.0)
    return de, do, a, om
