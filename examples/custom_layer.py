"""Add your own layer kind to hybridkit without editing hybridkit.

The layer here is a short causal depthwise convolution ("shortconv"), a common token mixer in
hybrid stacks. A layer kind is two classes:

* a pydantic spec deriving from ``LayerSpec`` with ``kind: Literal["<name>"]`` (its fields are
  the recipe keys, validated with the same error messages as built-in layers), and
* an ``nn.Module`` built as ``Module(spec, d_model=..., layer_idx=...)`` whose
  ``forward(x, *, cache=None, cu_seqlens=None)`` maps (B, L, d_model) to (B, L, d_model).
  Layers that remember the past implement ``allocate_cache`` and keep their state in
  ``cache.layers[self.layer_idx]`` so prefill + decoding works.

``@register_layer(Module)`` on the spec makes the kind available to every recipe of a process
that has imported this module. From the command line that is what ``--plugin`` does::

    hybridkit train examples/custom_layer.yaml -o runs/conv --plugin examples/custom_layer.py
    hybridkit eval runs/conv         # the run directory records the plugin

Run ``python examples/custom_layer.py`` for the layer on its own (a model and the decode check).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from hybridkit import build_model, load_recipe, register_layer
from hybridkit.cache import InferenceCache
from hybridkit.check import consistency_check
from hybridkit.layers import LayerSpec


class ShortConv(nn.Module):
    """Depthwise causal convolution over the last ``width`` tokens, then a linear projection."""

    residual_out_names = ("out_proj",)  # scaled at init like every residual-branch output

    def __init__(self, spec: ShortConvSpec, *, d_model: int, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx, self.width = spec, layer_idx, spec.width
        self.weight = nn.Parameter(torch.randn(d_model, spec.width) / spec.width)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def allocate_cache(self, batch, max_seqlen, dtype, device) -> ConvState:
        # The state is the last (width - 1) inputs, in a small holder with an nbytes() helper.
        return ConvState(
            torch.zeros(batch, self.width - 1, self.weight.shape[0], dtype=dtype, device=device)
        )

    def forward(
        self, x: torch.Tensor, *, cache: InferenceCache | None = None, cu_seqlens=None
    ) -> torch.Tensor:
        if cu_seqlens is not None:
            raise NotImplementedError("shortconv does not support packed sequences")
        past = cache.layers[self.layer_idx].past if cache is not None else None
        if past is None:
            past = x.new_zeros(x.shape[0], self.width - 1, x.shape[2])
        full = torch.cat([past.to(x.dtype), x], dim=1)  # (B, width-1+L, D)
        if cache is not None:
            cache.layers[self.layer_idx] = ConvState(full[:, -(self.width - 1) :].detach())
        y = F.conv1d(full.transpose(1, 2), self.weight[:, None, :], groups=x.shape[2])
        return self.out_proj(y.transpose(1, 2))


class ConvState:
    def __init__(self, past: torch.Tensor):
        self.past = past

    def nbytes(self) -> int:
        return self.past.numel() * self.past.element_size()


@register_layer(ShortConv)
class ShortConvSpec(LayerSpec):
    """Recipe keys of the new kind; unknown keys and bad values are rejected like any other."""

    kind: Literal["shortconv"] = "shortconv"
    width: int = Field(default=4, ge=2, le=64, description="kernel width in tokens")

    def summary(self) -> str:
        return f"width={self.width}"


RECIPE = {
    "name": "conv-hybrid",
    "model": {
        "d_model": 32,
        "vocab_size": 128,
        "blocks": {
            "c": {"mixer": {"kind": "shortconv", "width": 4}, "mlp": {"kind": "mlp", "d_ff": 64}},
            "m": {"mixer": {"kind": "mamba3", "d_state": 16, "headdim": 16, "chunk_size": 8}},
            "a": {"mixer": {"kind": "attention", "n_heads": 2, "head_dim": 16, "position": "nope"}},
        },
        "layout": "c m c a",
    },
}


def main() -> dict:
    recipe = load_recipe(RECIPE)
    model = build_model(recipe, seed=0)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    report = consistency_check(recipe.model)
    print(f"built {len(model.blocks)} layers: {recipe.model.layer_names()}")
    print(f"logits {tuple(logits.shape)}; parameters per kind: {model.param_counts()}")
    print(f"decode == forward in float64: {report.ok} (logits rel. error {report.logits_rel:.1e})")
    return {
        "logits_shape": tuple(logits.shape),
        "check_ok": report.ok,
        "counts": model.param_counts(),
    }


if __name__ == "__main__":
    main()
