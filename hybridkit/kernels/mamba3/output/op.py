"""The fused MIMO output as ``torch.library`` custom ops (with fake impls) and an eager Function.

``torch.compile`` sees ``hybridkit::mimo_output_fwd`` / ``hybridkit::mimo_output_bwd``, whose
fake implementations return the shapes, dtypes and strides of the real results (fresh
contiguous tensors); eager calls go through :class:`MimoOutputFunction`, the same kernels
without the dispatcher's per-call cost (the choice ``kernels/norm/op.py`` makes too).

Arguments: ``y`` (B, L, R, H, P), ``z`` (B, L, H, P) (a strided slice of the input projection is
fine: only the channel stride must be 1), ``mz`` / ``mo`` (R, H * P) float32 (``mimo_z`` /
``mimo_o`` transposed rank-major), ``weight`` (H * P,) or None, ``group_size``, ``eps``, ``norm``
(an index into ``reference.MODES``). Output (B, L, H * P) in y's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybridkit.kernels.layout import as_rows
from hybridkit.kernels.mamba3.output.reference import MODES
from hybridkit.kernels.mamba3.output.triton_kernels import (
    mimo_output_backward,
    mimo_output_forward,
)


def _rows(y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """y as (T, R, H * P) and z as (T, H * P), both with unit channel stride (views where the
    strides allow)."""
    b, length, r, h, p = y.shape
    y3 = y.reshape(b * length, r, h * p)
    if y3.stride(-1) != 1:
        y3 = y3.contiguous()
    return y3, as_rows(z.flatten(2))


def _flat_params(mz, mo, weight):
    """The per-channel parameters with the unit strides the kernels index them by (no-ops for
    the dispatch point's copies; a compiled graph may hand in other layouts)."""
    return mz.contiguous(), mo.contiguous(), None if weight is None else weight.contiguous()


def _forward_impl(y, z, mz, mo, weight, group_size, eps, norm):
    b, length, r, h, p = y.shape
    mz, mo, weight = _flat_params(mz, mo, weight)
    out = torch.empty(b, length, h * p, dtype=y.dtype, device=y.device)
    if b * length:
        y3, z2 = _rows(y, z)
        mimo_output_forward(
            y3, z2, mz, mo, weight, out.view(-1, h * p), group_size, eps, MODES[norm]
        )
    return out


def _backward_impl(dout, y, z, mz, mo, weight, group_size, eps, norm):
    b, length, r, h, p = y.shape
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    if b * length == 0:
        dw = None if weight is None else torch.zeros_like(weight)
        return dy, dz, torch.zeros_like(mz), torch.zeros_like(mo), dw
    y3, z2 = _rows(y, z)
    mz, mo, weight = _flat_params(mz, mo, weight)
    dmz, dmo, dw = mimo_output_backward(
        as_rows(dout), y3, z2, mz, mo, weight, dy.view(-1, r, h * p), dz.view(-1, h * p),
        group_size, eps, MODES[norm],
    )  # fmt: skip
    dw = None if dw is None else dw.to(weight.dtype)
    return dy, dz, dmz.to(mz.dtype), dmo.to(mo.dtype), dw


@torch.library.custom_op("hybridkit::mimo_output_fwd", mutates_args=())
def _fwd_op(
    y: Tensor,
    z: Tensor,
    mz: Tensor,
    mo: Tensor,
    weight: Tensor | None,
    group_size: int,
    eps: float,
    norm: int,
) -> Tensor:
    return _forward_impl(y, z, mz, mo, weight, group_size, eps, norm)


@_fwd_op.register_fake
def _(y, z, mz, mo, weight, group_size, eps, norm):
    b, length, _, h, p = y.shape
    return y.new_empty(b, length, h * p)


@torch.library.custom_op("hybridkit::mimo_output_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor,
    y: Tensor,
    z: Tensor,
    mz: Tensor,
    mo: Tensor,
    weight: Tensor | None,
    group_size: int,
    eps: float,
    norm: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dy, dz, dmz, dmo, dw = _backward_impl(dout, y, z, mz, mo, weight, group_size, eps, norm)
    return dy, dz, dmz, dmo, y.new_empty(0) if dw is None else dw


@_bwd_op.register_fake
def _(dout, y, z, mz, mo, weight, group_size, eps, norm):
    dw = y.new_empty(0) if weight is None else weight.new_empty(weight.shape)
    return (
        y.new_empty(y.shape),
        z.new_empty(z.shape),
        mz.new_empty(mz.shape),
        mo.new_empty(mo.shape),
        dw,
    )


def _setup_context(ctx, inputs, output) -> None:
    y, z, mz, mo, weight, group_size, eps, norm = inputs
    ctx.save_for_backward(y, z, mz, mo, weight)
    ctx.args = (group_size, eps, norm)
    ctx.has_weight = weight is not None


def _backward(ctx, dout):
    y, z, mz, mo, weight = ctx.saved_tensors
    grads = torch.ops.hybridkit.mimo_output_bwd(dout, y, z, mz, mo, weight, *ctx.args)
    dy, dz, dmz, dmo, dw = grads
    return dy, dz, dmz, dmo, (dw if ctx.has_weight else None), None, None, None


torch.library.register_autograd(
    "hybridkit::mimo_output_fwd", _backward, setup_context=_setup_context
)


class MimoOutputFunction(torch.autograd.Function):
    """The same kernels as the ops, called directly: eager mode only (module docstring)."""

    @staticmethod
    def forward(ctx, y, z, mz, mo, weight, group_size, eps, norm):
        ctx.save_for_backward(y, z, mz, mo, weight)
        ctx.args = (group_size, eps, norm)
        return _forward_impl(y, z, mz, mo, weight, group_size, eps, norm)

    @staticmethod
    def backward(ctx, dout):
        y, z, mz, mo, weight = ctx.saved_tensors
        grads = _backward_impl(dout, y, z, mz, mo, weight, *ctx.args)
        return (*grads, None, None, None)


def mimo_output_op(*args: object) -> Tensor:
    """``(y, z, mz, mo, weight, group_size, eps, norm)`` -> the output: the custom op under
    ``torch.compile``, else the cheaper eager Function."""
    if torch.compiler.is_compiling():
        return torch.ops.hybridkit.mimo_output_fwd(*args)
    return MimoOutputFunction.apply(*args)
