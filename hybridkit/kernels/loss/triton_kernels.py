"""Triton kernels of one chunk of the fused cross-entropy (:mod:`hybridkit.kernels.loss`).

Why: between a chunk's matmuls the loss is pure element-wise work over (rows x vocab) logits.
As ATen ops in eager mode (and inside the ``loss_op`` custom op) it took about ten kernels per
chunk over a float32 copy of the logits: a cast, ``logsumexp`` (max, subtract, exp, sum, log),
the target gather, and for the gradient a subtract, an exp, a scatter, a multiply and a cast
back, each a pass over 4 or 8 bytes per logit. Here the loss kernel reads the bf16 logits once
and writes two floats per row (loss, log-sum-exp); the gradient kernel reads them once and
overwrites them with the gradient in their own dtype. Bytes per 4,096 x 32,000 chunk in bf16:
262 MB for the loss, 524 MB for the gradient.

Numerics are the torch path's (``_chunk_stats`` and ``_chunk_grad`` in the package): float32
arithmetic on the logits as stored, ``softmax - (1 - s) onehot(target) - s / V`` times a scale
(1 where the forward forms the gradient) and rounded once to the logits' dtype. The
log-sum-exp is an online one (a running maximum and sum per lane, combined at the end), so it
may differ from ``logsumexp`` in the last bits. A target outside ``[0, V)`` that is not the
ignore index gives a NaN loss (torch raises there; a kernel cannot, and a NaN is what the
trainer's non-finite check reports).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridkit.compat import interpreting

#: widest vocabulary tile of the loss kernel's walk over a row and of a gradient program; 8 warps
#: (16 bf16 logits per thread per tile)
FWD_BLOCK = 4096
BWD_BLOCK = 4096
WARPS = 8


@triton.jit
def _ce_fwd_kernel(
    LOGITS, s_l, TARGETS, LOSS, LSE, V, ignore_index, smoothing,
    BLOCK: tl.constexpr, SMOOTH: tl.constexpr,
):  # fmt: skip
    """One program per row: the row's log-sum-exp and its (smoothed) loss, 0 if ignored."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * s_l
    offs = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    tot = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        ok = idx < V
        x = tl.load(base + idx, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # a lane that has seen only -inf (padding) rescales by exp(-inf - 0) = 0 and keeps sum 0
        # (exp(-inf - -inf) would be NaN)
        ref = tl.where(m_new != float("-inf"), m_new, 0.0)
        s = s * tl.exp(m - ref) + tl.exp(x - ref)
        m = m_new
        if SMOOTH:
            tot += tl.where(ok, x, 0.0)
    top = tl.max(m, 0)
    lse = top + tl.log(tl.sum(tl.where(m != float("-inf"), s * tl.exp(m - top), 0.0), 0))
    t = tl.load(TARGETS + row)
    valid = t != ignore_index
    inside = (t >= 0) & (t < V)
    xt = tl.load(base + tl.where(inside, t, 0), mask=valid & inside, other=0.0).to(tl.float32)
    loss = lse - tl.where(inside, xt, float("nan"))
    if SMOOTH:
        loss = (1.0 - smoothing) * loss + smoothing * (lse - tl.sum(tot, 0) / V)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd_kernel(
    LOGITS, s_l, TARGETS, LSE, SCALE, V, ignore_index, smoothing,
    BLOCK: tl.constexpr, SMOOTH: tl.constexpr,
):  # fmt: skip
    """Program (row, tile): the tile's logits replaced by their gradient, in place."""
    row = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < V
    ptr = LOGITS + row * s_l + idx
    x = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
    t = tl.load(TARGETS + row)
    scale = tl.where(t != ignore_index, tl.load(SCALE).to(tl.float32), 0.0)
    g = tl.exp(x - tl.load(LSE + row)) + tl.where(idx == t, smoothing - 1.0, 0.0)
    if SMOOTH:
        g = g - smoothing / V
    tl.store(ptr, (g * scale).to(LOGITS.dtype.element_ty), mask=ok)


def _block(cap: int, vocab: int) -> int:
    return min(cap, triton.next_power_of_2(max(vocab, 1)))


def _warps() -> int:
    return 1 if interpreting() else WARPS


def ce_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    smoothing: float,
) -> None:
    """``loss`` and ``lse`` (rows,) float32 := each row's loss and log-sum-exp of ``logits``
    (rows, V; unit column stride)."""
    rows, vocab = logits.shape
    if rows:
        _ce_fwd_kernel[(rows,)](
            logits, logits.stride(0), targets, loss, lse, vocab, ignore_index, smoothing,
            BLOCK=_block(FWD_BLOCK, vocab), SMOOTH=smoothing != 0.0, num_warps=_warps(),
        )  # fmt: skip


def ce_backward_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    smoothing: float,
) -> torch.Tensor:
    """``logits`` (rows, V) overwritten by ``scale * (softmax - (1 - s) onehot - s / V)`` per
    valid row (0 on ignored rows); ``scale`` a one-element tensor (1 where the forward forms the
    gradient), read on the device, so no host sync is needed. Returns ``logits``."""
    rows, vocab = logits.shape
    block = _block(BWD_BLOCK, vocab)
    if rows:
        _ce_bwd_kernel[(rows, triton.cdiv(vocab, block))](
            logits, logits.stride(0), targets, lse, scale, vocab, ignore_index, smoothing,
            BLOCK=block, SMOOTH=smoothing != 0.0, num_warps=_warps(),
        )  # fmt: skip
    return logits
