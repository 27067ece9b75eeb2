"""The attention op: one dispatch point, several backends, one numerics contract.

Layout is FlashAttention's (batch, seqlen, heads, head_dim) for q, k and v; k/v may have fewer
heads than q (GQA/MQA, ``heads % kv_heads == 0``). Causal masking is aligned to the *bottom
right*: query i of ``Lq`` sees keys ``j <= i + (Lk - Lq)``, which is what decoding with a KV cache
needs (the new queries are the last ``Lq`` positions). ``window`` counts the keys a query sees,
itself included (so ``window=1`` is attention to self only; FA4's left window is ``window - 1``).
RoPE/NoPE is the caller's business: q and k arrive already rotated.

Backends:

* ``fa4``: FlashAttention-4 (package ``flash-attn-4``, module ``flash_attn.cute``). Under
  ``torch.compile`` it is the ``hybridkit::fa4_fwd`` / ``fa4_bwd`` custom ops of
  :mod:`hybridkit.kernels.fa4_op` (one opaque node, fake impl, registered autograd, so
  ``fullgraph=True`` works); in eager mode the same FA4 calls run through a plain
  ``autograd.Function`` that skips the dispatcher's host overhead (see
  ``FA4_EAGER_AUTOGRAD_FUNCTION``). Needs an SM90+ GPU (its backward is SM90+ only), bf16/fp16
  inputs and a head_dim FA4 supports. Packed sequences use FA4's varlen kernel; decoding passes
  the filled part of the KV cache (a view, no copy: FA4 takes strided k/v).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; on CUDA (eager) cuDNN, then
  FlashAttention-2, are preferred over the memory-efficient and math kernels.
* ``reference``: explicit float32 (float64 for float64 inputs) math, for tests.
* ``auto``: ``fa4`` where it can run, else ``sdpa``.

A backend that cannot run here (``fa4`` without the package, on a CPU or an older GPU, with
float32 inputs, ...) falls back to ``sdpa`` with one log line per reason, never an error.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hybridkit.kernels import fa4_op

BACKENDS = ("auto", "reference", "sdpa", "fa4")
FA4_DTYPES = (torch.bfloat16, torch.float16)

#: Packed (``cu_seqlens``) inputs up to this many tokens go through sdpa/reference as one call
#: with a block-diagonal mask (no host sync, traceable by ``torch.compile``); longer ones, in
#: eager mode, loop over the sequences (one ``.tolist()`` sync) to avoid a total**2 mask.
PACKED_MASK_MAX_TOKENS = 4096

logger = logging.getLogger(__name__)


# --- backend resolution -----------------------------------------------------------------------
@functools.cache
def _log_once_cached(level: int, message: str) -> None:
    logger.log(level, message)


@torch.compiler.assume_constant_result
def _log_once(level: int, message: str) -> bool:
    """Log ``message`` the first time only; run at trace time under ``torch.compile``."""
    _log_once_cached(level, message)
    return True


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@torch.compiler.assume_constant_result
def _capability_major(index: int) -> int:
    return _capability(index if index >= 0 else None)[0]


def fa4_unavailable(device: torch.device | str | None, dtype: torch.dtype | None = None) -> str:
    """Why FA4 cannot run on ``device`` for ``dtype`` inputs ("" when it can).

    Checks, cheapest first: a CUDA device, compute capability >= 9.0 (FA4's backward needs SM90+),
    the package importing (lazily, once), a bf16/fp16 dtype.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda":
        return f"FlashAttention-4 needs a CUDA GPU, the inputs are on {dev.type}"
    if not torch.cuda.is_available():
        return "FlashAttention-4 needs a CUDA GPU, and torch sees none"
    major, minor = _capability(dev.index)
    if major < 9:
        return f"FlashAttention-4 needs compute capability >= 9.0, this GPU is {major}.{minor}"
    error = fa4_op.fa4_import_error()
    if error is not None:
        return f"flash-attn-4 (flash_attn.cute) is not importable: {error}"
    if dtype is not None and dtype not in FA4_DTYPES:
        return f"FlashAttention-4 needs bfloat16 or float16 inputs, got {dtype}"
    return ""


def fa4_head_dim_ok(head_dim: int, capability_major: int = 9) -> bool:
    """FA4's head_dim limits: SM90 8..256 in steps of 8; SM100+ up to 128, or 256."""
    if head_dim % 8 or head_dim < 8:
        return False
    return head_dim <= 256 if capability_major == 9 else head_dim <= 128 or head_dim == 256


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str, device_index: int, dtype: torch.dtype | None) -> str:
    """``resolve_backend`` on plain constants, so Dynamo runs it once at trace time."""
    if backend in ("reference", "sdpa"):
        return backend
    device = torch.device(device_type, device_index if device_index >= 0 else None)
    reason = fa4_unavailable(device, dtype)
    if not reason:
        return "fa4"
    if backend == "fa4":
        _log_once(logging.WARNING, f"attention backend 'fa4' falls back to 'sdpa': {reason}")
    elif device.type == "cuda":
        _log_once(logging.INFO, f"attention backend 'auto' uses 'sdpa': {reason}")
    return "sdpa"


def resolve_backend(
    backend: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
) -> str:
    """The backend that runs for ``backend`` on ``device`` (``auto`` and fallbacks resolved).

    ``dtype``/``head_dim`` of the inputs refine the answer when known (``hybridkit show`` passes
    neither and learns what a bf16 model would get). Eager calls hit a cache (one dict look-up
    per attention call); under ``torch.compile`` the checks run once, at trace time.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if torch.compiler.is_compiling():
        return _resolve_uncached(backend, device, dtype, head_dim)
    return _resolve_cached(backend, device, dtype, head_dim)


def _resolve_uncached(backend, device, dtype, head_dim) -> str:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    name = _resolve(backend, dev.type, -1 if dev.index is None else dev.index, dtype)
    if name == "fa4" and head_dim is not None:
        major = _capability_major(dev.index if dev.index is not None else -1)
        if not fa4_head_dim_ok(head_dim, major):
            level = logging.WARNING if backend == "fa4" else logging.INFO
            _log_once(
                level,
                f"attention backend {backend!r} uses 'sdpa': FlashAttention-4 does not support "
                f"this head_dim on compute capability {major}.x (SM90: multiples of 8 up to 256; "
                "SM100+: up to 128, or 256)",
            )
            return "sdpa"
    return name


_resolve_cached = functools.cache(_resolve_uncached)


def clear_backend_caches() -> None:
    """Forget resolved backends, logged fallbacks, GPU capabilities and the FA4 import (tests)."""
    for cached in (_resolve_cached, _log_once_cached, _capability, fa4_op._import_fa4):
        clear = getattr(cached, "cache_clear", None)  # tests may have swapped one for a stub
        if clear is not None:
            clear()


# --- masks ------------------------------------------------------------------------------------
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


# --- backends ---------------------------------------------------------------------------------
AttnFn = Callable[..., torch.Tensor]


def _reference(q, k, v, causal, window, scale, mask=None):
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    rep = q.shape[2] // k.shape[2]
    qf = q.to(ct).transpose(1, 2)
    kf = k.to(ct).repeat_interleave(rep, dim=2).transpose(1, 2)
    vf = v.to(ct).repeat_interleave(rep, dim=2).transpose(1, 2)
    scores = qf @ kf.transpose(-1, -2) * scale
    if mask is None:
        mask = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs)  # fully masked rows (cannot happen causally) give zeros
    return (probs @ vf).transpose(1, 2).to(q.dtype)


@functools.cache
def _sdpa_cuda_priority() -> tuple:
    from torch.nn.attention import SDPBackend

    return (
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    )


def _sdpa_context(device: torch.device):
    """Prefer cuDNN, then flash, on CUDA (eager only: under ``torch.compile`` torch's own order,
    which already puts cuDNN first on Hopper with recent cuDNN, applies)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    try:
        return sdpa_kernel(list(_sdpa_cuda_priority()), set_priority=True)
    except TypeError:  # torch without set_priority: keep its default order
        return contextlib.nullcontext()


def _sdpa(q, k, v, causal, window, scale, mask=None):
    lq, lk = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    with _sdpa_context(q.device):
        if mask is None and window is None and (not causal or lq == 1 or lq == lk):
            # no explicit mask: the fused kernels apply; one causal query sees every key
            out = F.scaled_dot_product_attention(
                qt, kt, vt, is_causal=causal and lq > 1, scale=scale, enable_gqa=gqa
            )
        else:
            if mask is None:
                mask = attention_mask(lq, lk, causal=causal, window=window, device=q.device)
            out = F.scaled_dot_product_attention(
                qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
    return out.transpose(1, 2)


_IMPLS: dict[str, AttnFn] = {"reference": _reference, "sdpa": _sdpa}


#: In eager mode, call FA4 through :class:`fa4_op.FA4Function` (the same FA4 calls, no
#: dispatcher) instead of the ``hybridkit::fa4_fwd`` op; ``torch.compile`` always sees the op.
#: Why: on torch 2.11 the custom op's eager autograd layers cost ~0.3 ms of host time per
#: forward+backward, more than FA4's whole GPU time at small shapes (8x2048x16x64: 0.72 ms), so
#: eager training through the op was host-bound at 0.63x FA4 (benchmarks/results/attention_*).
FA4_EAGER_AUTOGRAD_FUNCTION = True


def _fa4(
    q, k, v, causal, window, scale, cu_seqlens, max_seqlen, *, eager_function: bool | None = None
):
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if max_seqlen is None and not torch.compiler.is_compiling():
            # a tight bound keeps FA4's grid small; it costs one host sync (pass max_seqlen to
            # avoid it); under torch.compile FA4 bounds lengths by the total instead (correct)
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    window_left = None if window is None else window - 1
    if eager_function is None:
        eager_function = FA4_EAGER_AUTOGRAD_FUNCTION
    if eager_function and not torch.compiler.is_compiling():
        args = (q, k, v, cu_seqlens, max_seqlen, scale, causal, window_left)
        return fa4_op.FA4Function.apply(*args)
    return_lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out, _lse = torch.ops.hybridkit.fa4_fwd(
        q, k, v, cu_seqlens, max_seqlen, scale, causal, window_left, return_lse
    )
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention; returns (B, Lq, H, D) in q's dtype.

    ``cu_seqlens`` (nseq+1,) packs several sequences along the length axis of a batch of one;
    attention never crosses a sequence boundary (q and k must then have the same length).
    ``max_seqlen`` (the longest packed sequence) is optional; fa4 uses it to size its grid.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects (batch, seqlen, heads, head_dim) tensors")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads {q.shape[2]} is not a multiple of kv heads {k.shape[2]}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if cu_seqlens is not None and (q.shape[0] != 1 or k.shape[1] != q.shape[1]):
        raise ValueError("cu_seqlens needs batch 1 and equal query/key lengths")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    if name == "fa4":
        return _fa4(q, k, v, causal, window, scale, cu_seqlens, max_seqlen)
    impl = _IMPLS[name]
    if cu_seqlens is None:
        return impl(q, k, v, causal, window, scale)
    total = q.shape[1]
    if name == "reference" or torch.compiler.is_compiling() or total <= PACKED_MASK_MAX_TOKENS:
        mask = packed_attention_mask(cu_seqlens.to(q.device), total, causal=causal, window=window)
        return impl(q, k, v, causal, window, scale, mask)
    bounds = cu_seqlens.tolist()
    outs = [
        impl(q[:, s:e], k[:, s:e], v[:, s:e], causal, window, scale)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=1)
