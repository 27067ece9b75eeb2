"""Tensor-layout and grid helpers shared by the element-wise Triton ops (norms, SwiGLU, the
MIMO output)."""

from __future__ import annotations

import torch
from torch import Tensor


def as_rows(t: Tensor) -> Tensor:
    """``t`` as (rows, channels) with unit column stride: a view when the leading axes flatten
    into one row stride (a slice of a wider projection does), else one copy. The kernels take
    the row stride, so strided activations need no ``.contiguous()``."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def striding_programs(
    device: torch.device, tiles: int, groups: int, per_sm: int, on_cpu: int
) -> int:
    """Programs along the rows of a backward whose programs stride over row tiles (keeping
    their weight-gradient partials in registers): about ``per_sm`` per SM over all ``groups``
    on a GPU, ``on_cpu`` under the interpreter, never more than the tiles."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, (per_sm * sms) // groups)
    else:
        want = on_cpu
    return max(1, min(tiles, want))


def tile_warps(warps: int, elements: int, launched: int, cap: int) -> int:
    """Warps for a tile of ``launched`` elements when the launch asked for ``elements`` at
    ``warps``: a tile that had to grow past the request (one row of a group wider than it) gets
    proportionally more warps, at most ``cap``, so its elements per thread, and so its registers,
    stay where the launch put them."""
    return min(cap, warps * max(1, launched // elements))
