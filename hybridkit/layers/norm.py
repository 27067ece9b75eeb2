"""RMSNorm and the gated (optionally grouped) RMSNorm used at the Mamba-3 output.

The modules hold the weights; the math lives behind one dispatch point,
:mod:`hybridkit.kernels.norm` (plain torch, or fused Triton kernels on CUDA). Both compute in
float32 (or float64 when the input is float64): the mean of squares in bf16 loses the precision
the norm exists to provide. RMSNorm returns the input dtype, the gated norm float32/64, unless
the caller asks for another (the dtype of the projection the output feeds).
"""

from __future__ import annotations

import torch
from torch import nn

from hybridkit.kernels import linear as linear_ops
from hybridkit.kernels import norm as norm_ops

__all__ = ["GatedRMSNorm", "PendingNorm", "RMSNorm", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` computed in float32/64 (plain torch)."""
    return norm_ops.rms_norm(x, weight, eps, backend="torch")


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis with a learnable scale (init 1).

    ``backend`` is the norm dispatch point's (``auto | torch | triton``); a plain attribute so
    a benchmark or test can switch every norm of a model without rebuilding it. ``out_dtype``
    (default: the input's): for a caller that feeds the output to a projection computing in
    another dtype (:func:`hybridkit.kernels.norm.projection_dtype`)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, backend: str = "auto"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return norm_ops.rms_norm(
            x, self.weight, self.eps, backend=self.backend, out_dtype=out_dtype
        )

    def add_forward(
        self, h: torch.Tensor, delta: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h + delta, self(h + delta))``: a residual add and this pre-norm, fused into one
        launch where ``kernels.norm.add_rms_norm`` can (decoding, and eager training)."""
        return norm_ops.add_rms_norm(
            h, delta, self.weight, self.eps, backend=self.backend, out_dtype=out_dtype
        )

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class PendingNorm:
    """``norm(h + delta)`` (``norm(h)`` when ``delta`` is None), the input of a block part, not
    computed yet.

    A block hands this to a layer whose first use of its input is one projection
    (``Layer.accepts_pending_norm``); the projection (:class:`~hybridkit.layers.linear.Linear`,
    or the MLP's fc1 + SwiGLU) calls :meth:`project`. At inference that folds the residual add
    and the norm into the projection's own launch when the kernel setting ``norm_linear``
    allows it (:func:`hybridkit.kernels.linear.add_norm_linear`); otherwise the add and the
    norm run as ``norm.add_forward`` does (one kernel pair in eager training), with the normed
    input stored in the dtype the projection computes in
    (:func:`hybridkit.kernels.norm.projection_dtype`), since nothing else reads it. Either way
    :attr:`residual` then holds ``h + delta``, which the block carries on. ``shape`` / ``dtype``
    / ``device`` are those of the residual stream it stands for, so the layer sees the same
    dtype whichever way its input is computed.
    """

    def __init__(self, h: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm):
        self.h, self.delta, self.norm = h, delta, norm
        self.residual: torch.Tensor | None = None
        self._x: torch.Tensor | None = None

    shape = property(lambda self: self.h.shape)
    dtype = property(lambda self: self.h.dtype)
    device = property(lambda self: self.h.device)

    def materialize(self) -> torch.Tensor:
        """The normed input as a tensor, in the projection's dtype."""
        if self._x is None:
            dtype = norm_ops.projection_dtype(self.h)
            if self.delta is None:
                self.residual, self._x = self.h, self.norm(self.h, dtype)
            else:
                self.residual, self._x = self.norm.add_forward(self.h, self.delta, dtype)
        return self._x

    def project(
        self, weight: torch.Tensor, bias: torch.Tensor | None, *, glu: bool = False
    ) -> torch.Tensor:
        """``linear(norm(h + delta), weight, bias)`` (``glu``: fc1 + SwiGLU, which the caller
        has checked runs the few-row kernel)."""
        if self._x is None and self.delta is not None and self.norm.backend != "torch":
            fused = linear_ops.add_norm_linear(
                self.h, self.delta, self.norm.weight, self.norm.eps, weight, bias, glu=glu
            )
            if fused is not None:
                self.residual, y = fused
                return y
        x = self.materialize()
        return linear_ops.linear_glu(x, weight, bias) if glu else linear_ops.linear(x, weight, bias)

    def finish(self) -> torch.Tensor:
        """``h + delta`` for the block (computed here if no projection asked for the input)."""
        if self.residual is None:
            self.materialize()
        return self.residual


class GatedRMSNorm(nn.Module):
    """RMSNorm combined with a SiLU gate, over groups of ``group_size`` channels.

    ``norm_before_gate=True`` ("pre-gate"):  ``w * y / rms(y) * silu(z)``;
    ``norm_before_gate=False`` ("post-gate"): ``w * g / rms(g)`` with ``g = y * silu(z)``.
    ``group_size = headdim`` normalises each head on its own ("grouped", docs/mamba3.md 1.8);
    ``group_size = dim`` normalises the whole inner width ("default"). The weight has ``dim``
    entries and is shared by all MIMO ranks.
    """

    def __init__(
        self,
        dim: int,
        group_size: int,
        norm_before_gate: bool,
        eps: float = 1e-5,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        if dim % group_size:
            raise ValueError(f"dim {dim} is not a multiple of group_size {group_size}")
        self.dim, self.group_size, self.eps = dim, group_size, eps
        self.norm_before_gate, self.backend = norm_before_gate, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, y: torch.Tensor, z: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``y``, ``z``: (..., dim) -> (..., dim) in ``out_dtype`` (default float32/64)."""
        return norm_ops.gated_rms_norm(
            y,
            z,
            self.weight,
            group_size=self.group_size,
            eps=self.eps,
            norm_before_gate=self.norm_before_gate,
            backend=self.backend,
            out_dtype=out_dtype,
        )

    def unweighted(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The norm with ``w = 1``, as the torch formula: for a caller that multiplies the
        weight into its next projection (the Mamba-3 layer's ``out_proj``)."""
        return norm_ops.gated_rms_norm(
            y,
            z,
            None,
            group_size=self.group_size,
            eps=self.eps,
            norm_before_gate=self.norm_before_gate,
        )

    def runs_formula(self, y: torch.Tensor) -> bool:
        """Whether :meth:`forward` on ``y`` runs the torch formula (not the Triton kernels)."""
        return norm_ops.resolve_backend(self.backend, y, self.group_size) == "torch"

    def extra_repr(self) -> str:
        where = "pre-gate" if self.norm_before_gate else "post-gate"
        return f"{self.dim}, group_size={self.group_size}, {where}, eps={self.eps}"
