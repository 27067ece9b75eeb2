"""SwiGLU MLP (docs/mamba3.md 6.1): ``fc2(value * silu(gate))``, ``fc1`` giving [value | gate]."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from hybridkit.kernels import linear as linear_ops
from hybridkit.kernels.swiglu import swiglu
from hybridkit.layers.base import Layer, LayerSpec
from hybridkit.layers.linear import Linear
from hybridkit.layers.norm import PendingNorm
from hybridkit.registry import register_layer


class SwiGLU(Layer):
    """Gated MLP; ``fc2`` is a residual-branch output (scaled at init, see model.init_weights).

    The activation goes through :mod:`hybridkit.kernels.swiglu` (fused on CUDA in eager mode);
    ``act_backend`` is that dispatch point's ``backend``, a plain attribute for A/B runs."""

    residual_out_names = ("fc2",)

    def __init__(self, spec: MLPSpec, *, d_model: int, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        d_ff = spec.resolved_d_ff(d_model)
        self.fc1 = Linear(d_model, 2 * d_ff, bias=spec.bias)
        self.fc2 = Linear(d_ff, d_model, bias=spec.bias)
        self.act_backend = "auto"

    #: the input may be a block's pending add + pre-norm (``PendingNorm``): fc1 projects it
    accepts_pending_norm = True

    def forward(self, x: torch.Tensor | PendingNorm, **_: object) -> torch.Tensor:
        fc1 = self.fc1
        pending = isinstance(x, PendingNorm)
        probe = x.h if pending else x
        fused = self.act_backend == "auto" and (
            linear_ops.resolve_backend("auto", probe, fc1.weight, fc1.bias, glu=True) == "triton"
        )
        if fused:
            # a few rows at inference with skinny_linear on: fc1 and the activation, one launch
            # (with the block's add + norm too, under norm_linear)
            if pending:
                return self.fc2(x.project(fc1.weight, fc1.bias, glu=True))
            return self.fc2(linear_ops.linear_glu(x, fc1.weight, fc1.bias))
        if pending:
            x = x.materialize()
        return self.fc2(swiglu(fc1(x), backend=self.act_backend))


@register_layer(SwiGLU)
class MLPSpec(LayerSpec):
    """SwiGLU MLP. ``d_ff`` defaults to ``2 * d_model`` (the paper's 4096 for d_model 2048)."""

    kind: Literal["mlp"] = "mlp"
    d_ff: int | None = Field(
        default=None, gt=0, le=2**20, description="hidden width; default 2*d_model"
    )
    multiple_of: int = Field(
        default=1, gt=0, le=2**16, description="round d_ff up to a multiple of this"
    )
    bias: bool = False

    def resolved_d_ff(self, d_model: int) -> int:
        d_ff = self.d_ff if self.d_ff is not None else 2 * d_model
        return -(-d_ff // self.multiple_of) * self.multiple_of

    def summary(self, d_model: int | None = None) -> str:
        if d_model is None and self.d_ff is None:
            return "d_ff=2*d_model"
        return f"d_ff={self.resolved_d_ff(d_model or 0)}"
