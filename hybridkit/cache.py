"""Inference state of a whole model: one entry per layer that remembers the past.

Mamba-3 layers keep a constant-size :class:`~hybridkit.kernels.mamba3.state.Mamba3State`;
attention layers keep a :class:`KVCache` that grows with the sequence, or, for a sliding-window
layer, holds at most ``2 * window`` tokens (only the last ``window - 1`` keys can still be seen
by a new query). The cache knows how many tokens have been consumed (``seqlen_offset``) so
attention can place RoPE positions and its causal mask correctly when the model is called again.

Static decoding (:mod:`hybridkit.generation`): after the prefill, :meth:`InferenceCache.make_static`
turns every KV cache into a ring of fixed size (``max_seqlen`` slots, or ``window`` for a sliding
layer) and gives the cache a device tensor ``position``. From then on a one-token step writes its
key and value in place at slot ``position % ring`` and attends over the whole ring with a mask of
the filled slots: no shape depends on the position, so the step can be captured in a CUDA graph
and replayed, and the graph itself advances ``position`` (``seqlen_offset`` then stays at the
prompt's length: the device position is the count).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hybridkit.kernels.mamba3.state import Mamba3State


def kv_capacity(max_seqlen: int, window: int | None) -> int:
    """Slots a layer's KV cache allocates for sequences of up to ``max_seqlen`` tokens.

    A windowed layer keeps ``2 * window`` slots: it slides its last ``window - 1`` keys to the
    front when the buffer is full, so one copy of ``window - 1`` rows buys ``window + 1`` cheap
    one-token appends.
    """
    return max_seqlen if window is None else min(max_seqlen, 2 * window)


@dataclass
class KVCache:
    """Pre-allocated keys/values (B, capacity, kv_heads, head_dim) and how many slots are filled.

    ``window`` (keys a query sees, itself included) makes the cache a sliding one: ``append``
    returns at least the last ``window - 1`` earlier keys followed by the new ones, which with the
    attention's bottom-right causal window mask is exactly what every new query can see.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    window: int | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values after the filled part; return the keys/values to attend over."""
        n, cap = k.shape[1], self.k.shape[1]
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if self.length + n > cap:
            # a sliding layer slides only when its buffer holds the whole window: a smaller
            # one (max_seqlen < window) could not keep the keys the next queries see
            if self.window is None or cap < self.window - 1:
                raise ValueError(
                    f"KV cache holds {cap} tokens, asked for {self.length + n}; "
                    "allocate the InferenceCache with a larger max_seqlen"
                )
            keep = min(self.length, self.window - 1)
            if keep + n > cap:  # longer than the buffer (a long prefill): attend, keep the tail
                k_all = torch.cat((self.k[:, self.length - keep : self.length], k), dim=1)
                v_all = torch.cat((self.v[:, self.length - keep : self.length], v), dim=1)
                tail = min(k_all.shape[1], self.window - 1)
                self.k[:, :tail] = k_all[:, k_all.shape[1] - tail :]
                self.v[:, :tail] = v_all[:, v_all.shape[1] - tail :]
                self.length = tail
                return k_all, v_all
            # slide the visible tail to the front (clone: source and target may overlap)
            self.k[:, :keep] = self.k[:, self.length - keep : self.length].clone()
            self.v[:, :keep] = self.v[:, self.length - keep : self.length].clone()
            self.length = keep
        new = self.length + n
        self.k[:, self.length : new] = k
        self.v[:, self.length : new] = v
        self.length = new
        return self.k[:, :new], self.v[:, :new]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def ring_size(self) -> int:
        """Slots of the static ring: all of them, or ``window`` for a sliding layer."""
        cap = self.k.shape[1]
        return cap if self.window is None else min(cap, self.window)

    def make_ring(self, offset: int) -> None:
        """After a prefill through :meth:`append` of ``offset`` tokens: put the key of absolute
        position p in slot ``p % ring`` (a no-op without a window, where slot == position)."""
        if self.window is None:
            if self.length != offset:
                raise ValueError(f"KV cache holds {self.length} tokens, the model saw {offset}")
            return
        keep = min(self.length, self.window - 1, offset)
        if keep:
            slots = torch.arange(offset - keep, offset, device=self.k.device) % self.ring_size()
            for buf in (self.k, self.v):
                buf[:, slots] = buf[:, self.length - keep : self.length].clone()
        self.length = min(offset, self.ring_size())

    def write_at(
        self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static decoding: store one token's k / v (B, 1, Hk, D) at slot ``position % ring``.

        Returns the ring's keys and values (B, ring, Hk, D) and the (ring,) mask of filled slots
        (``slot <= position``: before the ring wraps only those hold tokens; after, all do and
        they are exactly the last ``ring`` keys, which is what a window of that size sees).
        """
        ring = self.ring_size()
        slot = torch.remainder(position, ring)
        self.k.index_copy_(1, slot, k.to(self.k.dtype))
        self.v.index_copy_(1, slot, v.to(self.v.dtype))
        filled = torch.arange(ring, device=self.k.device) <= position
        return self.k[:, :ring], self.v[:, :ring], filled


@dataclass
class InferenceCache:
    """Per-layer states for incremental decoding; build it with ``HybridLM.allocate_cache``."""

    batch_size: int
    max_seqlen: int
    seqlen_offset: int = 0
    layers: dict[int, Any] = field(default_factory=dict)
    #: static decoding only: the next token's absolute position, (1,) int64 on the device
    position: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes held by all layer states."""
        return sum(state.nbytes() for state in self.layers.values())

    def make_static(self, position: torch.Tensor) -> None:
        """Switch to static decoding after a prefill (see the module docstring).

        ``position`` is the caller's (1,) int64 tensor, filled here with ``seqlen_offset``; a
        caller that replays a captured graph passes the same tensor every time."""
        for state in self.layers.values():
            if isinstance(state, KVCache):
                state.make_ring(self.seqlen_offset)
        position.fill_(self.seqlen_offset)
        self.position = position

    def reset(self) -> None:
        """Forget every sequence, keeping the tensors (zeroed states, empty KV caches).

        Only the built-in states (:func:`in_place_state`) are reset; a caller that decodes with
        other layer kinds restores their entries itself."""
        self.seqlen_offset, self.position = 0, None
        for state in self.layers.values():
            if isinstance(state, KVCache):
                state.length = 0
            elif isinstance(state, Mamba3State):
                for t in state:
                    t.zero_()


def in_place_state(state: Any) -> bool:
    """Whether a layer state is one whose tensors decoding updates in place (Mamba-3 states and
    KV caches), so a captured CUDA graph may keep reading them. A plugin layer kind that swaps
    its state object per call is decoded eagerly."""
    return isinstance(state, (KVCache, Mamba3State))
