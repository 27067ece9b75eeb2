"""Attention in plain float32 / float64 math, and the masks every path shares.

The ground truth the other backends are tested against (layout and mask conventions in
:mod:`hybridkit.kernels.attention`), and the masks that the sdpa path and FA4's CPU emulation
apply. Not a backend to run for speed.
"""

from __future__ import annotations

import torch


def attention_mask(
    lq: int, lk: int, *, causal: bool, window: int | None, device: torch.device | None = None
) -> torch.Tensor | None:
    """Boolean (Lq, Lk) mask, True where attention is allowed; None when nothing is masked."""
    if not causal and window is None:
        return None
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def packed_attention_mask(
    cu_seqlens: torch.Tensor, total: int, *, causal: bool, window: int | None
) -> torch.Tensor:
    """Boolean (total, total) block-diagonal mask for packed sequences (causal/window inside).

    Built from tensors only (``searchsorted``, no ``.tolist()``), so it traces without a graph
    break and costs no host sync.
    """
    device = cu_seqlens.device
    idx = torch.arange(total, device=device)
    seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64).contiguous(), idx, right=True)
    allowed = seq[:, None] == seq[None, :]
    # inside one sequence, global index differences are local ones
    mask = attention_mask(total, total, causal=causal, window=window, device=device)
    return allowed if mask is None else allowed & mask


def masked_scores(q, k, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Scores (B, H, Lq, Lk) in float32 (float64 for float64 inputs), -inf where ``mask`` is
    False; k may have fewer heads than q (GQA)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    rep = q.shape[2] // k.shape[2]
    qf = q.to(ct).transpose(1, 2)
    kf = k.to(ct).repeat_interleave(rep, dim=2).transpose(1, 2)
    scores = qf @ kf.transpose(-1, -2) * scale
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def expand_kv(t: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """k or v (B, L, Hkv, D) as (B, H, L, D) in ``dtype``, each kv head repeated for its group."""
    return t.to(dtype).repeat_interleave(heads // t.shape[2], dim=2).transpose(1, 2)


def reference_attention(q, k, v, causal, window, scale, mask=None):
    """Softmax attention by the definition; (B, Lq, H, D) in q's dtype."""
    if mask is None:
        mask = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window, device=q.device)
    scores = masked_scores(q, k, scale, mask)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs)  # fully masked rows (cannot happen causally) give zeros
    return (probs @ expand_kv(v, q.shape[2], scores.dtype)).transpose(1, 2).to(q.dtype)
