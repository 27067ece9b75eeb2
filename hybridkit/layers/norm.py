"""RMSNorm and the gated (optionally grouped) RMSNorm used at the Mamba-3 output.

Both compute in float32 (or float64 when the input is float64) and return the input dtype: the
mean of squares in bf16 loses the precision the norm exists to provide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` computed in float32/64."""
    xf = x.to(_compute_dtype(x))
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(out.dtype)
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis with a learnable scale (init 1)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """RMSNorm combined with a SiLU gate, over groups of ``group_size`` channels.

    ``norm_before_gate=True`` ("pre-gate"):  ``w * y / rms(y) * silu(z)``;
    ``norm_before_gate=False`` ("post-gate"): ``w * g / rms(g)`` with ``g = y * silu(z)``.
    ``group_size = headdim`` normalises each head on its own ("grouped", docs/mamba3.md 1.8);
    ``group_size = dim`` normalises the whole inner width ("default"). The weight has ``dim``
    entries and is shared by all MIMO ranks.
    """

    def __init__(self, dim: int, group_size: int, norm_before_gate: bool, eps: float = 1e-5):
        super().__init__()
        if dim % group_size:
            raise ValueError(f"dim {dim} is not a multiple of group_size {group_size}")
        self.dim, self.group_size, self.eps = dim, group_size, eps
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``y``, ``z``: (..., dim) -> (..., dim) in float32/64."""
        ct = torch.promote_types(_compute_dtype(y), _compute_dtype(z))
        y, z = y.to(ct), z.to(ct)
        if not self.norm_before_gate:
            y = y * F.silu(z)
        shape = y.shape
        yg = y.reshape(*shape[:-1], self.dim // self.group_size, self.group_size)
        yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + self.eps)
        out = yg.reshape(shape) * self.weight.to(ct)
        if self.norm_before_gate:
            out = out * F.silu(z)
        return out

    def extra_repr(self) -> str:
        where = "pre-gate" if self.norm_before_gate else "post-gate"
        return f"{self.dim}, group_size={self.group_size}, {where}, eps={self.eps}"
