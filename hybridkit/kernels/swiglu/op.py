"""The SwiGLU kernels as ``torch.library`` custom ops (with fake impls) and an eager Function,
the same split as :mod:`hybridkit.kernels.norm.op` (and for the same reasons)."""

from __future__ import annotations

import torch
from torch import Tensor

from hybridkit.kernels.layout import as_rows
from hybridkit.kernels.swiglu.triton_kernels import swiglu_backward, swiglu_forward


def _forward_impl(h: Tensor) -> Tensor:
    out = torch.empty((*h.shape[:-1], h.shape[-1] // 2), dtype=h.dtype, device=h.device)
    if out.numel():
        swiglu_forward(as_rows(h), out.view(-1, out.shape[-1]))
    return out


def _backward_impl(dout: Tensor, h: Tensor) -> Tensor:
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if dh.numel():
        swiglu_backward(as_rows(h), as_rows(dout), dh.view(-1, dh.shape[-1]))
    return dh


@torch.library.custom_op("hybridkit::swiglu_fwd", mutates_args=())
def _fwd_op(h: Tensor) -> Tensor:
    return _forward_impl(h)


@_fwd_op.register_fake
def _(h):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.custom_op("hybridkit::swiglu_bwd", mutates_args=())
def _bwd_op(dout: Tensor, h: Tensor) -> Tensor:
    return _backward_impl(dout, h)


@_bwd_op.register_fake
def _(dout, h):
    return h.new_empty(h.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dout):
    (h,) = ctx.saved_tensors
    return torch.ops.hybridkit.swiglu_bwd(dout, h)


torch.library.register_autograd("hybridkit::swiglu_fwd", _backward, setup_context=_setup_context)


class SwiGLUFunction(torch.autograd.Function):
    """The same kernels without the dispatcher: eager mode only."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return _forward_impl(h)

    @staticmethod
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        return _backward_impl(dout, h)


def fused_swiglu(h: Tensor) -> Tensor:
    """The op as ``torch.compile`` must see it, else the cheaper eager Function."""
    if torch.compiler.is_compiling():
        return torch.ops.hybridkit.swiglu_fwd(h)
    return SwiGLUFunction.apply(h)
