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
from torch.autograd.function import once_differentiable

from hybridkit.kernels.layout import as_rows
from hybridkit.kernels.norm.triton_kernels import add_norm_forward, norm_backward, norm_forward

#: the output dtypes the ops take, by name: "" is the input's
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def out_dtype_name(dtype: torch.dtype | None) -> str:
    """``dtype`` as the ops' ``out_dtype`` argument (None: the input's dtype). A name rather
    than a ``torch.dtype`` keeps the op schema to types every torch >= 2.5 accepts."""
    if dtype is None:
        return ""
    for name, known in OUT_DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"norm kernels: output dtype {dtype}; allowed {', '.join(OUT_DTYPES)}")


def _out_dtype(x: Tensor, out_dtype: str) -> torch.dtype:
    return OUT_DTYPES[out_dtype] if out_dtype else x.dtype


def _forward_impl(x, z, weight, group_size, eps, pre_gate, out_dtype):
    out = torch.empty(x.shape, dtype=_out_dtype(x, out_dtype), device=x.device)
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
    out_dtype: str,
) -> tuple[Tensor, Tensor]:
    return _forward_impl(x, z, weight, group_size, eps, pre_gate, out_dtype)


@_fwd_op.register_fake
def _(x, z, weight, group_size, eps, pre_gate, out_dtype):
    rows = x.numel() // x.shape[-1]
    return (
        x.new_empty(x.shape, dtype=_out_dtype(x, out_dtype)),
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
    def forward(ctx, x, z, weight, group_size, eps, pre_gate, out_dtype):
        out, rstd = _forward_impl(x, z, weight, group_size, eps, pre_gate, out_dtype)
        ctx.save_for_backward(x, z, weight, rstd)
        ctx.group_size, ctx.pre_gate = group_size, pre_gate
        return out

    @staticmethod
    def backward(ctx, dout):
        x, z, weight, rstd = ctx.saved_tensors
        dx, dz, dw = _backward_impl(dout, x, z, weight, rstd, ctx.group_size, ctx.pre_gate)
        return dx, dz, dw, None, None, None, None


def fused_norm(*args: object) -> Tensor:
    """``(x, z, weight, group_size, eps, pre_gate, out_dtype)`` as ``hybridkit::fused_norm_fwd``
    takes them -> the normalised output. The op as ``torch.compile`` must see it, else the
    cheaper eager Function."""
    if torch.compiler.is_compiling():
        return torch.ops.hybridkit.fused_norm_fwd(*args)[0]
    return FusedNormFunction.apply(*args)


class FusedAddNormFunction(torch.autograd.Function):
    """``(s, rms_norm(s) * w)`` with ``s = h + delta``, for training in eager mode: one kernel
    forward (:func:`add_norm_forward` with the rstd stored) and one backward that also adds the
    residual stream's gradient ``ds`` and writes ``delta``'s gradient in its dtype.

    Why: autograd ran the same as four kernels each way (the add, the norm, the cast of its
    output to the autocast dtype; then the cast of the norm's input gradient to float32, the
    norm's backward, the add of the two residual gradients and their cast for the bf16 block
    output), each a full pass over the (tokens x d_model) stream. The arithmetic is the same
    (the sum, its rounding, the float32 statistics, one add of the two gradients), so the
    results equal the unfused ops' (``tests/test_norm_kernels.py``)."""

    @staticmethod
    def forward(ctx, h, delta, weight, eps, out_dtype):
        h2, d2 = as_rows(h), as_rows(delta)
        rstd = torch.empty(h2.shape[0], 1, dtype=torch.float32, device=h.device)
        s, out = add_norm_forward(h2, d2, weight, eps, _out_dtype(h, out_dtype), rstd)
        ctx.save_for_backward(s, weight, rstd)
        ctx.shapes = (h.shape, h.dtype, delta.dtype)
        return s.view(h.shape), out.view(h.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, ds, dout):
        s, weight, rstd = ctx.saved_tensors
        shape, h_dtype, delta_dtype = ctx.shapes
        need_h, need_delta, need_w = ctx.needs_input_grad[:3]
        if dout is None:  # the norm's output unused: the sum's gradient passes through
            dh = ds.to(h_dtype) if ds is not None else s.new_zeros(shape)
            dw = torch.zeros_like(weight) if need_w else None
            return dh, dh.to(delta_dtype) if need_delta else None, dw, None, None
        dh = torch.empty(s.shape, dtype=h_dtype, device=s.device)
        ddelta = torch.empty(s.shape, dtype=delta_dtype, device=s.device) if need_delta else None
        dw = norm_backward(
            as_rows(dout), s, None, weight, rstd, dh, None, s.shape[1], False,
            dres=None if ds is None else as_rows(ds), dx2=ddelta,
        )  # fmt: skip
        return (
            dh.view(shape) if need_h else None,
            None if ddelta is None else ddelta.view(shape),
            dw.to(weight.dtype) if need_w else None,
            None,
            None,
        )
