"""RMSNorm and gated (grouped) RMSNorm in plain torch: the ground truth and the CPU path.

Both compute in float32 (float64 when an input is float64): the mean of squares in bf16 loses
the precision the norm exists to provide. The Triton kernels (:mod:`.triton_kernels`) are tested
against these functions evaluated in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` computed in float32/64, returned in x's dtype."""
    xf = x.to(compute_dtype(x))
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(out.dtype)
    return out.to(x.dtype)


def gated_rms_norm_reference(
    y: Tensor,
    z: Tensor,
    weight: Tensor | None,
    group_size: int,
    eps: float,
    norm_before_gate: bool,
) -> Tensor:
    """Pre-gate ``w * y / rms_g(y) * silu(z)`` or post-gate ``w * g / rms_g(g)``, ``g = y *
    silu(z)``, with the rms over groups of ``group_size`` channels (``weight`` None: w = 1);
    float32/64 out."""
    ct = compute_dtype(y, z)
    y, z = y.to(ct), z.to(ct)
    if not norm_before_gate:
        y = y * F.silu(z)
    shape = y.shape
    yg = y.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + eps)
    out = yg.reshape(shape)
    if weight is not None:
        out = out * weight.to(ct)
    if norm_before_gate:
        out = out * F.silu(z)
    return out
