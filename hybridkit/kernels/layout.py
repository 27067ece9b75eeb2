"""Tensor-layout helpers shared by the element-wise Triton ops (norms, SwiGLU)."""

from __future__ import annotations

from torch import Tensor


def as_rows(t: Tensor) -> Tensor:
    """``t`` as (rows, channels) with unit column stride: a view when the leading axes flatten
    into one row stride (a slice of a wider projection does), else one copy. The kernels take
    the row stride, so strided activations need no ``.contiguous()``."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()
