"""Rotary position embeddings for attention (position-indexed, not Mamba-3's data-dependent one).

Half-split pairing ``(j, j + d/2)`` as in Llama/GPT-NeoX. Mamba-3's data-dependent rotation lives
in the Mamba-3 kernels because its angles are a cumulative sum over the sequence.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(j, j + r/2)`` of the first ``r = 2 * cos.shape[-1]`` channels of ``x``.

    ``x``: (B, L, H, D); ``cos``/``sin``: (L, r/2) or broadcastable to (B, L, 1, r/2). Channels
    beyond ``r`` pass through unchanged (partial rotary).
    """
    half = cos.shape[-1]
    if cos.dim() == 2:
        cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)
    return out


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables for integer positions on the fly (no cached buffers to go stale)."""

    def __init__(self, rotary_dim: int, theta: float = 10000.0):
        super().__init__()
        if rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
        self.rotary_dim, self.theta = rotary_dim, theta

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (L,) or (B, L) ints -> cos, sin of shape positions.shape + (rotary_dim/2,)."""
        ct = torch.float64 if dtype == torch.float64 else torch.float32
        idx = torch.arange(0, self.rotary_dim, 2, device=positions.device, dtype=ct)
        inv_freq = 1.0 / (self.theta ** (idx / self.rotary_dim))
        freqs = positions.to(ct)[..., None] * inv_freq
        return freqs.cos(), freqs.sin()

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, theta={self.theta}"
