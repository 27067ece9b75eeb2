"""The one dispatch point for the output of a MIMO Mamba-3 layer: the per-rank gate
``silu(z * mimo_z_r)``, the optional output norm (grouped or over the whole inner width, before
or after the gate) and the ``mimo_o``-weighted rank sum (``docs/mamba3.md`` 1.8).

``backend``:

* ``torch``: :mod:`.reference` (float32/64 out);
* ``triton``: the fused kernels of :mod:`.triton_kernels`, forward and backward (y's dtype out),
  as custom ops under ``torch.compile`` (:mod:`.op`);
* ``auto``: ``triton`` for CUDA tensors when the kernel setting ``mimo_output`` is on and the
  call fits the kernels (rank a power of two, R x group channels within one tile, no float64),
  eager and compiled alike: the torch formula materialises R-times-wider float32
  intermediates, which Inductor splits over several kernels and reductions. Else ``torch``.
  The setting is on by default: at their swept launches the kernels passed the GPU tests and
  beat Inductor's fusion of the formula, 1.5-1.6x in forward + backward, 1.04x in the compiled
  400M MIMO model's step on the H100 (``benchmarks/results/mimo_output_tuned_h100.md``,
  ``train_mimo_output_h100.md``).

SISO layers do not come here: their gate and norm are the gated norm's (``kernels/norm``).
"""

from __future__ import annotations

import torch

from hybridkit.compat import HAVE_TRITON
from hybridkit.kernels.config import mimo_output_enabled
from hybridkit.kernels.mamba3.output.reference import MODES, mimo_output_reference
from hybridkit.kernels.mamba3.output.tiles import TILE_ELEMENTS, tile

__all__ = ["BACKENDS", "MODES", "TILE_ELEMENTS", "mimo_output", "plan_mimo_output", "tile"]

BACKENDS = ("auto", "torch", "triton")


def plan_mimo_output(
    backend: str,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype,
    rank: int,
    group_size: int,
) -> tuple[str, str]:
    """(``torch`` | ``triton``, why ``auto`` chose torch or ""), for a call with these static
    properties; ``hybridkit show`` and the layer ask this, so what is shown is what runs. An
    explicit ``triton`` the kernels cannot run is an error (not a crash inside the launch)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown MIMO output backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch", ""
    unfit = _unfit_reason(dtype, rank, group_size)
    if backend == "triton":
        if unfit is not None:
            raise ValueError(f"mimo output: the Triton kernels cannot run this call: {unfit}")
        return "triton", ""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if not (on_cuda and HAVE_TRITON):
        return "torch", ""
    if not mimo_output_enabled():
        return "torch", "kernel setting mimo_output=0"
    return ("torch", unfit) if unfit is not None else ("triton", "")


def _unfit_reason(dtype: torch.dtype, rank: int, group_size: int) -> str | None:
    """Why the kernels cannot run a call (None: they can)."""
    if dtype == torch.float64:
        return "float64"
    if tile(rank, group_size) is None:
        return f"rank {rank} x group {group_size} does not fit the output kernel's tile"
    return None


def mimo_output(
    y: torch.Tensor,
    z: torch.Tensor,
    mimo_z: torch.Tensor,
    mimo_o: torch.Tensor,
    weight: torch.Tensor | None,
    *,
    group_size: int,
    eps: float,
    mode: str,
    backend: str = "auto",
) -> torch.Tensor:
    """``y`` (B, L, R, H, P), ``z`` (B, L, H, P), ``mimo_z`` / ``mimo_o`` (H, R, P), ``weight``
    (H * P,) (ignored, may be None, with ``mode="none"``, which ignores ``group_size`` too)
    -> (B, L, H * P): float32/64 from the
    torch path, y's dtype from the kernels (the layer casts before ``out_proj`` either way)."""
    if mode not in MODES:
        raise ValueError(f"unknown MIMO output norm mode {mode!r}; allowed: {', '.join(MODES)}")
    b, length, r, h, p = y.shape
    if z.shape != (b, length, h, p) or mimo_z.shape != (h, r, p) or mimo_o.shape != (h, r, p):
        raise ValueError(
            f"mimo output: y {tuple(y.shape)}, z {tuple(z.shape)}, mimo_z "
            f"{tuple(mimo_z.shape)}, mimo_o {tuple(mimo_o.shape)} do not agree"
        )
    if mode == "none":  # no norm, no group: the kernels tile by heads
        group_size = p
    elif weight is None or group_size < 1 or (h * p) % group_size or not eps > 0:
        raise ValueError(
            f"mimo output: norm mode {mode!r} needs a weight, a group dividing {h * p} "
            f"(got {group_size}) and eps > 0 (got {eps})"
        )
    dtype = torch.float64 if torch.float64 in (y.dtype, z.dtype) else y.dtype
    chosen, _ = plan_mimo_output(
        backend, device=y.device, dtype=dtype, rank=r, group_size=group_size
    )
    if chosen == "torch":
        w = weight if mode != "none" else None
        return mimo_output_reference(
            y, z, mimo_z, mimo_o, w, group_size=group_size, eps=eps, mode=mode
        )
    from hybridkit.kernels.mamba3.output.op import mimo_output_op

    # rank-major (R, H * P) float32 copies of the tiny per-rank weights: each kernel program
    # then reads one contiguous row per rank; autograd maps their gradients back
    mz = mimo_z.transpose(0, 1).reshape(r, h * p).float().contiguous()
    mo = mimo_o.transpose(0, 1).reshape(r, h * p).float().contiguous()
    w = weight if mode != "none" else None
    return mimo_output_op(y, z, mz, mo, w, group_size, eps, MODES.index(mode))
