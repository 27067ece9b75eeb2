"""A CuTe DSL decode backend: the state update and read-out in CuTe, the rest in torch.

Second backend of the decode step (``backend: cute``), SISO only. It exists to measure the
state-update kernel the official implementation writes in CuTe DSL against our Triton step;
the gates, BCNorm, rotation, the k / v / angle bookkeeping and the gate run as torch ops around
the kernel of :mod:`.cute_kernel` (the Triton step fuses those), so as a whole layer step it is
slower than ``triton``. Importing this module imports ``cutlass``: only
:mod:`hybridkit.kernels.mamba3.ops` imports it, lazily, after ``cute_unavailable()`` said it
can.
"""

from __future__ import annotations

import math

import torch

from hybridkit.kernels.mamba3.gates import scalar_gates
from hybridkit.kernels.mamba3.reference import rotate_pairs, wrap_angle
from hybridkit.kernels.mamba3.state import Mamba3State
from hybridkit.kernels.mamba3.step.cute_kernel import compiled_update
from hybridkit.kernels.mamba3.step.reference import bc_norm, gated_output
from hybridkit.kernels.mamba3.step.weights import StepInputs, StepWeights


def mamba3_step_cute(inputs: StepInputs, state: Mamba3State, weights: StepWeights) -> torch.Tensor:
    """Same contract as :func:`.reference.mamba3_step_reference` (SISO only)."""
    w = weights
    x, z, bk, cq, dd_dt, dd_a, trap, angles = inputs
    batch, nheads, headdim = x.shape
    if bk.shape[1] != 1 or w.mimo_x is not None:
        raise ValueError("the cute decode step is SISO only (mimo_rank 1)")
    f32 = torch.float32
    dt, adt = scalar_gates(dd_dt, dd_a, w.dt_bias, w.a_activation, w.a_floor)
    group = nheads // bk.shape[2]
    k = bc_norm(bk[:, 0], w.B_norm, w.norm_eps, f32).repeat_interleave(group, 1) + w.B_bias[:, 0]
    q = bc_norm(cq[:, 0], w.C_norm, w.norm_eps, f32).repeat_interleave(group, 1) + w.C_bias[:, 0]
    theta = state.angle
    if angles is not None:
        omega = math.pi * torch.tanh(angles.to(f32))[:, None, :] * dt[..., None]
        theta = wrap_angle(state.angle + omega)
        k, q = rotate_pairs(k, theta, w.pairing), rotate_pairs(q, theta, w.pairing)
    lam = torch.ones_like(dt) if trap is None else torch.sigmoid(trap.to(f32))
    alpha = torch.exp(adt)
    xf = x.to(f32)
    xg = (lam * dt)[..., None] * xf
    vb = ((1.0 - lam) * dt * alpha)[..., None] * state.v.to(f32)
    dx = xf * w.D.to(f32)[:, None] if w.D is not None else torch.zeros_like(xf)
    y = torch.empty_like(xf)
    update = compiled_update(headdim, k.shape[-1], str(state.ssm.dtype).removeprefix("torch."))
    update(state.ssm, alpha.contiguous(), xg, vb, dx, k.contiguous(), state.k[:, 0].to(f32),
           q.contiguous(), y)  # fmt: skip
    state.angle.copy_(theta)
    state.k[:, 0].copy_(k)
    state.v.copy_(x)
    y = y[:, None]
    if z is None:
        return y
    norm = None if w.out_norm is None else (w.out_norm, w.out_norm_mode, w.norm_eps)
    return gated_output(y, z, None, None, norm).to(x.dtype)
