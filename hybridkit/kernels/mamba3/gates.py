"""The per-head scalar gates of a Mamba-3 layer (docs/mamba3.md 1.3), shared by every path.

The layer's prefill and the decode step's torch reference both compute ``dt`` and ``A * dt``
here, so the fused decode kernel is checked against the same formulas the forward uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

A_ACTIVATIONS = ("heavy_tail", "softplus")


def heavy_tail(v: torch.Tensor) -> torch.Tensor:
    """phi(v) = 1 + v for v >= 0, 1 / (1 - v) for v < 0: positive, C1 at 0, phi(0) = 1."""
    return torch.where(v >= 0, 1.0 + v, 1.0 / (1.0 - v.clamp(max=0.0)))


def scalar_gates(
    dd_dt: torch.Tensor,
    dd_a: torch.Tensor,
    dt_bias: torch.Tensor,
    a_activation: str,
    a_floor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dt = softplus(dd_dt + dt_bias) and A*dt with A = -max(act(dd_a), a_floor).

    Computed in float32 (float64 for float64 inputs): dt feeds exponentials, where bf16's three
    significant digits would visibly change the decay.
    """
    if a_activation not in A_ACTIVATIONS:
        raise ValueError(f"a_activation must be one of {A_ACTIVATIONS}, got {a_activation!r}")
    ct = torch.float64 if dd_dt.dtype == torch.float64 else torch.float32
    dt = F.softplus(dd_dt.to(ct) + dt_bias.to(ct))
    a_in = dd_a.to(ct)
    act = heavy_tail(a_in) if a_activation == "heavy_tail" else F.softplus(a_in)
    return dt, -act.clamp(min=a_floor) * dt
