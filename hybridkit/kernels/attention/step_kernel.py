"""A static (CUDA-graph) decode step of an attention layer as one Triton kernel.

Why: the eager static step of an attention layer is ~35 small kernels per token (the rotary
tables from the device position, each half of the rotation of q and k, the casts, the ring
index, two ``index_copy_``, the key mask, SDPA and its transposes), each a launch of a few
microseconds; at batch 1 the 400M hybrid's four attention layers cost about as many launches as
its twenty Mamba-3 blocks. Here everything between ``wqkv`` and ``out_proj`` is one launch.

One program per (sequence, kv head) (docs/kernels.md, "Attention decode step"):

1. loads the kv head's ``REP = H / Hk`` query heads, its new key and value from ``wqkv``'s
   output row, applies the per-head RMSNorm of q and k (``qk_norm``) and the rotation of pairs
   ``(j, j + D/2)`` by the angle ``position * theta^(-2j/D)`` (the partner element is loaded,
   not shuffled: as in ``layers/rotary.py``, fp32 tables);
2. attends over the ring with an online softmax: the new token from registers (its key rounded
   to the ring's dtype first, as the ring would return it), then the ring's slots in blocks,
   each slot visible iff ``slot <= position`` (unfilled before the ring wraps; after, all are
   the last ``ring`` tokens, which is what a window of that size sees) and not the slot the new
   token is about to overwrite;
3. stores the new key and value at slot ``position % ring`` and the (REP, D) output.

The ring is read and written only by its own program, so no barrier is needed. The query rows
pad to a 16-row tensor-core tile (``tl.dot``), and head dims below 16 pad to 16 columns (the
GPU's dot needs an inner size of at least 16 for 16-bit inputs; the padding is masked); scores
and the softmax are fp32, the products take the ring's dtype (fp32 inputs multiply in full
fp32; float64 inputs, which only the CPU interpreter's tests use, compute everything in float64
and match the torch path to ~1e-12).
At long rings with few (sequence, kv head) pairs one program walks the whole ring (no split
over keys), which is what SDPA does for this call too.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hybridkit.compat import interpreting
from hybridkit.kernels.pdl import launch_options, use_pdl

#: ring slots per block of the key loop
BLOCK_S = 64


@triton.jit
def _head_rows(ptr, rows, cols, row_ok, col_ok, D: tl.constexpr, CDT: tl.constexpr):
    """(rows, cols) in the compute dtype ``CDT`` of a row-major block of D-wide heads at
    ``ptr`` (row i: head ``rows[i]``); masked entries 0."""
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
    return x.to(CDT)


@triton.jit
def _prepare(
    ptr, rows, row_ok, offs_d, d_ok, partner, cos, ssin, W, eps,
    D: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    """Heads ``rows`` at ``ptr``, RMS-normed with weight ``W`` (``HAS_NORM``, statistics of
    the row) and rotated (``HAS_ROPE``: each column mixed with its pair partner, loaded as
    such), (rows, BLOCK_D) in ``CDT``, padding columns 0."""
    x = _head_rows(ptr, rows, offs_d, row_ok, d_ok, D, CDT)
    if HAS_ROPE:
        xp = _head_rows(ptr, rows, partner, row_ok, d_ok, D, CDT)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        x = x * rstd[:, None] * tl.load(W + offs_d, mask=d_ok, other=0.0).to(CDT)[None, :]
        if HAS_ROPE:
            wp = tl.load(W + partner, mask=d_ok, other=0.0).to(CDT)
            xp = xp * rstd[:, None] * wp[None, :]
    if HAS_ROPE:
        x = x * cos[None, :] + xp * ssin[None, :]
    return x


@triton.jit
def _attention_step_kernel(
    QKV, s_qkv, KR, VR, s_rb, s_rs, s_rh, POS, OUT, QW, KW,
    ring, scale, log2_theta, eps,
    H: tl.constexpr, HK: tl.constexpr, REP: tl.constexpr, D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_NORM: tl.constexpr, FP32: tl.constexpr, CDT: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # everything it reads but the norm weights comes from earlier kernels
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    b = pid // HK
    kh = pid % HK
    pos = tl.load(POS)  # int64: the new token's absolute position
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row = QKV + b.to(tl.int64) * s_qkv

    # 1. rotation factors of each column: angle pos * theta^(-2j/D) for pair j
    half = D // 2
    first = offs_d < half
    j = tl.where(first, offs_d, offs_d - half)
    partner = tl.where(first, offs_d + half, offs_d - half)
    if HAS_ROPE:  # in CDT: fp32 as the rotary tables are (fp64 for fp64 models)
        inv_freq = 1.0 / tl.exp2(log2_theta * ((2 * j).to(CDT) / D))
        ang = pos.to(CDT) * inv_freq
        cos = tl.cos(ang)
        ssin = tl.where(first, -tl.sin(ang), tl.sin(ang))
    else:
        cos, ssin = 1.0, 0.0
    q_rows = kh * REP + offs_r
    q = _prepare(row, q_rows, offs_r < REP, offs_d, d_ok, partner, cos, ssin, QW, eps, D,
                 HAS_NORM, HAS_ROPE, CDT)  # fmt: skip
    one = offs_r < 1  # the single key / value row, as a (BLOCK_R, D) tile with one live row
    kv_rows = tl.zeros_like(offs_r)
    k_new = _prepare(row + H * D + kh * D, kv_rows, one, offs_d, d_ok, partner, cos, ssin, KW,
                     eps, D, HAS_NORM, HAS_ROPE, CDT)  # fmt: skip
    v_new = _head_rows(row + (H + HK) * D + kh * D, kv_rows, offs_d, one, d_ok, D, CDT)
    # as the ring will hold them: rounded to its dtype
    k_new = tl.sum(tl.where(one[:, None], k_new, 0.0), axis=0).to(KR.dtype.element_ty)
    v_new = tl.sum(tl.where(one[:, None], v_new, 0.0), axis=0).to(VR.dtype.element_ty)

    # 2. online softmax: the new token first, then the ring's visible slots
    qd = q.to(KR.dtype.element_ty)
    m = tl.sum(qd.to(CDT) * k_new.to(CDT)[None, :], axis=1) * scale
    lsum = tl.zeros_like(m) + 1.0
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=CDT) + v_new.to(CDT)[None, :]
    cur = pos % ring
    base_k = KR + b.to(tl.int64) * s_rb + kh.to(tl.int64) * s_rh
    base_v = VR + b.to(tl.int64) * s_rb + kh.to(tl.int64) * s_rh
    for s0 in range(0, ring, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        live = (offs_s < ring) & (offs_s <= pos) & (offs_s != cur)
        tile = offs_s.to(tl.int64)[:, None] * s_rs + offs_d[None, :]
        tmask = live[:, None] & d_ok[None, :]
        kt = tl.load(base_k + tile, mask=tmask, other=0.0)
        vt = tl.load(base_v + tile, mask=tmask, other=0.0)
        if FP32:
            scores = tl.dot(qd, tl.trans(kt), input_precision="ieee")
        else:
            scores = tl.dot(qd, tl.trans(kt))
        scores = tl.where(live[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        if FP32:
            pv = tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m = m_new

    # 3. the new key and value into the ring, the output rows
    slot = base_k + cur * s_rs + offs_d
    tl.store(slot, k_new, mask=d_ok)
    tl.store(base_v + cur * s_rs + offs_d, v_new, mask=d_ok)
    out = acc / lsum[:, None]
    o_ptr = OUT + (b.to(tl.int64) * H + q_rows)[:, None] * D + offs_d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=(offs_r < REP)[:, None] & d_ok[None, :])


def attention_step(
    qkv: torch.Tensor,
    k_ring: torch.Tensor,
    v_ring: torch.Tensor,
    ring: int,
    position: torch.Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    scale: float,
    rope_theta: float | None,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """One token per sequence: ``qkv`` (B, (H + 2 Hk) D) from ``wqkv`` (unit last stride), the
    ring buffers (B, >= ring, Hk, D) updated in place at slot ``position % ring``, ``position``
    (1,) int64 on the device; returns (B, 1, H, D) in qkv's dtype. ``rope_theta`` None: no
    rotation; ``q_norm`` / ``k_norm``: the per-head RMSNorm weights (``qk_norm``)."""
    b, width = qkv.shape
    hk, d = n_kv_heads, k_ring.shape[-1]
    if width != (n_heads + 2 * hk) * d or n_heads % hk or qkv.stride(-1) != 1:
        raise ValueError(
            f"attention_step: qkv {tuple(qkv.shape)} does not hold {n_heads} + 2 x {hk} heads "
            f"of {d} with a unit last stride"
        )
    if k_ring.stride(-1) != 1 or v_ring.stride() != k_ring.stride() or k_ring.shape[2] != hk:
        raise ValueError("attention_step: k / v rings must be (B, slots, Hk, D) alike, unit D")
    rep = n_heads // hk
    out = torch.empty(b, 1, n_heads, d, dtype=qkv.dtype, device=qkv.device)
    norm = q_norm is not None
    pdl = use_pdl(qkv)
    theta = 1.0 if rope_theta is None else float(rope_theta)
    _attention_step_kernel[(b * hk,)](
        qkv, qkv.stride(0), k_ring, v_ring, k_ring.stride(0), k_ring.stride(1), k_ring.stride(2),
        position, out, q_norm if norm else qkv, k_norm if norm else qkv,
        ring, float(scale), math.log2(theta), float(eps),
        H=n_heads, HK=hk, REP=rep, D=d, BLOCK_R=max(16, triton.next_power_of_2(rep)),
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_S=BLOCK_S,
        HAS_ROPE=rope_theta is not None, HAS_NORM=norm,
        FP32=qkv.dtype in (torch.float32, torch.float64),
        CDT=tl.float64 if qkv.dtype == torch.float64 else tl.float32, USE_PDL=pdl,
        num_warps=1 if interpreting() else 4, **launch_options(pdl),
    )  # fmt: skip
    return out
