"""Base class of every layer spec and the registry-backed dispatch on ``kind``.

A recipe names a layer by ``kind``; pydantic validates it against the spec class registered for
that kind (see :mod:`hybridkit.registry`). Using a wrap validator instead of a static
``Union[...]`` keeps the union open: a user's own layer kind registered from another package is
validated exactly like the built-in ones, with the same error paths.
"""

from __future__ import annotations

from typing import Any

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

    def summary(self) -> str:
        """Short description of the key options for the layer table."""
        return ""

    def build(self, d_model: int, layer_idx: int) -> nn.Module:
        """Instantiate the registered module class for this spec.

        ``layer_idx`` is the layer's slot in the model, which stateful layers use as their key in
        the :class:`~hybridkit.cache.InferenceCache`. Depth-dependent init scaling is the model's
        job (``HybridLM.init_weights``), so layers are not told how many layers there are.
        """
        module_cls = LAYERS.get(self.kind).module_cls
        return module_cls(self, d_model=d_model, layer_idx=layer_idx)
