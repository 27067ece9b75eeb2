"""The fused Mamba-3 decode step in Triton: one launch from ``in_proj``'s split to the gate.

One program per (sequence, head) holds the head's whole P x N state tile and does, in order
(docs/mamba3.md 2.4 / 2.5 for one token, docs/kernels.md "The fused decode step"):

1. the scalar gates: dt = softplus(dd_dt + dt_bias), A dt, alpha = exp(A dt), lambda =
   sigmoid(trap) (1 without the trapezoid), beta = (1 - lambda) dt alpha, gamma = lambda dt;
2. the angle update Theta = (Theta_prev + pi tanh(a) dt) mod 2 pi, and cos / sin per state column
   for the pairing (``(2j, 2j+1)`` interleaved, ``(j, j + N/2)`` halves);
3. per rank: BCNorm of the raw B (its RMS over N and the norm scale), the head's bias, the
   rotation -> the new key, written to the k state after the previous key was read;
4. h = alpha h + sum_r beta (v_prev psi_r) (x) k_prev_r + gamma (x psi_r) (x) k_r, in fp32, written
   back in place (fp32 or bf16 storage);
5. per rank: the same for C -> q_r, y_r = h q_r + D x psi_r, and either the gated MIMO sum
   ``sum_r mimo_o_r y_r silu(z mimo_z_r)``, with the per-head (grouped) output norm before or
   after the gate when the layer has one (one (B, H, P) output in x's dtype), or y per rank in
   fp32 for layers whose output norm spans all heads.

Every read of an old state value (angle, k, v) happens before a block barrier and every write
of its new value after it: a value read by one thread must not already hold the new token when a
slower warp reads it.

With the kernel setting ``step_split`` S > 1 each (sequence, head) gets S programs, program s
owning state rows ``[s P / S, (s + 1) P / S)`` (docs/kernels.md, "Splitting a head's rows"). Each
computes the whole key, query and angles (a few hundred flops) but touches only its rows of the
state and of v. The new keys and angles are shared by the head's programs, and one program
writing them could overwrite a previous key another program has not read yet, so program 0
writes them to a scratch buffer instead; and the gate's output norm spans the whole head. So the
split step leaves y per rank (the ungated output) and a second launch,
:func:`mamba3_step_finish_kernel`, copies the keys and angles into the state and applies the gate
(and norm, and MIMO's sum over ranks).

Transcendentals use the exact ``tl`` functions (the step is memory-bound, so approximations buy
nothing) and no libdevice call, so the CPU interpreter runs the same code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridkit.compat import interpreting
from hybridkit.kernels.config import step_launch
from hybridkit.kernels.mamba3.chunkscan.common import _mod2pi
from hybridkit.kernels.mamba3.state import Mamba3State
from hybridkit.kernels.mamba3.step.weights import StepInputs, StepWeights
from hybridkit.kernels.pdl import launch_options, use_pdl

PI = tl.constexpr(3.141592653589793)
NORM_MODES = {"none": 0, "grouped_pregate": 1, "grouped_postgate": 2}
#: 1: the split step's finish kernel launches with PDL too (when the step does), so the kernel
#: after it (``out_proj``) may start and load its weights while it runs; 0 (the default): the
#: finish starts and ends the chain of PDL launches as a plain kernel. Timed on the H100 the two
#: were equal (400M, batch 1: 0.550 against 0.553 ms; 16: 1.139 against 1.140,
#: ``benchmarks/results/decode_rows_preload_h100.md``); ``benchmarks/decode.py --launch
#: step:FINISH_PDL=1`` compares them.
FINISH_PDL = 0
#: 1 (the default): under PDL the split step also reads its state (its rows, the previous v and
#: key) before waiting for ``in_proj``, so the state's trip to DRAM overlaps ``in_proj``'s tail;
#: 0: after the wait, as before. Only where that is safe (:func:`_early_state`). On the H100 the
#: 400M model's batch-1 token took 0.546-0.548 ms against 0.558 (batch 16 / 128 unchanged: cuBLAS
#: ``in_proj`` takes no PDL; ``benchmarks/results/decode_early_state_h100.md``).
EARLY_STATE = 1


def _early_state(pdl: bool, split: int, finish_pdl: bool) -> bool:
    """Whether the step kernel may read the layer's state before ``griddepcontrol.wait``.

    The state is written by nothing but this layer's previous step (its step kernel and, split,
    its finish kernel), so the read is safe when that step has completed whenever this kernel
    starts. A PDL kernel may start while earlier PDL kernels still run, but not before a kernel
    launched *without* PDL has completed, and that one starts only after everything before it
    has completed (kernels/pdl.py). The split step's finish kernel is such a kernel while
    ``FINISH_PDL`` is 0: between two steps of a layer there is always one, after the earlier
    step's last write. Unsplit, a layer's steps can follow each other through PDL kernels alone
    (a loop of in_proj, step, out_proj with nothing else), so the state is read after the wait
    there."""
    return pdl and split > 1 and not finish_pdl and bool(EARLY_STATE)


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20), without log1p (a libdevice call)."""
    big = tl.minimum(x, 20.0)
    mid = tl.log(1.0 + tl.exp(big))
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(big), mid))


@triton.jit
def _sigmoid(x):
    """Written out: ``tl.sigmoid`` is itself a jit function the interpreter cannot call."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _rotation_factors(
    ANGLE, ANG, b, h, H, s_ab, s_as, dt, offs_n, N: tl.constexpr, S: tl.constexpr,
    HALVES: tl.constexpr,
):  # fmt: skip
    """Per state column n: cos / sin of its pair's new angle, its partner column and the sign
    of the partner's term (-1 for the first of a pair, +1 for the second)."""
    if HALVES:
        first = offs_n < N // 2
        j = tl.where(first, offs_n, offs_n - N // 2)
        partner = tl.where(first, offs_n + N // 2, offs_n - N // 2)
    else:
        first = offs_n % 2 == 0
        j = offs_n // 2
        partner = tl.where(first, offs_n + 1, offs_n - 1)
    rot = (j < S) & (offs_n < N)
    prev = tl.load(ANGLE + (b * H + h) * S + j, mask=rot, other=0.0)
    raw = tl.load(ANG + b * s_ab + j * s_as, mask=rot, other=0.0).to(tl.float32)
    theta = _mod2pi(prev + PI * (2.0 * _sigmoid(2.0 * raw) - 1.0) * dt)
    cos = tl.where(rot, tl.cos(theta), 1.0)
    sin = tl.where(rot, tl.sin(theta), 0.0)
    sign = tl.where(first, -1.0, 1.0)
    return cos, sin * sign, partner


@triton.jit
def _key_inputs(
    SRC, s_b, s_r, s_g, b, r, g, BIAS, NORM, h, offs_n, partner,
    N: tl.constexpr, R: tl.constexpr, HAS_ANG: tl.constexpr,
):  # fmt: skip
    """Everything :func:`_key_from` reads for one rank's key (or query) of head h: the raw row,
    the norm scale and the bias, and with the rotation the same at each column's partner.
    Loaded apart from the arithmetic so a caller can issue every load before the first
    reduction: a reduction's barrier ends a round of loads (no load moves above it), and each
    round costs a trip to memory."""
    mask = offs_n < N
    base = SRC + b * s_b + r * s_r + g * s_g
    bias = BIAS + (h * R + r) * N
    raw = tl.load(base + offs_n, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(NORM + offs_n, mask=mask, other=0.0)
    shift = tl.load(bias + offs_n, mask=mask, other=0.0)
    if HAS_ANG:
        raw_p = tl.load(base + partner, mask=mask, other=0.0).to(tl.float32)
        scale_p = tl.load(NORM + partner, mask=mask, other=0.0)
        shift_p = tl.load(bias + partner, mask=mask, other=0.0)
    else:
        raw_p, scale_p, shift_p = raw, scale, shift
    return raw, scale, shift, raw_p, scale_p, shift_p


@triton.jit
def _key_from(
    raw, scale, shift, raw_p, scale_p, shift_p, eps, cos, ssin, N: tl.constexpr,
    HAS_ANG: tl.constexpr,
):  # fmt: skip
    """BCNorm(raw) * scale + bias, rotated: one rank's key (or query), fp32 (N,)."""
    rstd = tl.rsqrt(tl.sum(raw * raw, axis=0) / N + eps)
    u = raw * rstd * scale + shift
    if HAS_ANG:
        u = u * cos + (raw_p * rstd * scale_p + shift_p) * ssin
    return u


@triton.jit
def _gate(y, zr, norm_w, eps, P: tl.constexpr, NORM: tl.constexpr):
    """``y silu(z)`` of one rank over a head's P channels, with the grouped output norm before
    (``NORM`` 1) or after (2) the gate; rows past P must hold 0 in ``y``."""
    if NORM == 1:  # grouped pre-gate: normalise y over the head, then gate
        y = y * tl.rsqrt(tl.sum(y * y, axis=0) / P + eps) * norm_w
    o = y * zr * _sigmoid(zr)
    if NORM == 2:  # grouped post-gate: gate, then normalise over the head
        o = o * tl.rsqrt(tl.sum(o * o, axis=0) / P + eps) * norm_w
    return o


@triton.jit
def mamba3_step_kernel(
    X, Z, BK, CQ, DDT, DDA, TRAP, ANG,
    s_xb, s_xh, s_zb, s_zh, s_bkb, s_bkr, s_bkg, s_cqb, s_cqr, s_cqg,
    s_dtb, s_dtn, s_dab, s_dan, s_trb, s_trn, s_ab, s_as,
    ANGLE, SSM, KST, VST, KNEW, THNEW,
    DT_BIAS, B_BIAS, C_BIAS, B_NORM, C_NORM, DSKIP, MX, MZ, MO, OUT_NORM,
    OUT,
    a_floor, eps,
    H: tl.constexpr, G: tl.constexpr, R: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    HEAVY_TAIL: tl.constexpr, HAS_TRAP: tl.constexpr, HAS_ANG: tl.constexpr,
    HALVES: tl.constexpr, HAS_D: tl.constexpr, HAS_MX: tl.constexpr, GATED: tl.constexpr,
    HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr, NORM: tl.constexpr, USE_PDL: tl.constexpr,
    SPLIT: tl.constexpr, EARLY_STATE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # int64: B * H * P * N exceeds 2**31 at large batch
    b = pid // H
    h = pid % H
    g = h // (H // G)
    offs_n = tl.arange(0, BLOCK_N)
    if SPLIT == 1:  # the rows as a plain arange: the compiler knows their alignment
        part = 0
        offs_p = tl.arange(0, BLOCK_P)
    else:  # which BLOCK_P rows of the head
        part = tl.program_id(1)
        offs_p = tl.multiple_of(part * BLOCK_P, BLOCK_P) + tl.arange(0, BLOCK_P)
    # SPLIT > 1: program 0 writes the head's new keys and angles to KNEW / THNEW, not the state
    # (another program of the head may not have read the old ones yet; the finish kernel copies)
    writer = (offs_n * 0 + part) == 0  # per column: the interpreter rejects a scalar mask term
    mask_n = offs_n < N
    mask_p = offs_p < P

    # 0. per-head parameters, which no kernel writes: with PDL read before waiting for the
    # previous kernel (in_proj), whose outputs and the state are read after it (kernels/pdl.py)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    dt_bias = tl.load(DT_BIAS + h).to(tl.float32)
    if HAS_D:
        d_skip = tl.load(DSKIP + h).to(tl.float32)
    norm_w = 1.0
    if GATED:  # noqa: SIM102
        if NORM != 0:
            norm_w = tl.load(OUT_NORM + h * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    tile = (b * H + h) * P * N + offs_p[:, None] * N + offs_n[None, :]
    mask_t = mask_p[:, None] & mask_n[None, :]
    v_ptr = VST + (b * H + h) * P + offs_p
    k_off0 = (b * H + h) * N + offs_n  # SISO's key slot
    if EARLY_STATE:  # the state too (its rows, previous v and key): see _early_state
        state = tl.load(SSM + tile, mask=mask_t, other=0.0).to(tl.float32)
        v_prev = tl.load(v_ptr, mask=mask_p, other=0.0).to(tl.float32)
        if R == 1:
            k_prev0 = tl.load(KST + k_off0, mask=mask_n, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()

    # 1. scalar gates
    dt = _softplus(tl.load(DDT + b * s_dtb + h * s_dtn).to(tl.float32) + dt_bias)
    a_in = tl.load(DDA + b * s_dab + h * s_dan).to(tl.float32)
    if HEAVY_TAIL:
        act = tl.where(a_in >= 0, 1.0 + a_in, 1.0 / (1.0 - tl.minimum(a_in, 0.0)))
    else:
        act = _softplus(a_in)
    alpha = tl.exp(-tl.maximum(act, a_floor) * dt)
    if HAS_TRAP:
        lam = _sigmoid(tl.load(TRAP + b * s_trb + h * s_trn).to(tl.float32))
    else:
        lam = 1.0
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt

    # the state tile is loaded before the gates and keys (safe: only this program touches it);
    # on the H200 this measured the same as loading it after them (the compiler issues every
    # load before the first barrier either way; docs/kernels.md, "The fused decode step")
    if not EARLY_STATE:
        state = tl.load(SSM + tile, mask=mask_t, other=0.0).to(tl.float32)

    # 2. rotation factors, and the new angles (stored after the barrier)
    if HAS_ANG:
        cos, ssin, partner = _rotation_factors(
            ANGLE, ANG, b, h, H, s_ab, s_as, dt, offs_n, N, S, HALVES
        )
        offs_s = tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        angle_off = (b * H + h) * S + offs_s
        angle_ptr = ANGLE + angle_off
        raw_s = tl.load(ANG + b * s_ab + offs_s * s_as, mask=mask_s, other=0.0).to(tl.float32)
        theta = _mod2pi(
            tl.load(angle_ptr, mask=mask_s, other=0.0)
            + PI * (2.0 * _sigmoid(2.0 * raw_s) - 1.0) * dt
        )
    else:
        cos, ssin, partner = 1.0, 0.0, offs_n

    x = tl.load(X + b * s_xb + h * s_xh + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    if not EARLY_STATE:
        v_prev = tl.load(v_ptr, mask=mask_p, other=0.0).to(tl.float32)
    # the token's other inputs too, so they share the first round trip to memory: at small
    # batch the step is a chain of dependent loads, and each round costs about a microsecond
    if GATED:
        z = tl.load(Z + b * s_zb + h * s_zh + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    if R == 1:  # SISO: key, previous key and query before the one barrier, every load of
        # both ahead of the first reduction (one round trip to memory instead of three)
        if not EARLY_STATE:
            k_prev0 = tl.load(KST + k_off0, mask=mask_n, other=0.0).to(tl.float32)
        kr, ks, kb, krp, ksp, kbp = _key_inputs(
            BK, s_bkb, s_bkr, s_bkg, b, 0, g, B_BIAS, B_NORM, h, offs_n, partner, N, R, HAS_ANG
        )
        qr, qs, qb, qrp, qsp, qbp = _key_inputs(
            CQ, s_cqb, s_cqr, s_cqg, b, 0, g, C_BIAS, C_NORM, h, offs_n, partner, N, R, HAS_ANG
        )
        k0 = _key_from(kr, ks, kb, krp, ksp, kbp, eps, cos, ssin, N, HAS_ANG)
        q0 = _key_from(qr, qs, qb, qrp, qsp, qbp, eps, cos, ssin, N, HAS_ANG)
    tl.debug_barrier()
    if HAS_ANG:
        if SPLIT == 1:
            tl.store(angle_ptr, theta, mask=mask_s)
        else:
            tl.store(THNEW + angle_off, theta, mask=mask_s & ((offs_s * 0 + part) == 0))
    tl.store(v_ptr, x.to(VST.dtype.element_ty), mask=mask_p)

    # 3. keys (the previous one read before the new one is written) and the state update.
    # MIMO: rank r + 1's loads are issued before rank r's reduction, whose barrier would
    # otherwise start a new trip to memory for every rank (_key_inputs)
    upd = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if R > 1:
        nr, ns, nb, nrp, nsp, nbp = _key_inputs(
            BK, s_bkb, s_bkr, s_bkg, b, 0, g, B_BIAS, B_NORM, h, offs_n, partner, N, R, HAS_ANG
        )
        n_prev = tl.load(KST + ((b * R) * H + h) * N + offs_n, mask=mask_n, other=0.0)
    for r in tl.static_range(R):
        if HAS_MX:
            psi = tl.load(MX + (h * R + r) * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        else:
            psi = 1.0
        if R == 1:
            k_prev, k = k_prev0, k0
            _store_key(KST, KNEW, k_off0, k, mask_n, writer, SPLIT)
        else:
            k_off = ((b * R + r) * H + h) * N + offs_n
            k_ptr = KST + k_off
            kr, ks, kb, krp, ksp, kbp, k_prev = nr, ns, nb, nrp, nsp, nbp, n_prev.to(tl.float32)
            if r + 1 < R:  # the next rank's inputs (its own k slot: not yet written)
                nr, ns, nb, nrp, nsp, nbp = _key_inputs(
                    BK, s_bkb, s_bkr, s_bkg, b, r + 1, g, B_BIAS, B_NORM, h, offs_n, partner, N,
                    R, HAS_ANG,
                )  # fmt: skip
                n_prev = tl.load(k_ptr + H * N, mask=mask_n, other=0.0)
            else:  # the queries' first rank, for step 4
                nr, ns, nb, nrp, nsp, nbp = _key_inputs(
                    CQ, s_cqb, s_cqr, s_cqg, b, 0, g, C_BIAS, C_NORM, h, offs_n, partner, N, R,
                    HAS_ANG,
                )  # fmt: skip
            k = _key_from(kr, ks, kb, krp, ksp, kbp, eps, cos, ssin, N, HAS_ANG)
            tl.debug_barrier()
            _store_key(KST, KNEW, k_off, k, mask_n, writer, SPLIT)
        upd += (gamma * x * psi)[:, None] * k[None, :]
        upd += (beta * v_prev * psi)[:, None] * k_prev[None, :]

    state = alpha * state + upd
    tl.store(SSM + tile, state.to(SSM.dtype.element_ty), mask=mask_t)

    # 4. outputs per rank, gated (and summed over ranks) or raw (MIMO: the next rank's query
    # inputs loaded before this rank's reductions, as in step 3)
    if GATED:
        acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for r in tl.static_range(R):
        if R == 1:
            q = q0
        else:
            qr, qs, qb, qrp, qsp, qbp = nr, ns, nb, nrp, nsp, nbp
            if r + 1 < R:
                nr, ns, nb, nrp, nsp, nbp = _key_inputs(
                    CQ, s_cqb, s_cqr, s_cqg, b, r + 1, g, C_BIAS, C_NORM, h, offs_n, partner, N,
                    R, HAS_ANG,
                )  # fmt: skip
            q = _key_from(qr, qs, qb, qrp, qsp, qbp, eps, cos, ssin, N, HAS_ANG)
        if HAS_D:  # noqa: SIM102  (this rank's per-channel factors, ahead of its reductions)
            if HAS_MX:
                psi = tl.load(MX + (h * R + r) * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        if GATED:  # noqa: SIM102
            if HAS_MZ:
                mz = tl.load(MZ + (h * R + r) * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            if HAS_MO:
                mo = tl.load(MO + (h * R + r) * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        y = tl.sum(state * q[None, :], axis=1)
        if HAS_D:
            if HAS_MX:
                y += d_skip * x * psi
            else:
                y += d_skip * x
        if GATED:
            zr = z
            if HAS_MZ:
                zr = z * mz
            o = _gate(y, zr, norm_w, eps, P, NORM)
            if HAS_MO:
                o = o * mo
            acc += o
        else:
            tl.store(OUT + ((b * R + r) * H + h) * P + offs_p, y, mask=mask_p)
    if GATED:
        tl.store(OUT + (b * H + h) * P + offs_p, acc.to(OUT.dtype.element_ty), mask=mask_p)


@triton.jit
def _store_key(KST, KNEW, off, k, mask, writer, SPLIT: tl.constexpr):
    """A rank's new key: into the k state, or with ``SPLIT`` > 1 by program 0 into ``KNEW``."""
    if SPLIT == 1:
        tl.store(KST + off, k.to(KST.dtype.element_ty), mask=mask)
    else:
        tl.store(KNEW + off, k.to(KNEW.dtype.element_ty), mask=mask & writer)


@triton.jit
def mamba3_step_finish_kernel(
    Y, Z, s_zb, s_zh, MZ, MO, OUT_NORM, OUT, KNEW, KST, THNEW, ANGLE, eps,
    H: tl.constexpr, R: tl.constexpr, P: tl.constexpr, N: tl.constexpr, S: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, GATED: tl.constexpr,
    HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr, NORM: tl.constexpr, HAS_ANG: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """The split step's second launch, one program per (sequence, head): the new keys and
    angles into the state, and (``GATED``) the gate, output norm and sum over ranks of the
    split step's y per rank (B, R, H, P) fp32, as :func:`mamba3_step_kernel` does unsplit.
    With PDL (``FINISH_PDL``) it lets its successor launch and reads nothing before the wait."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    mask_n = offs_n < N
    mask_p = offs_p < P
    for r in tl.static_range(R):
        k_off = ((b * R + r) * H + h) * N + offs_n
        tl.store(KST + k_off, tl.load(KNEW + k_off, mask=mask_n), mask=mask_n)
    if HAS_ANG:
        offs_s = tl.arange(0, BLOCK_S)
        s_off = (b * H + h) * S + offs_s
        tl.store(ANGLE + s_off, tl.load(THNEW + s_off, mask=offs_s < S), mask=offs_s < S)
    if GATED:
        z = tl.load(Z + b * s_zb + h * s_zh + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        norm_w = 1.0
        if NORM != 0:
            norm_w = tl.load(OUT_NORM + h * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for r in tl.static_range(R):
            y = tl.load(Y + ((b * R + r) * H + h) * P + offs_p, mask=mask_p, other=0.0)
            zr = z
            if HAS_MZ:
                zr = z * tl.load(MZ + (h * R + r) * P + offs_p, mask=mask_p, other=0.0).to(
                    tl.float32
                )
            o = _gate(y, zr, norm_w, eps, P, NORM)
            if HAS_MO:
                o = o * tl.load(MO + (h * R + r) * P + offs_p, mask=mask_p, other=0.0).to(
                    tl.float32
                )
            acc += o
        tl.store(OUT + (b * H + h) * P + offs_p, acc.to(OUT.dtype.element_ty), mask=mask_p)


def _warps(block_p: int, block_n: int) -> int:
    """About 32 state elements per thread: enough bytes in flight per warp, few registers."""
    return max(1, min(16, block_p * block_n // 1024))


def _default_maxnreg(warps: int, rank: int, pairing: str) -> int:
    """The register cap without ``step_maxnreg``: 128 for the SISO step at 8 warps with
    interleaved pairs (P 64 x N 128), so two programs share an SM. With all of its key and query
    loads ahead of the first reduction the compiler takes 164 registers for it (one program per
    SM), and capped at 128 it spills nothing with an fp32 state (sm_90 compile; 20 B with a bf16
    state, kept: the alternative is one program per SM; with ``halves`` pairs the cap spills
    60 B, so those keep the compiler's choice, as MIMO does at 250)."""
    return 128 if warps == 8 and rank == 1 and pairing != "halves" else 0


def _contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"mamba3 decode step: {name} must be contiguous (it is updated in place)")


def mamba3_step_triton(
    inputs: StepInputs,
    state: Mamba3State,
    weights: StepWeights,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused step; same contract as :func:`.reference.mamba3_step_reference`.

    Inputs may be strided views of ``in_proj``'s output (their last axis contiguous), so the
    layer passes its split without copies. ``out`` (optional, for tests that poison it) must have
    the output's shape: (B, H, P) in x's dtype with ``z``, else (B, R, H, P) float32.
    """
    w = weights
    x, z, bk, cq, dd_dt, dd_a, trap, angles = inputs
    batch, nheads, headdim = x.shape
    _, rank, ngroups, dstate = bk.shape
    n_angles = 0 if angles is None else angles.shape[-1]
    for name, t in zip(Mamba3State._fields, state, strict=True):
        _contiguous(f"state.{name}", t)
    for name, t in (("x", x), ("bk", bk), ("cq", cq)) + ((("z", z),) if z is not None else ()):
        if t.stride(-1) != 1:
            raise ValueError(f"mamba3 decode step: {name} needs a contiguous last axis")
    gated = z is not None
    shape = (batch, nheads, headdim) if gated else (batch, rank, nheads, headdim)
    dtype = x.dtype if gated else torch.float32
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=x.device)
    elif out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"mamba3 decode step: out must be contiguous {shape} {dtype}")
    zz = z if gated else x
    tr = trap if trap is not None else dd_dt
    an = angles if angles is not None else dd_dt
    angle_arg = state.angle if angles is not None else dd_dt  # (B, H, 0) may have no storage
    # absent optional weights pass a placeholder pointer (their HAS_* flag keeps it unread)
    optional = [t if t is not None else w.dt_bias for t in (w.D, w.mimo_x, w.mimo_z, w.mimo_o)]
    out_norm = w.out_norm if w.out_norm is not None else w.dt_bias
    params = [w.dt_bias, w.B_bias, w.C_bias, w.B_norm, w.C_norm, *optional, out_norm]
    mimo_z, mimo_o = optional[2:]
    norm = NORM_MODES[w.out_norm_mode] if w.out_norm is not None else 0
    if norm and not gated:
        raise ValueError("mamba3 decode step: an output norm needs z (the gate)")
    warps, maxnreg, split = step_launch()
    # no more programs than rows rounded up to a power of two (a P of 6 split 8 ways: 6 of
    # them own a row, 2 are masked out entirely)
    split = min(split, triton.next_power_of_2(headdim))
    block_p = triton.next_power_of_2(triton.cdiv(headdim, split))
    block_n = triton.next_power_of_2(dstate)
    block_s = triton.next_power_of_2(max(n_angles, 1))
    pdl = use_pdl(x)
    finish_pdl = pdl and bool(FINISH_PDL)
    launch = dict(num_warps=warps or _warps(block_p, block_n), num_stages=1)
    maxnreg = maxnreg or _default_maxnreg(launch["num_warps"], rank, w.pairing)
    if maxnreg and not interpreting():
        launch["maxnreg"] = maxnreg
    # split: the first launch leaves y per rank (fp32; in ``out`` itself when ungated) and the
    # head's new keys / angles in scratch; the finish launch gates and copies them
    y = out
    knew, thnew = state.k, angle_arg
    if split > 1:
        if gated:
            y = torch.empty((batch, rank, nheads, headdim), dtype=torch.float32, device=x.device)
        knew = torch.empty_like(state.k)
        if angles is not None:
            thnew = torch.empty_like(state.angle)
    mamba3_step_kernel[(batch * nheads, split)](
        x, zz, bk, cq, dd_dt, dd_a, tr, an,
        x.stride(0), x.stride(1), zz.stride(0), zz.stride(1),
        bk.stride(0), bk.stride(1), bk.stride(2), cq.stride(0), cq.stride(1), cq.stride(2),
        dd_dt.stride(0), dd_dt.stride(1), dd_a.stride(0), dd_a.stride(1),
        tr.stride(0), tr.stride(1), an.stride(0), an.stride(-1),
        angle_arg, state.ssm, state.k, state.v, knew, thnew, *params, y,
        float(w.a_floor), float(w.norm_eps),
        H=nheads, G=ngroups, R=rank, P=headdim, N=dstate, S=max(n_angles, 1),
        BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_S=block_s,
        HEAVY_TAIL=w.a_activation == "heavy_tail", HAS_TRAP=trap is not None,
        HAS_ANG=angles is not None, HALVES=w.pairing == "halves", HAS_D=w.D is not None,
        HAS_MX=w.mimo_x is not None, GATED=gated and split == 1, HAS_MZ=w.mimo_z is not None,
        HAS_MO=w.mimo_o is not None, NORM=norm if split == 1 else 0, USE_PDL=pdl, SPLIT=split,
        EARLY_STATE=_early_state(pdl, split, finish_pdl), **launch, **launch_options(pdl),
    )  # fmt: skip
    if split > 1:
        mamba3_step_finish_kernel[(batch * nheads,)](
            y, zz, zz.stride(0), zz.stride(1), mimo_z, mimo_o, out_norm, out,
            knew, state.k, thnew, angle_arg, float(w.norm_eps),
            H=nheads, R=rank, P=headdim, N=dstate, S=max(n_angles, 1),
            BLOCK_P=triton.next_power_of_2(headdim), BLOCK_N=block_n, BLOCK_S=block_s,
            GATED=gated, HAS_MZ=w.mimo_z is not None, HAS_MO=w.mimo_o is not None, NORM=norm,
            HAS_ANG=angles is not None, USE_PDL=finish_pdl,
            num_warps=1 if interpreting() else 4, **launch_options(finish_pdl),
        )  # fmt: skip
    return out
