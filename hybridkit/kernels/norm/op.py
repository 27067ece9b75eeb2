"""The Triton norms as ``torch.library`` custom ops (with fake impls) and an eager Function.

``torch.compile`` sees ``hybridkit::fused_norm_fwd`` / ``hybridkit::fused_norm_bwd``: opaque
ops whose fake implementations give exactly the shapes, dtypes and strides the kernels return
(fresh contiguous tensors), so Dynamo traces a model without graph breaks. Eager calls go
through :class:`FusedNormFunction` instead, the same kernels without the dispatcher's
per-call cost (the model calls a norm ~100 times per step; see ``mamba3/chunkscan/op.py`` for
the same choice and its measurement).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybridkit.kernels.layout import as_rows
from hybridkit.kernels.norm.triton_kernels import norm_backward, norm_forward


def _out_dtype(x: Tensor, out_float32: bool) -> torch.dtype:
    """The output dtype: float32 (the gated norm), else the input's (RMSNorm). A flag rather
    than a ``torch.dtype`` argument keeps the op schema to types every torch >= 2.5 accepts."""
    return torch.float32 if out_float32 else x.dtype


def _forward_impl(x, z, weight, group_size, eps, pre_gate, out_float32):
    out = torch.empty(x.shape, dtype=_out_dtype(x, out_float32), device=x.device)
    rows = out.numel() // out.shape[-1] if out.dim() else 1
    rstd = torch.empty(rows, x.shape[-1] // group_size, dtype=torch.float32, device=x.device)
    if rows:
        x2 = as_rows(x)
        z2 = None if z is None else as_rows(z)
        norm_forward(x2, z2, weight, out.view(rows, -1), rstd, group_size, eps, pre_gate)
    return out, rstd


def _backward_impl(dout, x, z, weight, rstd, group_size, pre_gate):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dz = None if z is None else torch.empty(z.shape, dtype=z.dtype, device=z.device)
    rows = rstd.shape[0]
    if rows:
        dw = norm_backward(
            as_rows(dout),
            as_rows(x),
            None if z is None else as_rows(z),
            weight,
            rstd,
            dx.view(rows, -1),
            None if dz is None else dz.view(rows, -1),
            group_size,
            pre_gate,
        )
    else:
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    return dx, dz, dw.to(weight.dtype)


@torch.library.custom_op("hybridkit::fused_norm_fwd", mutates_args=())
def _fwd_op(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor,
    group_size: int,
    eps: float,
    pre_gate: bool,
    out_float32: bool,
) -> tuple[Tensor, Tensor]:
    return _forward_impl(x, z, weight, group_size, eps, pre_gate, out_float32)


@_fwd_op.register_fake
def _(x, z, weight, group_size, eps, pre_gate, out_float32):
    rows = x.numel() // x.shape[-1]
    return (
        x.new_empty(x.shape, dtype=_out_dtype(x, out_float32)),
        x.new_empty(rows, x.shape[-1] // group_size, dtype=torch.float32),
    )


@torch.library.custom_op("hybridkit::fused_norm_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor,
    x: Tensor,
    z: Tensor | None,
    weight: Tensor,
    rstd: Tensor,
    group_size: int,
    pre_gate: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dz, dw = _backward_impl(dout, x, z, weight, rstd, group_size, pre_gate)
    return dx, x.new_empty(0) if dz is None else dz, dw


@_bwd_op.register_fake
def _(dout, x, z, weight, rstd, group_size, pre_gate):
    dz = x.new_empty(0) if z is None else z.new_empty(z.shape)
    return x.new_empty(x.shape), dz, weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, z, weight, group_size, _eps, pre_gate, _dtype = inputs
    ctx.save_for_backward(x, z, weight, output[1])
    ctx.group_size, ctx.pre_gate, ctx.has_z = group_size, pre_gate, z is not None


def _backward(ctx, dout, _drstd):
    x, z, weight, rstd = ctx.saved_tensors
    dx, dz, dw = torch.ops.hybridkit.fused_norm_bwd(
        dout, x, z, weight, rstd, ctx.group_size, ctx.pre_gate
    )
    return dx, (dz if ctx.has_z else None), dw, None, None, None, None


torch.library.register_autograd(
    "hybridkit::fused_norm_fwd", _backward, setup_context=_setup_context
)


class FusedNormFunction(torch.autograd.Function):
    """The same kernels as the ops, called directly: eager mode only (module docstring)."""

    @staticmethod
    def forward(ctx, x, z, weight, group_size, eps, pre_gate, out_float32):
        out, rstd = _forward_impl(x, z, weight, group_size, eps, pre_gate, out_float32)
        ctx.save_for_backward(x, z, weight, rstd)
        ctx.group_size, ctx.pre_gate = group_size, pre_gate
        return out

    @staticmethod
    def backward(ctx, dout):
        x, z, weight, rstd = ctx.saved_tensors
        dx, dz, dw = _backward_impl(dout, x, z, weight, rstd, ctx.group_size, ctx.pre_gate)
        return dx, dz, dw, None, None, None, None


def fused_norm(*args: object) -> Tensor:
    """``(x, z, weight, group_size, eps, pre_gate, out_float32)`` as ``hybridkit::fused_norm_fwd``
    takes them -> the normalised output. The op as ``torch.compile`` must see it, else the
    cheaper eager Function."""
    if torch.compiler.is_compiling():
        return torch.ops.hybridkit.fused_norm_fwd(*args)[0]
    return FusedNormFunction.apply(*args)
