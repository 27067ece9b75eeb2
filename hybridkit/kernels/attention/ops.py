"""The one dispatch point for attention: backend resolution and :func:`attention`.

Layout and contract are in :mod:`hybridkit.kernels.attention`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch

from hybridkit.compat import HAVE_TRITON, trace_constant
from hybridkit.kernels.attention import fa4
from hybridkit.kernels.attention.reference import packed_attention_mask, reference_attention
from hybridkit.kernels.attention.sdpa import sdpa_attention
from hybridkit.kernels.config import current_config, fa4_decode_enabled

BACKENDS = ("auto", "reference", "sdpa", "fa4")

#: Packed (``cu_seqlens``) inputs up to this many tokens go through sdpa/reference as one call
#: with a block-diagonal mask (no host sync, traceable by ``torch.compile``); longer ones, in
#: eager mode, loop over the sequences (one ``.tolist()`` sync) to avoid a total**2 mask.
PACKED_MASK_MAX_TOKENS = 4096

logger = logging.getLogger(__name__)


# --- backend resolution -----------------------------------------------------------------------
@functools.cache
def _log_once_cached(level: int, message: str) -> None:
    logger.log(level, message)


@trace_constant
def _log_once(level: int, message: str) -> bool:
    """Log ``message`` the first time only; run at trace time under ``torch.compile``."""
    _log_once_cached(level, message)
    return True


@trace_constant
def _resolve(backend: str, device_type: str, device_index: int, dtype: torch.dtype | None) -> str:
    """``resolve_backend`` on plain constants, so Dynamo runs it once at trace time."""
    if backend in ("reference", "sdpa"):
        return backend
    device = torch.device(device_type, device_index if device_index >= 0 else None)
    reason = fa4.fa4_unavailable(device, dtype)
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


@trace_constant
def _capability_major(index: int) -> int:
    return fa4._capability(index if index >= 0 else None)[0]


def _resolve_uncached(backend, device, dtype, head_dim) -> str:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    name = _resolve(backend, dev.type, -1 if dev.index is None else dev.index, dtype)
    if name == "fa4" and head_dim is not None:
        major = _capability_major(dev.index if dev.index is not None else -1)
        if not fa4.fa4_head_dim_ok(head_dim, major):
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
    for cached in (_resolve_cached, _log_once_cached, fa4._capability, fa4._import_fa4):
        clear = getattr(cached, "cache_clear", None)  # tests may have swapped one for a stub
        if clear is not None:
            clear()


_STEP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def static_step_kernel(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether an attention layer's static decode step runs as one Triton launch
    (:mod:`.step_kernel`): the kernel setting ``attention_step`` is on, the inputs are CUDA
    tensors of a dtype the kernel takes, head_dim is even and at most 256, and no
    ``torch.compile`` trace is running (Inductor compiles the torch ops of the step itself)."""
    if torch.compiler.is_compiling() or not current_config().attention_step:
        return False
    usable = torch.device(device).type == "cuda" and dtype in _STEP_DTYPES
    usable = usable and head_dim % 2 == 0 and head_dim <= 256
    return usable and HAVE_TRITON


def attention_step(qkv: torch.Tensor, k_ring, v_ring, ring: int, position, **options):
    """The fused static decode step (:func:`.step_kernel.attention_step`), behind this dispatch
    point; callers check :func:`static_step_kernel` first."""
    from hybridkit.kernels.attention.step_kernel import attention_step as kernel

    return kernel(qkv, k_ring, v_ring, ring, position, **options)


AttnFn = Callable[..., torch.Tensor]
_IMPLS: dict[str, AttnFn] = {"reference": reference_attention, "sdpa": sdpa_attention}


def _masked_decode(impl: AttnFn, q, k, v, scale: float, key_mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per sequence over keys filtered by ``key_mask``.

    With GQA the query heads that share a kv head become that head's queries (a (B, rep, Hk, D)
    call): every query sees the same keys, so this is exact, and it spares sdpa's GQA support,
    which with a mask falls back to the math kernel and repeats every key and value per step.
    """
    b, lq, h, d = q.shape
    hk = k.shape[2]
    if lq != 1 or h == hk:
        return impl(q, k, v, False, None, scale, key_mask.expand(lq, k.shape[1]))
    rep = h // hk
    grouped = q.reshape(b, hk, rep, d).transpose(1, 2)
    out = impl(grouped, k, v, False, None, scale, key_mask.expand(rep, k.shape[1]))
    return out.transpose(1, 2).reshape(b, 1, h, d)


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
    key_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention; returns (B, Lq, H, D) in q's dtype.

    ``cu_seqlens`` (nseq+1,) packs several sequences along the length axis of a batch of one;
    attention never crosses a sequence boundary (q and k must then have the same length).
    ``max_seqlen`` (the longest packed sequence) is optional; fa4 uses it to size its grid.
    ``key_mask`` (Lk,) bool, True for keys every query may see, replaces ``causal``/``window``:
    a static decode step attends over a fixed-size KV ring with it (sdpa, or for ``fa4`` with
    the kernel setting ``fa4_decode`` FA4's ``seqused_k`` path: the mask must then mark a prefix
    of the ring, as the static cache's does).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects (batch, seqlen, heads, head_dim) tensors")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads {q.shape[2]} is not a multiple of kv heads {k.shape[2]}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if cu_seqlens is not None and (q.shape[0] != 1 or k.shape[1] != q.shape[1]):
        raise ValueError("cu_seqlens needs batch 1 and equal query/key lengths")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        # A float32 KV cache read by bf16 queries (a float32 model decoding under autocast):
        # autocast casts SDPA's inputs to one dtype itself, FA4 (a custom op autocast does not
        # see) asserts that they match, so every backend gets q's dtype here.
        k, v = k.to(q.dtype), v.to(q.dtype)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    if key_mask is not None:
        if cu_seqlens is not None or causal or window is not None:
            raise ValueError("key_mask replaces causal, window and cu_seqlens")
        if name == "fa4" and q.shape[1] == 1 and fa4_decode_enabled():
            return fa4.fa4_decode_attention(q, k, v, scale, key_mask)
        return _masked_decode(
            _IMPLS["reference" if name == "reference" else "sdpa"], q, k, v, scale, key_mask
        )
    if name == "fa4":
        return fa4.fa4_attention(q, k, v, causal, window, scale, cu_seqlens, max_seqlen)
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
