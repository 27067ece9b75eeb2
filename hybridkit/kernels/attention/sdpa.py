"""The sdpa backend: ``torch.nn.functional.scaled_dot_product_attention``.

On CUDA (eager) cuDNN, then FlashAttention-2, are preferred over the memory-efficient and math
kernels. Explicit masks (windows, packed sequences, unequal lengths) come from
:mod:`.reference`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from hybridkit.kernels.attention.reference import attention_mask


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


def sdpa_attention(q, k, v, causal, window, scale, mask=None):
    """``torch.nn.functional.scaled_dot_product_attention`` in our layout and mask rules."""
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
