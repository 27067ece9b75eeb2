"""The one dispatch point for RMSNorm and the gated (grouped) RMSNorm of the Mamba-3 output.

Layers call :func:`rms_norm`, :func:`add_rms_norm` (a residual add and the next pre-norm; one
launch when decoding) and :func:`gated_rms_norm`, never a kernel. ``backend``:

* ``torch``: :mod:`.reference` (plain torch in float32/64);
* ``triton``: the fused kernels of :mod:`.triton_kernels` (forward and backward), as custom ops
  under ``torch.compile`` (:mod:`.op`);
* ``auto``: ``triton`` for CUDA tensors in eager mode (the torch formula is ~8 kernels forward
  and more backward there, each a full pass over the activations), ``torch`` on CPU, for
  float64, for groups wider than the kernels' tile, and under ``torch.compile``, where Inductor
  already fuses the torch formula into one kernel *together with* its neighbours (the residual
  add before the norm, the casts after it) and an opaque custom op would block that fusion.
  Pass ``backend="triton"`` to force the kernels under compile too (what the benchmark's A/B
  run does).

Semantics of every backend: statistics in float32 (float64 for float64 inputs); RMSNorm
returns the input dtype, the gated norm returns float32 (float64).
"""

from __future__ import annotations

import torch

from hybridkit.compat import HAVE_TRITON
from hybridkit.kernels.config import current_config, train_norms_enabled
from hybridkit.kernels.norm.reference import gated_rms_norm_reference, rms_norm_reference

__all__ = [
    "BACKENDS",
    "add_rms_norm",
    "gated_rms_norm",
    "projection_dtype",
    "resolve_backend",
    "rms_norm",
]

BACKENDS = ("auto", "torch", "triton")


#: widest normalised group the Triton tile holds (mirrors triton_kernels.MAX_GROUP, which
#: cannot be imported without Triton)
_MAX_GROUP = 8192


def resolve_backend(backend: str, x: torch.Tensor, group_size: int) -> str:
    """The backend that runs for ``backend`` on ``x`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown norm backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    usable = (
        HAVE_TRITON
        and x.is_cuda
        and x.dtype != torch.float64
        and group_size <= _MAX_GROUP
        and not torch.compiler.is_compiling()
    )
    return "triton" if usable else "torch"


def projection_dtype(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a linear layer computes an input ``x`` of ``dtype`` (default x's) in at this
    point: the autocast dtype where autocast is on for x's device (float64 excepted), else
    ``dtype``. A norm whose output only feeds a projection stores it in this dtype (with the
    kernel setting ``train_norms``): the projection would cast it there anyway, so the
    rounding is the same, and the float32 output, its cast and the cast of its gradient back
    are three passes over the activations saved.

    Eager training only (autograd on, not compiling): Inductor fuses the cast into the norm
    itself, and inference (the CUDA-graph decode step included) keeps the paths it was timed
    and GPU-tested on; ``dtype`` there."""
    dtype = dtype or x.dtype
    device_type = x.device.type
    if (
        dtype == torch.float64
        or torch.compiler.is_compiling()
        or not torch.is_grad_enabled()
        or not train_norms_enabled()
        or not torch.is_autocast_enabled(device_type)
    ):
        return dtype
    return torch.get_autocast_dtype(device_type)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` (statistics in float32/64), in ``out_dtype``
    (default x's dtype)."""
    if weight is None or resolve_backend(backend, x, x.shape[-1]) == "torch":
        out = rms_norm_reference(x, weight, eps)
        return out if out_dtype is None else out.to(out_dtype)
    from hybridkit.kernels.norm.op import fused_norm, out_dtype_name

    return fused_norm(x, None, weight, x.shape[-1], eps, False, out_dtype_name(out_dtype))


def add_rms_norm(
    h: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = h + delta`` and ``rms_norm(s, weight, eps)`` (in ``out_dtype``, default s's): a
    residual add and the pre-norm after it. Where the norm runs the Triton kernels (CUDA, eager)
    the two are one launch: at inference with the kernel setting ``fused_add_norm``
    (``add_norm_forward``: a launch and a pass over the residual stream saved per block part),
    in training with ``train_norms`` (:class:`~.op.FusedAddNormFunction`, whose backward also
    adds the residual stream's gradient). Otherwise the two ops as they are; ``torch.compile``
    fuses those itself."""
    kernels = (
        backend != "torch"
        and h.shape == delta.shape
        and resolve_backend(backend, h, h.shape[-1]) == "triton"
        and not torch.compiler.is_compiling()
    )
    # (the settings only when the kernels may run: Dynamo cannot trace their ContextVar)
    cfg = current_config() if kernels else None
    grad = torch.is_grad_enabled() and (
        h.requires_grad or delta.requires_grad or weight.requires_grad
    )
    # the sum is stored in h's dtype, which must be what torch's add would give
    promotes = torch.promote_types(h.dtype, delta.dtype) == h.dtype
    if cfg is not None and grad and promotes and cfg.train_norms:
        from hybridkit.kernels.norm.op import FusedAddNormFunction, out_dtype_name

        return FusedAddNormFunction.apply(h, delta, weight, eps, out_dtype_name(out_dtype))
    if not (cfg is not None and not grad and h.dtype == delta.dtype and cfg.fused_add_norm):
        s = h + delta
        return s, rms_norm(s, weight, eps, backend=backend, out_dtype=out_dtype)
    from hybridkit.kernels.layout import as_rows
    from hybridkit.kernels.norm.triton_kernels import add_norm_forward

    s, out = add_norm_forward(as_rows(h), as_rows(delta), weight, eps, out_dtype)
    return s.view(h.shape), out.view(h.shape)


def gated_rms_norm(
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor | None,
    *,
    group_size: int,
    eps: float,
    norm_before_gate: bool,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Gated RMSNorm over groups of ``group_size`` channels (:mod:`.reference` has the formula),
    in ``out_dtype`` (default float32, float64 for float64 inputs). ``weight`` None: no weight
    (the torch formula; what a layer that folds the weight into its next projection asks for)."""
    if y.shape != z.shape:
        raise ValueError(f"gated norm: y {tuple(y.shape)} and z {tuple(z.shape)} differ")
    if y.shape[-1] % group_size:
        raise ValueError(f"gated norm: {y.shape[-1]} channels do not split into {group_size}s")
    if weight is None or resolve_backend(backend, y, group_size) == "torch":
        out = gated_rms_norm_reference(y, z, weight, group_size, eps, norm_before_gate)
        return out if out_dtype is None else out.to(out_dtype)
    from hybridkit.kernels.norm.op import fused_norm, out_dtype_name

    # float32 out by default, as the reference (float64 inputs never reach the kernels)
    name = out_dtype_name(out_dtype or torch.float32)
    return fused_norm(y, z, weight, group_size, eps, norm_before_gate, name)
