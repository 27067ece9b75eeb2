"""The one dispatch point for the model's linear layers: ``torch.nn.functional.linear``, or our
Triton kernel for calls with few rows (decoding, :mod:`.triton_kernels`).

``backend``: ``torch``; ``triton`` (forced, also on the CPU through the interpreter, for tests);
``auto``: ``triton`` when the kernel setting ``skinny_linear`` is on (the default: it beat
cuBLAS at one row on every 400M shape, ``benchmarks/results/skinny_linear_h200.md``) and the call
is an inference-time product of at most ``skinny_rows`` rows (default 16, the kernel's tile;
the MLP's fc1 with its SwiGLU: at most 16 whatever it says) of a bf16 / fp16 / fp32 CUDA tensor,
outside ``torch.compile`` (Inductor plans its own matmuls), without autograd (the kernel has no
backward) and outside autocast; ``torch`` otherwise, so training never runs it. At 16 rows,
timed alone, the kernel takes 0.92-1.20x cuBLAS's time per 400M shape, yet in a decode step it
wins: it launches with PDL, so each projection's launch and weight reads overlap the kernel
before it, which cuBLAS's kernels do not (400M model at batch 16 on the H100: 1.051-1.054 ms
per step against 1.137, ``benchmarks/results/decode_split_k_h100.md``; ``skinny_rows`` was 1
until then).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridkit.compat import HAVE_TRITON, TRITON_UNUSABLE
from hybridkit.kernels.config import current_config
from hybridkit.kernels.layout import as_rows

__all__ = [
    "BACKENDS",
    "add_norm_linear",
    "describe_decode",
    "linear",
    "linear_glu",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "triton")
_MAX_ROWS = 16  # mirrors triton_kernels.MAX_ROWS (importing it needs Triton)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def resolve_backend(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    glu: bool = False,
) -> str:
    """The backend that runs for ``backend`` (see the module docstring); ``glu``: for the
    fused fc1 + SwiGLU (:func:`linear_glu`), which may take up to 16 rows."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if torch.compiler.is_compiling() or not (HAVE_TRITON and _on_cuda(x)) or _autocast():
        return "torch"
    rows = x.numel() // max(x.shape[-1], 1)
    grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    cfg = current_config()
    usable = (
        0 < rows <= (_MAX_ROWS if glu else cfg.skinny_rows)
        and not grad
        and x.dtype in _DTYPES
        and weight.dtype == x.dtype
        and weight.is_contiguous()
        and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
        and cfg.skinny_linear
    )
    return "triton" if usable else "torch"


def describe_decode(device: torch.device | str, dtype: torch.dtype) -> str:
    """What the model's linears run in a decode step (at most 16 rows) on ``device``, for
    ``hybridkit show``: the same rules as :func:`resolve_backend`, with the reason."""
    if torch.device(device).type != "cuda":
        return "torch (F.linear)"
    if TRITON_UNUSABLE:
        return f"torch (F.linear; {TRITON_UNUSABLE})"
    if dtype not in _DTYPES:
        return f"torch (F.linear; the kernel runs {', '.join(str(d)[6:] for d in _DTYPES)})"
    cfg = current_config()
    if not cfg.skinny_linear:
        return "torch (cuBLAS; our few-row kernel: kernel setting skinny_linear=1)"
    extras = "; with PDL on sm_90+" if cfg.pdl else ""
    if cfg.norm_linear:
        fold = "1 row" if cfg.norm_linear == 1 else f"<= {cfg.norm_linear} rows"
        extras += f"; each block's add + pre-norm folded into its first projection at {fold}"
    rows = "1 row" if cfg.skinny_rows == 1 else f"<= {cfg.skinny_rows} rows"
    return (
        f"triton (few-row kernels for {rows}, the MLP's fc1 with its SwiGLU for <= 16; eager / "
        f"CUDA-graph steps; more rows: cuBLAS{extras})"
    )


def _on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda


def _autocast() -> bool:
    """Whether CUDA autocast is on (then F.linear casts; the kernel would not)."""
    try:
        return torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled()


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ weight.T + bias`` over the last axis of ``x`` (any leading shape)."""
    if resolve_backend(backend, x, weight, bias) == "torch":
        return F.linear(x, weight, bias)
    from hybridkit.kernels.linear.triton_kernels import skinny_linear

    out = skinny_linear(
        as_rows(x), weight.contiguous(), None if bias is None else bias.contiguous()
    )
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear_glu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``value * silu(gate)`` of ``[value | gate] = x @ weight.T + bias`` (the SwiGLU MLP's first
    half) in one launch of the few-row kernel. Callers check ``resolve_backend`` first (the MLP
    does, and otherwise runs its projection and activation as two ops)."""
    from hybridkit.kernels.linear.triton_kernels import skinny_linear

    out = skinny_linear(as_rows(x), weight.contiguous(), bias, glu=True)
    return out.reshape(*x.shape[:-1], weight.shape[0] // 2)


def add_norm_linear(
    h: torch.Tensor,
    delta: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    glu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(s, y)`` with ``s = h + delta`` and ``y`` the linear (``glu``: fc1 + SwiGLU) of
    ``rms_norm(s) * norm_weight``, in one launch of the few-row kernel (``PRENORM``), or None
    when that does not apply here (more rows than the kernel setting ``norm_linear``, or the
    linear would not run the few-row kernel, or h and delta differ in shape or dtype, or a
    ``torch.compile`` trace is running, which plans its own kernels and cannot read the
    settings): the caller then runs the add + norm and the linear as usual."""
    if torch.compiler.is_compiling() or h.shape != delta.shape or h.dtype != delta.dtype:
        return None
    if delta.numel() // max(delta.shape[-1], 1) > current_config().norm_linear:
        return None
    if resolve_backend("auto", h, weight, bias, glu=glu) != "triton":
        return None
    from hybridkit.kernels.linear.triton_kernels import skinny_linear

    bias = None if bias is None else bias.contiguous()
    s, y = skinny_linear(
        as_rows(delta), weight.contiguous(), bias, glu=glu,
        prenorm=(as_rows(h), norm_weight.contiguous(), eps),
    )  # fmt: skip
    n = weight.shape[0] // 2 if glu else weight.shape[0]
    return s.reshape(h.shape), y.reshape(*h.shape[:-1], n)
