"""The MIMO output of a Mamba-3 layer in plain torch: the ground truth and the CPU path.

Per rank r the gate is ``silu(z * mimo_z_r)`` (``docs/mamba3.md`` 1.8), the optional output
norm normalises ``y_r`` before the gate (``pregate``) or the gated product (``postgate``) over
groups of ``group_size`` channels with one weight shared by all ranks, and the ranks are summed
with the ``mimo_o`` weights: ``o = sum_r mimo_o_r * norm_or_gate(y_r, z * mimo_z_r)``.
Computed in float32 (float64 when an input is float64).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from hybridkit.kernels.norm.reference import compute_dtype, gated_rms_norm_reference

#: output norm placements: none, before the gate, after it
MODES = ("none", "pregate", "postgate")


def mimo_output_reference(
    y: Tensor,
    z: Tensor,
    mimo_z: Tensor,
    mimo_o: Tensor,
    weight: Tensor | None,
    *,
    group_size: int,
    eps: float,
    mode: str,
) -> Tensor:
    """``y`` (B, L, R, H, P) per rank, ``z`` (B, L, H, P), ``mimo_z`` / ``mimo_o`` (H, R, P),
    ``weight`` (H * P,) or None with ``mode="none"`` -> (B, L, H * P) float32/64."""
    b, length, r, h, p = y.shape
    ct = compute_dtype(y, z, mimo_z, mimo_o, weight)
    zr = z.to(ct)[:, :, None] * mimo_z.transpose(0, 1).to(ct)  # (B, L, R, H, P)
    yr = y.to(ct).reshape(b, length, r, h * p)
    zr = zr.reshape(b, length, r, h * p)
    if mode == "none":
        o = yr * F.silu(zr)
    else:
        o = gated_rms_norm_reference(yr, zr, weight, group_size, eps, mode == "pregate")
    return (o * mimo_o.transpose(0, 1).reshape(r, h * p).to(ct)).sum(dim=2)
