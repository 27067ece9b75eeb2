"""The one dispatch point for the SwiGLU activation ``value * silu(gate)`` of ``[value | gate]``.

``backend``: ``torch`` (two torch ops), ``triton`` (:mod:`.triton_kernels`, forward and
backward fused; custom ops under ``torch.compile``), or ``auto``: ``triton`` for CUDA tensors,
eager or compiled; ``torch`` on CPU and for float64.

Unlike the norms (:mod:`hybridkit.kernels.norm`), the kernels run under ``torch.compile`` too:
the activation sits between two matmuls, so an opaque op costs Inductor no fusion, and
Inductor's own backward of the formula ran at 1.28x its byte floor
(``benchmarks/results/train_kernels_h100.md``). On the H100 the compiled 400M hybrid's step took
131.8 ms with the kernels against 132.7 / 133.1 ms with Inductor's fusion, one process each
(``benchmarks/results/train_fold_swiglu_h100.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridkit.compat import HAVE_TRITON

__all__ = ["BACKENDS", "resolve_backend", "swiglu"]

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, h: torch.Tensor) -> str:
    """The backend that runs for ``backend`` on ``h`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown SwiGLU backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    usable = HAVE_TRITON and h.is_cuda and h.dtype != torch.float64
    return "triton" if usable else "torch"


def swiglu(h: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``h`` (..., 2F) = ``[value | gate]`` -> ``value * silu(gate)`` (..., F) in h's dtype."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu: last axis {h.shape[-1]} is not [value | gate] (odd)")
    if resolve_backend(backend, h) == "torch":
        value, gate = h.chunk(2, dim=-1)
        return value * F.silu(gate)
    from hybridkit.kernels.swiglu.op import fused_swiglu

    return fused_swiglu(h)
