"""FlashAttention-4 (package ``flash-attn-4``, module ``flash_attn.cute``) as ``torch.library`` ops.

Why a custom op: FA4's public ``flash_attn_func`` is a plain ``torch.autograd.Function`` whose
forward is hundreds of lines of host Python (config choice, JIT-compile cache look-ups), so
Dynamo cannot trace it and ``torch.compile(fullgraph=True)`` of a model that calls it fails. Two
opaque ops with fake (meta) implementations and a registered autograd formula let the compiler
treat attention as one node:

* ``hybridkit::fa4_fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window_left,
  return_lse) -> (out, lse)``
* ``hybridkit::fa4_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, causal,
  window_left, deterministic=False) -> (dq, dk, dv)``

Layout is FA4's own, (batch, seqlen, heads, head_dim), so the ops pass tensors straight through:
no copies, no transposes (packed sequences are a batch of one; ``q[0]`` is a view). ``window_left``
is FA4's left window (``None`` = unbounded); causal masks are bottom-right aligned, as in FA4.
``lse`` (float32, (B, H, Lq), or (H, total) when packed) is only computed when ``return_lse`` is
true, i.e. when a backward will follow; otherwise it is an empty tensor.

The CUDA kernels are FA4's forward/backward entry points (``_flash_attn_fwd`` / ``_flash_attn_bwd``
of ``flash_attn.cute.interface``; private names, pinned to flash-attn-4 4.0.0b36 and checked at
import). The CPU kernels emulate the same contract in float32 math, so the op registration (schema,
fake impl, autograd, ``torch.compile``) is testable on machines without a GPU; they are not a
backend anyone should run for speed.

Importing this module does no CUDA work and does not import ``flash_attn``; the first call does
(once, cached by :func:`fa4_interface`).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from hybridkit.compat import trace_constant
from hybridkit.kernels.attention.reference import (
    attention_mask,
    expand_kv,
    masked_scores,
    packed_attention_mask,
)
from hybridkit.kernels.config import current_config

FA4_MODULE = "flash_attn.cute.interface"
_FA4_ENTRY_POINTS = ("_flash_attn_fwd", "_flash_attn_bwd")


@functools.cache
def _import_fa4() -> tuple[Optional[ModuleType], Optional[str]]:  # noqa: UP045
    """Import FA4 once; return (module, None) or (None, why not). Never raises."""
    try:
        import importlib

        module = importlib.import_module(FA4_MODULE)
    except Exception as exc:  # ImportError, or a version-skew error raised while importing
        return None, f"{type(exc).__name__}: {exc}"
    missing = [name for name in _FA4_ENTRY_POINTS if not hasattr(module, name)]
    if missing:
        return None, f"{FA4_MODULE} lacks {', '.join(missing)} (tested with flash-attn-4 4.0.0b36)"
    return module, None


def fa4_interface() -> Optional[ModuleType]:  # noqa: UP045
    """``flash_attn.cute.interface`` if it imports (cached), else None."""
    return _import_fa4()[0]


def fa4_import_error() -> Optional[str]:  # noqa: UP045
    """Why ``flash_attn.cute`` cannot be used (None when it can)."""
    return _import_fa4()[1]


def _interface() -> ModuleType:
    module, error = _import_fa4()
    if module is None:
        raise RuntimeError(f"FlashAttention-4 is not available: {error}")
    return module


def _lse_shape(q: Tensor, varlen: bool) -> tuple[int, ...]:
    b, s, h, _ = q.shape
    return (h, s) if varlen else (b, h, s)


# --- the FA4 calls (shared by the custom ops and the eager autograd.Function) -----------------
def fa4_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Optional[Tensor],  # noqa: UP045
    max_seqlen: Optional[int],  # noqa: UP045
    softmax_scale: float,
    causal: bool,
    window_left: Optional[int],  # noqa: UP045
    return_lse: bool,
) -> tuple[Tensor, Tensor]:
    """FA4 forward; q (B, Lq, H, D), k/v (B, Lk, Hkv, D); packed: B == 1 plus ``cu_seqlens``."""
    fa = _interface()
    varlen = cu_seqlens is not None
    if varlen:
        q, k, v = q[0], k[0], v[0]
    out, lse = fa._flash_attn_fwd(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size_left=window_left,
        window_size_right=None,
        return_lse=return_lse,
    )[:2]
    if varlen:
        out = out.unsqueeze(0)
    if lse is None or not return_lse:
        lse = out.new_empty(0, dtype=torch.float32)
    return out, lse


def fa4_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Optional[Tensor],  # noqa: UP045
    max_seqlen: Optional[int],  # noqa: UP045
    softmax_scale: float,
    causal: bool,
    window_left: Optional[int],  # noqa: UP045
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """FA4 backward (SM90+): gradients of q, k, v, each contiguous with its input's shape.
    ``deterministic``: FA4's fixed-order accumulation of dQ (and of dK / dV under GQA) instead
    of atomics, so that the gradients are bitwise the same run after run (slower)."""
    fa = _interface()
    varlen = cu_seqlens is not None
    if varlen:
        dout, q, k, v, out = dout[0], q[0], k[0], v[0], out[0]
    dq, dk, dv = fa._flash_attn_bwd(
        q,
        k,
        v,
        out,
        dout,
        lse,
        softmax_scale,
        causal,
        0.0,
        window_size_left=window_left,
        window_size_right=None,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        deterministic=deterministic,
    )[:3]
    if varlen:
        dq, dk, dv = dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)
    # FA4 allocates contiguous gradients except for dense-but-permuted inputs; the fake impl
    # promises contiguous ones, so make that true (a no-op in every layout hybridkit produces).
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


# --- forward op -------------------------------------------------------------------------------
@torch.library.custom_op("hybridkit::fa4_fwd", mutates_args=(), device_types="cuda")
def fa4_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Optional[Tensor],  # noqa: UP045
    max_seqlen: Optional[int],  # noqa: UP045
    softmax_scale: float,
    causal: bool,
    window_left: Optional[int],  # noqa: UP045
    return_lse: bool,
) -> tuple[Tensor, Tensor]:
    """FA4 forward; q (B, Lq, H, D), k/v (B, Lk, Hkv, D); packed: B == 1 plus ``cu_seqlens``."""
    return fa4_forward(
        q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window_left, return_lse
    )


@fa4_fwd.register_fake
def _fa4_fwd_fake(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window_left, return_lse):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    shape = _lse_shape(q, cu_seqlens is not None) if return_lse else (0,)
    return out, q.new_empty(shape, dtype=torch.float32)


# --- backward op ------------------------------------------------------------------------------
@torch.library.custom_op("hybridkit::fa4_bwd", mutates_args=(), device_types="cuda")
def fa4_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Optional[Tensor],  # noqa: UP045
    max_seqlen: Optional[int],  # noqa: UP045
    softmax_scale: float,
    causal: bool,
    window_left: Optional[int],  # noqa: UP045
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """FA4 backward (SM90+): gradients of q, k, v, each contiguous with its input's shape.
    ``deterministic``: FA4's fixed-order accumulation of dQ (and of dK / dV under GQA) instead
    of atomics, so that the gradients are bitwise the same run after run (slower)."""
    tensors = (dout, q, k, v, out, lse, cu_seqlens)
    return fa4_backward(*tensors, max_seqlen, softmax_scale, causal, window_left, deterministic)


@fa4_bwd.register_fake
def _fa4_bwd_fake(dout, q, k, v, *_options):  # (out, lse, cu_seqlens, ..., deterministic)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# --- autograd ---------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window_left, _return_lse = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.softmax_scale = max_seqlen, softmax_scale
    ctx.causal, ctx.window_left = causal, window_left
    # read at the forward: autograd runs a CUDA backward in a thread of its own, where the
    # kernel_config block around the training step is not in force
    ctx.deterministic = current_config().deterministic
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout: Tensor, _dlse: Tensor):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if lse.numel() == 0:
        raise RuntimeError(
            "hybridkit::fa4_fwd ran with return_lse=False, so it cannot be differentiated; "
            "call it through hybridkit.kernels.attention.attention, which sets the flag"
        )
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = fa4_bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens,
        ctx.max_seqlen,
        ctx.softmax_scale,
        ctx.causal,
        ctx.window_left,
        ctx.deterministic,
    )
    return dq, dk, dv, None, None, None, None, None, None


fa4_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- eager fast path --------------------------------------------------------------------------
class FA4Function(torch.autograd.Function):
    """The same FA4 calls as the ops, without the dispatcher: for eager mode only, where the
    custom op's host-side layers (dispatcher, autograd wrapper, Dynamo-disable guard) would add
    latency to every call. ``torch.compile`` must see the ops instead (this class would break
    the graph, as FA4's own autograd.Function does)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window_left):
        return_lse = any(ctx.needs_input_grad[:3])
        out, lse = fa4_forward(
            q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window_left, return_lse
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        deterministic = current_config().deterministic  # see _setup_context
        ctx.args = (max_seqlen, softmax_scale, causal, window_left, deterministic)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = fa4_backward(dout, q, k, v, out, lse, cu_seqlens, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


# --- CPU emulation (tests of the op registration only) ----------------------------------------
def _emulated_scores(q, k, cu_seqlens, softmax_scale, causal, window_left):
    """float32/64 scores (B, H, Lq, Lk) with FA4's masks (-inf where masked)."""
    window = None if window_left is None else window_left + 1
    if cu_seqlens is None:
        mask = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window)
    else:
        mask = packed_attention_mask(cu_seqlens, q.shape[1], causal=causal, window=window)
    return masked_scores(q, k, softmax_scale, mask)


def _emulated_forward(q, k, v, cu_seqlens, softmax_scale, causal, window_left):
    scores = _emulated_scores(q, k, cu_seqlens, softmax_scale, causal, window_left)
    return _emulated_softmax_v(scores, q, v, cu_seqlens)


def _emulated_forward_mask(q, k, v, softmax_scale, mask):
    """The emulation with an explicit boolean mask broadcastable to (B, H, Lq, Lk)."""
    return _emulated_softmax_v(masked_scores(q, k, softmax_scale, mask), q, v, None)


def _emulated_softmax_v(scores, q, v, cu_seqlens):
    vf = expand_kv(v, q.shape[2], scores.dtype)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Lq)
    out = (torch.exp(scores - lse[..., None]) @ vf).transpose(1, 2).to(q.dtype)
    if cu_seqlens is not None:
        lse = lse[0]
    return out, lse.float()


@fa4_fwd.register_kernel("cpu")
def _fa4_fwd_cpu(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window_left, return_lse):
    out, lse = _emulated_forward(q, k, v, cu_seqlens, softmax_scale, causal, window_left)
    return out.contiguous(), lse if return_lse else q.new_empty(0, dtype=torch.float32)


@fa4_bwd.register_kernel("cpu")
def _fa4_bwd_cpu(
    dout,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens,
    max_seqlen,
    softmax_scale,
    causal,
    window_left,
    deterministic=False,  # the emulation is deterministic either way
):
    # Explicit softmax backward: autograd does not record below the op's autograd key.
    scores = _emulated_scores(q, k, cu_seqlens, softmax_scale, causal, window_left)
    ct, rep = scores.dtype, q.shape[2] // k.shape[2]
    b, lk, hk, d = k.shape
    probs = torch.softmax(scores, dim=-1).nan_to_num()  # (B, H, Lq, Lk)
    qf = q.to(ct).transpose(1, 2)
    kf, vf = expand_kv(k, q.shape[2], ct), expand_kv(v, q.shape[2], ct)
    do = dout.to(ct).transpose(1, 2)
    dv = probs.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True)) * softmax_scale
    dq = ds @ kf
    dk = ds.transpose(-1, -2) @ qf

    def to_kv(g: Tensor, like: Tensor) -> Tensor:  # (B, H, Lk, D) -> (B, Lk, Hkv, D), GQA summed
        g = g.reshape(b, hk, rep, lk, g.shape[-1]).sum(2).transpose(1, 2)
        return g.to(like.dtype).contiguous()

    return dq.transpose(1, 2).to(q.dtype).contiguous(), to_kv(dk, k), to_kv(dv, v)


# --- decode: one query per sequence over a KV ring ---------------------------------------------
@torch.library.custom_op("hybridkit::fa4_decode", mutates_args=(), device_types="cuda")
def fa4_decode(q: Tensor, k: Tensor, v: Tensor, used: Tensor, softmax_scale: float) -> Tensor:
    """q (B, 1, H, D) over the first ``used[b]`` slots of k / v (B, ring, Hkv, D); ``used``
    (B,) int32 on the device. FA4's ``seqused_k`` path (no autograd: decoding only).

    Keys are attended as a set, so a ring that has wrapped (every slot filled with the last
    ``ring`` keys, RoPE applied when they were written) needs no reordering. No host read of
    ``used``: the launch can be captured in a CUDA graph and replayed as the ring fills."""
    if used.stride(0) != 1:  # FA4 asserts stride 1; a batch-1 broadcast has stride 0
        used = used.new_empty(used.shape).copy_(used)
    out = _interface()._flash_attn_fwd(
        q, k, v, seqused_k=used, softmax_scale=softmax_scale, causal=False, return_lse=False
    )[0]
    return out


@fa4_decode.register_fake
def _fa4_decode_fake(q, k, v, used, softmax_scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@fa4_decode.register_kernel("cpu")
def _fa4_decode_cpu(q, k, v, used, softmax_scale):
    keys = torch.arange(k.shape[1], device=k.device)
    mask = (keys[None, :] < used[:, None].to(keys.dtype))[:, None, None, :]  # (B, 1, 1, Lk)
    out, _lse = _emulated_forward_mask(q, k, v, softmax_scale, mask)
    return out.contiguous()


def fa4_decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor):
    """The static decode step through FA4: ``key_mask`` (Lk,) must mark a prefix of the ring
    (:meth:`hybridkit.cache.KVCache.write_at` gives ``slot <= position``), so its count is
    every sequence's ``seqused_k``."""
    # repeat, not expand: FA4 needs seqused_k at stride 1, and torch calls a (1,) tensor of
    # stride 0 contiguous, so expand(1).contiguous() kept stride 0 (the batch-1 GPU failure)
    used = key_mask.sum(dtype=torch.int32).repeat(q.shape[0])
    return torch.ops.hybridkit.fa4_decode(q, k, v, used, scale)


# --- availability and the call the dispatch point makes ----------------------------------------
FA4_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@trace_constant
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
    error = fa4_import_error()
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


#: In eager mode, call FA4 through :class:`FA4Function` (the same FA4 calls, no
#: dispatcher) instead of the ``hybridkit::fa4_fwd`` op; ``torch.compile`` always sees the op.
#: Why: on torch 2.11 the custom op's eager autograd layers cost ~0.3 ms of host time per
#: forward+backward, more than FA4's whole GPU time at small shapes (8x2048x16x64: 0.72 ms), so
#: eager training through the op was host-bound at 0.63x FA4 (benchmarks/results/attention_*).
FA4_EAGER_AUTOGRAD_FUNCTION = True


def fa4_attention(
    q, k, v, causal, window, scale, cu_seqlens, max_seqlen, *, eager_function: bool | None = None
):
    """FA4 in our layout and mask rules (``window`` counts keys, FA4's left window is one
    less); packed sequences pass ``cu_seqlens``."""
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
        return FA4Function.apply(*args)
    return_lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out, _lse = torch.ops.hybridkit.fa4_fwd(
        q, k, v, cu_seqlens, max_seqlen, scale, causal, window_left, return_lse
    )
    return out
