"""The attention op: one dispatch point, several backends, one numerics contract.

Layout is FlashAttention's (batch, seqlen, heads, head_dim) for q, k and v; k/v may have fewer
heads than q (GQA/MQA, ``heads % kv_heads == 0``). Causal masking is aligned to the *bottom
right*: query i of ``Lq`` sees keys ``j <= i + (Lk - Lq)``, which is what decoding with a KV cache
needs (the new queries are the last ``Lq`` positions). ``window`` counts the keys a query sees,
itself included (so ``window=1`` is attention to self only).

Backends: ``reference`` (explicit float32/64 math, for tests), ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention``). ``auto`` picks the fastest available.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference", "sdpa")


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """The backend ``auto`` would run on ``device`` (or the named one, validated)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "sdpa"
    return backend


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


def _reference(q, k, v, causal, window, scale):
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    rep = q.shape[2] // k.shape[2]
    qf = q.to(ct).transpose(1, 2)
    kf = k.to(ct).repeat_interleave(rep, dim=2).transpose(1, 2)
    vf = v.to(ct).repeat_interleave(rep, dim=2).transpose(1, 2)
    scores = qf @ kf.transpose(-1, -2) * scale
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs)  # fully masked rows (cannot happen causally) give zeros
    return (probs @ vf).transpose(1, 2).to(q.dtype)


def _sdpa(q, k, v, causal, window, scale):
    lq, lk = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if causal and window is None and lq == lk:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa
        )
    else:
        mask = attention_mask(lq, lk, causal=causal, window=window, device=q.device)
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa
        )
    return out.transpose(1, 2)


_IMPLS = {"reference": _reference, "sdpa": _sdpa}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention; returns (B, Lq, H, D) in q's dtype.

    ``cu_seqlens`` (nseq+1,) packs several sequences along the length axis of a batch of one;
    attention never crosses a sequence boundary (q and k must then have the same length).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects (batch, seqlen, heads, head_dim) tensors")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads {q.shape[2]} is not a multiple of kv heads {k.shape[2]}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    impl = _IMPLS[resolve_backend(backend, q.device)]
    if cu_seqlens is None:
        return impl(q, k, v, causal, window, scale)
    if q.shape[0] != 1 or k.shape[1] != q.shape[1]:
        raise ValueError("cu_seqlens needs batch 1 and equal query/key lengths")
    bounds = cu_seqlens.tolist()
    outs = [
        impl(q[:, s:e], k[:, s:e], v[:, s:e], causal, window, scale)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=1)
