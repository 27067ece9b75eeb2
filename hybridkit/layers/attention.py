"""Causal multi-head attention (MHA / GQA / MQA) with RoPE or NoPE and an optional window."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from hybridkit.cache import InferenceCache, KVCache, kv_capacity
from hybridkit.kernels import attention as attn_ops
from hybridkit.layers.base import Layer, LayerSpec
from hybridkit.layers.linear import Linear
from hybridkit.layers.norm import RMSNorm
from hybridkit.layers.rotary import RotaryEmbedding, rotate_half_pairs
from hybridkit.registry import register_layer


def positions_for(
    length: int, offset: int, cu_seqlens: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Absolute positions of the tokens of one call; restart at 0 in each packed sequence.

    Packed positions come from ``searchsorted`` (each token's sequence, then its start) rather
    than ``repeat_interleave`` with data-dependent lengths, so ``torch.compile`` traces them
    without a graph break and no host sync happens.
    """
    pos = torch.arange(length, device=device) + offset
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        seq = torch.searchsorted(cu[1:].contiguous(), pos - offset, right=True)
        pos = pos - cu[seq]
    return pos


class Attention(Layer):
    """Attention mixer. Projections: fused ``wqkv`` and ``out_proj`` (a residual output)."""

    residual_out_names = ("out_proj",)
    accepts_pending_norm = True  # forward reads x's shape / dtype / device, projects it once

    def __init__(self, spec: AttentionSpec, *, d_model: int, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        self.n_heads = spec.resolved_heads(d_model)
        self.n_kv_heads = spec.n_kv_heads or self.n_heads
        self.head_dim = spec.head_dim
        qkv = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.wqkv = Linear(d_model, qkv, bias=spec.qkv_bias)
        self.out_proj = Linear(self.n_heads * self.head_dim, d_model, bias=spec.out_bias)
        self.q_norm = RMSNorm(self.head_dim) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if spec.qk_norm else None
        self.rotary = (
            RotaryEmbedding(self.head_dim, spec.rope_theta) if spec.position == "rope" else None
        )

    def allocate_cache(
        self, batch: int, max_seqlen: int, dtype: torch.dtype, device: torch.device | None
    ) -> KVCache:
        shape = (batch, kv_capacity(max_seqlen, self.spec.window), self.n_kv_heads, self.head_dim)
        # zeros, not empty: a static decode step attends over the whole ring with the unfilled
        # slots masked, and a masked slot's zero weight times garbage (NaN) is still NaN
        return KVCache(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
            window=self.spec.window,
        )

    def backends(
        self, device: torch.device | str, dtype: torch.dtype, length: int
    ) -> dict[str, str]:
        """The attention backend, as the dispatch point resolves it for this layer's inputs
        (a decode step, ``length`` 1, may run the fused static step kernel instead)."""
        if length == 1 and attn_ops.static_step_kernel(device, dtype, self.head_dim):
            return {"attention": "triton step kernel (static decode: one launch per layer)"}
        return {
            "attention": attn_ops.resolve_backend(self.spec.backend, device, dtype, self.head_dim)
        }

    def forward(
        self,
        x: torch.Tensor,
        *,
        cache: InferenceCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, length, _ = x.shape
        h, hk, d = self.n_heads, self.n_kv_heads, self.head_dim
        static = cache is not None and cache.position is not None
        if static and length == 1 and attn_ops.static_step_kernel(x.device, x.dtype, d):
            return self.out_proj(self._fused_step(self.wqkv(x)[:, 0], cache).reshape(b, 1, h * d))
        q, k, v = self.wqkv(x).split([h * d, hk * d, hk * d], dim=-1)
        q, k, v = q.view(b, length, h, d), k.view(b, length, hk, d), v.view(b, length, hk, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if static and length != 1:
            raise ValueError("a static (CUDA-graph) cache decodes one token per call")
        if self.rotary is not None:
            # static decoding reads the position from the device (a captured graph replays it)
            if static:
                pos = cache.position
            else:
                offset = cache.seqlen_offset if cache is not None else 0
                pos = positions_for(length, offset, cu_seqlens, x.device)
            cos, sin = self.rotary(pos, x.dtype)
            q, k = rotate_half_pairs(q, cos, sin), rotate_half_pairs(k, cos, sin)
        key_mask = None
        if static:
            k, v, key_mask = cache.layers[self.layer_idx].write_at(k, v, cache.position)
        elif cache is not None:
            if cu_seqlens is not None:
                raise ValueError("packed sequences (cu_seqlens) cannot be combined with a cache")
            kv = cache.layers.get(self.layer_idx)
            if kv is None:
                kv = self.allocate_cache(b, cache.max_seqlen, x.dtype, x.device)
                cache.layers[self.layer_idx] = kv
            k, v = kv.append(k, v)
        out = attn_ops.attention(
            q,
            k,
            v,
            causal=key_mask is None,
            window=None if static else self.spec.window,
            softmax_scale=self.spec.softmax_scale,
            cu_seqlens=cu_seqlens,
            key_mask=key_mask,
            backend=self.spec.backend,
        )
        return self.out_proj(out.reshape(b, length, h * d))

    def _fused_step(self, qkv: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """The static step between the projections as one launch (kernel setting
        ``attention_step``): the same math as the path above (norm, rotation, ring write,
        attention over the filled ring), (B, (H + 2 Hk) D) -> (B, 1, H, D)."""
        kv = cache.layers[self.layer_idx]
        norm = self.q_norm is not None
        return attn_ops.attention_step(
            qkv,
            kv.k,
            kv.v,
            kv.ring_size(),
            cache.position,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            scale=self.spec.softmax_scale or 1.0 / math.sqrt(self.head_dim),
            rope_theta=self.spec.rope_theta if self.rotary is not None else None,
            q_norm=self.q_norm.weight if norm else None,
            k_norm=self.k_norm.weight if norm else None,
            eps=self.q_norm.eps if norm else 1e-5,
        )


@register_layer(Attention)
class AttentionSpec(LayerSpec):
    """Causal softmax attention. ``n_heads`` defaults to ``d_model // head_dim``."""

    kind: Literal["attention"] = "attention"
    n_heads: int | None = Field(default=None, gt=0, le=4096)
    n_kv_heads: int | None = Field(
        default=None, gt=0, le=4096, description="GQA/MQA; default n_heads"
    )
    head_dim: int = Field(default=64, gt=0, le=4096)
    position: Literal["rope", "nope"] = "rope"
    rope_theta: float = Field(default=10000.0, gt=0)
    window: int | None = Field(
        default=None, gt=0, le=2**24, description="sliding window (keys seen, self included)"
    )
    qk_norm: bool = False
    softmax_scale: float | None = Field(default=None, gt=0)
    qkv_bias: bool = False
    out_bias: bool = False
    backend: str = "auto"

    removed_keys: ClassVar[dict[str, str]] = {
        "causal": "attention is always causal (hybridkit builds autoregressive language models), "
        "so there is no causal setting; delete this key (recipe.yaml files of older runs wrote "
        "'causal: true')"
    }

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in attn_ops.BACKENDS:
            raise ValueError(f"unknown backend {value!r}; allowed: {', '.join(attn_ops.BACKENDS)}")
        return value

    def resolved_heads(self, d_model: int) -> int:
        return self.n_heads if self.n_heads is not None else d_model // self.head_dim

    def check(self, d_model: int) -> list[tuple[str, str]]:
        problems = []
        if self.n_heads is None and d_model % self.head_dim:
            problems.append(
                (
                    "head_dim",
                    f"d_model {d_model} is not a multiple of head_dim {self.head_dim}; "
                    "set n_heads explicitly or choose a head_dim that divides d_model",
                )
            )
        heads = self.resolved_heads(d_model)
        if heads < 1:
            problems.append(("n_heads", f"resolves to {heads}; need at least one head"))
        elif self.n_kv_heads is not None and heads % self.n_kv_heads:
            problems.append(
                (
                    "n_kv_heads",
                    f"n_heads {heads} is not a multiple of n_kv_heads {self.n_kv_heads}; "
                    f"allowed: divisors of {heads}",
                )
            )
        if self.position == "rope" and self.head_dim % 2:
            problems.append(("head_dim", f"RoPE needs an even head_dim, got {self.head_dim}"))
        return problems

    def summary(self, d_model: int | None = None) -> str:
        heads = self.n_heads or (d_model // self.head_dim if d_model else "d_model/head_dim")
        parts = [f"heads={heads}"]
        if self.n_kv_heads:
            parts.append(f"kv={self.n_kv_heads}")
        parts += [f"hd={self.head_dim}", self.position]
        if self.window:
            parts.append(f"window={self.window}")
        if self.qk_norm:
            parts.append("qk_norm")
        return " ".join(parts)
