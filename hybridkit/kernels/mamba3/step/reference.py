"""The decode step in plain torch: the definition the fused kernels are checked against.

It composes the pieces the prefill uses (scalar gates, BCNorm, the sequential recurrence of
docs/mamba3.md 2.4 / 2.5 with L = 1), so a decode step through it is by construction the same
math as one token of the forward. It runs on any device and in float64, which makes it both the
CPU decode path and the ground truth of the kernel tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridkit.kernels.mamba3.gates import scalar_gates
from hybridkit.kernels.mamba3.reference import mamba3_scan_sequential
from hybridkit.kernels.mamba3.state import Mamba3State
from hybridkit.kernels.mamba3.step.weights import StepInputs, StepWeights


def _head_rms(u: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise each head's P values; ``weight`` (H * P,) scales them."""
    u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)
    return u * weight.to(u.dtype).view(u.shape[-2], u.shape[-1])


def gated_output(
    y: torch.Tensor,
    z: torch.Tensor,
    mimo_z: torch.Tensor | None,
    mimo_o: torch.Tensor | None,
    norm: tuple[torch.Tensor, str, float] | None = None,
) -> torch.Tensor:
    """``sum_r mimo_o_r * g_r`` with ``g_r = y_r * silu(z * mimo_z_r)`` (docs/mamba3.md 1.8).

    ``y`` (..., R, H, P) per rank, ``z`` (..., H, P); returns (..., H, P) in y's dtype. SISO
    (``mimo_*`` None) is the plain ``y * silu(z)``. ``norm`` = (weight, mode, eps) adds the
    per-head output norm: ``grouped_pregate`` normalises y before the gate, ``grouped_postgate``
    the gated product.
    """
    zr = z.unsqueeze(-3).to(y.dtype)
    if mimo_z is not None:
        zr = zr * mimo_z.transpose(0, 1).to(y.dtype)  # (R, H, P)
    if norm is not None and norm[1] == "grouped_pregate":
        y = _head_rms(y, norm[0], norm[2])
    o = y * F.silu(zr)
    if norm is not None and norm[1] == "grouped_postgate":
        o = _head_rms(o, norm[0], norm[2])
    if mimo_o is None:
        return o.squeeze(-3)
    return (o * mimo_o.transpose(0, 1).to(o.dtype)).sum(dim=-3)


def bc_norm(u: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """BCNorm (RMS over N, then the scale) in ``dtype``: the layer's ``RMSNorm`` would round its
    result to the input's dtype, which the step does not need to."""
    u = u.to(dtype)
    return u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)


def mamba3_step_reference(
    inputs: StepInputs, state: Mamba3State, weights: StepWeights
) -> torch.Tensor:
    """One decode step; updates ``state`` in place and returns the output.

    With ``inputs.z`` the output is gated (:func:`gated_output`) and (B, H, P) in x's dtype;
    without it, it is the per-rank SSM output y (B, R, H, P) in the compute dtype (float32,
    float64 for float64 inputs), for layers that normalise before gating. Writing the state in
    place keeps the cache's tensors (and so a captured CUDA graph's pointers) the same.
    """
    w = weights
    x, z, bk, cq, dd_dt, dd_a, trap, angles = inputs
    f64 = torch.float64 in (x.dtype, state.ssm.dtype)
    ct = torch.float64 if f64 else torch.float32
    batch, nheads, _ = x.shape
    dt, adt = scalar_gates(dd_dt.to(ct), dd_a, w.dt_bias, w.a_activation, w.a_floor)
    k = bc_norm(bk, w.B_norm, w.norm_eps, ct)
    q = bc_norm(cq, w.C_norm, w.norm_eps, ct)
    ang = None
    if angles is not None:
        ang = angles[:, None, None, :].expand(batch, 1, nheads, angles.shape[-1])
    y, new = mamba3_scan_sequential(
        q[:, None],
        k[:, None],
        x[:, None].to(ct),
        adt[..., None],
        dt[..., None],
        None if trap is None else trap[..., None],
        w.C_bias,
        w.B_bias,
        ang,
        w.D,
        w.mimo_x,
        pairing=w.pairing,
        initial_state=state,
    )
    for dst, src in zip(state, new, strict=True):
        dst.copy_(src)
    y = y[:, 0]
    if z is None:
        return y
    norm = None if w.out_norm is None else (w.out_norm, w.out_norm_mode, w.norm_eps)
    return gated_output(y, z, w.mimo_z, w.mimo_o, norm).to(x.dtype)
