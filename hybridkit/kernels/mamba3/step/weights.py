"""What a decode step reads: the token's projections and its layer's weights and options.

Named tuples rather than the layer itself, so the kernels stay below the layers in the import
order (design.md), every implementation shares one signature, and a test can build both from
random tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class StepInputs(NamedTuple):
    """One token's slices of ``in_proj`` (views are fine: only the last axis must be dense).

    ``x``, ``z`` (B, H, P), ``z`` None for layers that normalise before gating; ``bk``, ``cq``
    (B, R, G, N) before BCNorm; ``dd_dt``, ``dd_a``, ``trap`` (B, H), ``trap`` None without the
    trapezoid; ``angles`` (B, S) shared by all heads, None without the rotation.
    """

    x: torch.Tensor
    z: torch.Tensor | None
    bk: torch.Tensor
    cq: torch.Tensor
    dd_dt: torch.Tensor
    dd_a: torch.Tensor
    trap: torch.Tensor | None
    angles: torch.Tensor | None


class StepWeights(NamedTuple):
    """The per-layer parameters and static options of one Mamba-3 decode step.

    Shapes: ``dt_bias`` and ``D`` (H,); ``B_bias`` / ``C_bias`` (H, R, N); ``B_norm`` /
    ``C_norm`` (N,) BCNorm scales; ``mimo_x`` / ``mimo_z`` / ``mimo_o`` (H, R, P) or None
    (SISO). ``pairing`` is the rotation pairing (``interleaved`` for SISO, ``halves`` for MIMO).
    ``out_norm`` (H * P,) is the scale of a per-head output norm applied with the gate,
    ``out_norm_mode`` ``grouped_pregate`` or ``grouped_postgate`` (docs/mamba3.md 1.8); a norm
    over the whole inner width does not fit one program per head and stays in the layer.
    """

    dt_bias: torch.Tensor
    B_bias: torch.Tensor
    C_bias: torch.Tensor
    B_norm: torch.Tensor
    C_norm: torch.Tensor
    D: torch.Tensor | None
    mimo_x: torch.Tensor | None
    mimo_z: torch.Tensor | None
    mimo_o: torch.Tensor | None
    a_activation: str = "heavy_tail"
    a_floor: float = 1e-4
    norm_eps: float = 1e-5
    pairing: str = "interleaved"
    out_norm: torch.Tensor | None = None
    out_norm_mode: str = "none"
