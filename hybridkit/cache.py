"""Inference state of a whole model: one entry per layer that remembers the past.

Mamba-3 layers keep a constant-size :class:`~hybridkit.kernels.mamba3.state.Mamba3State`;
attention layers keep a :class:`KVCache` that grows with the sequence. The cache knows how many
tokens have been consumed (``seqlen_offset``) so attention can place RoPE positions and its causal
mask correctly when the model is called again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class KVCache:
    """Pre-allocated keys/values (B, max_seqlen, kv_heads, head_dim) and how many are filled."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values after the filled part; return all filled keys and values."""
        new = self.length + k.shape[1]
        if new > self.k.shape[1]:
            raise ValueError(
                f"KV cache holds {self.k.shape[1]} tokens, asked for {new}; "
                "allocate the InferenceCache with a larger max_seqlen"
            )
        self.k[:, self.length : new] = k.to(self.k.dtype)
        self.v[:, self.length : new] = v.to(self.v.dtype)
        self.length = new
        return self.k[:, :new], self.v[:, :new]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


@dataclass
class InferenceCache:
    """Per-layer states for incremental decoding; build it with ``HybridLM.allocate_cache``."""

    batch_size: int
    max_seqlen: int
    seqlen_offset: int = 0
    layers: dict[int, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes held by all layer states."""
        return sum(state.nbytes() for state in self.layers.values())
