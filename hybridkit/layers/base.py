"""Base class of every layer spec and the registry-backed dispatch on ``kind``.

A recipe names a layer by ``kind``; pydantic validates it against the spec class registered for
that kind (see :mod:`hybridkit.registry`). Using a wrap validator instead of a static
``Union[...]`` keeps the union open: a user's own layer kind registered from another package is
validated exactly like the built-in ones, with the same error paths.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import model_validator
from torch import nn

from hybridkit.registry import LAYERS, dispatch_kind
from hybridkit.schema import StrictModel


class LayerSpec(StrictModel):
    """A layer (mixer or MLP) in a block. Subclasses set ``kind: Literal["..."]``."""

    kind: str

    @model_validator(mode="wrap")
    @classmethod
    def _dispatch_on_kind(cls, data: Any, handler: Any) -> Any:
        return dispatch_kind(cls, LayerSpec, data, handler, LAYERS, lambda entry: entry.spec_cls)

    # --- hooks used by the model compiler and `hybridkit show` -------------------------------
    def check(self, d_model: int) -> list[tuple[str, str]]:
        """Cross-field checks that need the model width: ``[(key, message), ...]``."""
        return []

    def summary(self, d_model: int | None = None) -> str:
        """Short description of the key options for the layer table (``d_model``: the model
        width, to show values that default to a multiple of it; plugin kinds may leave the
        parameter out)."""
        return ""

    def build(self, d_model: int, layer_idx: int) -> nn.Module:
        """Instantiate the registered module class for this spec.

        ``layer_idx`` is the layer's slot in the model, which stateful layers use as their key in
        the :class:`~hybridkit.cache.InferenceCache`. Depth-dependent init scaling is the model's
        job (``HybridLM.init_weights``), so layers are not told how many layers there are.
        """
        module_cls = LAYERS.get(self.kind).module_cls
        return module_cls(self, d_model=d_model, layer_idx=layer_idx)


class Layer(nn.Module):
    """Base of hybridkit's layer modules: the questions ``hybridkit show`` asks every layer.

    A layer remembers the past through ``allocate_cache(batch, max_seqlen, dtype, device)``
    (absent: it remembers nothing). The byte counts below are derived from it by allocating on
    the meta device, so a layer kind that implements ``allocate_cache`` is counted right without
    writing anything else; a layer with kernels overrides :meth:`backends`. Plain ``nn.Module``
    layer kinds get the same answers through :func:`ask`.
    """

    #: whether ``forward`` takes a :class:`~hybridkit.layers.norm.PendingNorm` as its input: its
    #: only uses of the input are ``shape`` / ``dtype`` / ``device`` and one projection through
    #: :class:`~hybridkit.layers.linear.Linear` (which may fold the block's add + pre-norm into
    #: its launch); other layers are given the normed tensor
    accepts_pending_norm: bool = False

    def decode_state_bytes(self, dtype: torch.dtype) -> int:
        """Bytes per sequence that do not grow with its length (a recurrent state)."""
        return cache_bytes(self, 0, dtype)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes per sequence added by each token while the cache grows (a KV cache)."""
        return cache_bytes(self, 1, dtype) - cache_bytes(self, 0, dtype)

    def cache_bytes(self, max_seqlen: int, dtype: torch.dtype) -> int:
        """Bytes one sequence of up to ``max_seqlen`` tokens holds (windows cap the KV part)."""
        return cache_bytes(self, max_seqlen, dtype)

    def backends(
        self, device: torch.device | str, dtype: torch.dtype, length: int
    ) -> dict[str, str]:
        """``{op: backend}`` each of this layer's ops runs for a call of ``length`` tokens
        (asked of the kernels' dispatch points; empty for a layer of plain torch ops)."""
        return {}


def cache_bytes(layer: nn.Module, max_seqlen: int, dtype: torch.dtype) -> int:
    """Bytes of the inference state ``layer`` allocates for one sequence (0 without a cache)."""
    allocate = getattr(layer, "allocate_cache", None)
    if allocate is None:
        return 0
    return _nbytes(allocate(1, max_seqlen, dtype, torch.device("meta")))


def _nbytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if callable(getattr(state, "nbytes", None)):
        return int(state.nbytes())
    if isinstance(state, (tuple, list)):
        return sum(_nbytes(s) for s in state)
    if isinstance(state, dict):
        return sum(_nbytes(s) for s in state.values())
    return 0


def ask(layer: nn.Module, question: str, *args: Any) -> Any:
    """Ask any layer module one of :class:`Layer`'s questions; layer kinds that do not derive
    from :class:`Layer` get its default answers."""
    method = getattr(layer, question, None)
    if method is not None:
        return method(*args)
    return getattr(Layer, question)(layer, *args)
