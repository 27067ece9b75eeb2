"""Chunked Mamba-3 scan in plain torch: the fast CPU path and the template for GPU kernels.

The sequence is cut into chunks of ``chunk_size`` tokens. Inside a chunk the closed form of
docs/mamba3.md 2.6 is a (C*R) x (C*R) masked matmul; between chunks only a P x N state per head
is carried.
Cost is O(L * C * R^2) instead of O(L^2 R^2) (quadratic form) and the work per step is matmuls
instead of the L tiny updates of the recurrence.

The state carried across a chunk boundary is the *pre-added* one of docs/mamba3.md 2.7:
``S_c = h_e + eta_e * sum_r x~_{e,r} (x) kbar_{e,r}`` for the chunk's last token e, where
``eta_e = (1 - lambda_{e+1}) dt_{e+1}``. Carrying it means every token of the next chunk sees the
previous token's trapezoid contribution through the ordinary decay ``exp(cs_t)``, exactly like
the initial-state rule ``H0 + eta_init xprev (x) kprev`` of docs/mamba3.md 2.6 (which is the same
formula applied to an externally supplied state). Because ``eta`` of the sequence's last token
is 0, the state after the last chunk is the true ``h_{L-1}``.

Precision choices (they matter in float32): the decay cumsum restarts in every chunk (no large
global cumsum differences), all decays are ``exp`` of non-positive numbers, and the rotation
angle's running sum is kept in float64 before the mod 2 pi.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from hybridkit.kernels.mamba3.reference import ScanInputs, rotate_pairs, run_scan, wrap_angle
from hybridkit.kernels.mamba3.state import Mamba3State

__all__ = ["mamba3_scan_chunked"]


def _cumulative_angle(theta0: Tensor, omega: Tensor) -> Tensor:
    """``Theta_t = (Theta_init + sum_{u<=t} omega_u) mod 2 pi`` for all t, (B, L, H, S).

    The running sum is taken in float64: it grows without bound before the mod, and in float32
    its absolute error would grow with L (the official kernel reduces mod 2 pi once per chunk
    for the same reason). The tensor is small (no N, P or R axis), so this costs nothing.
    """
    total = theta0.double().unsqueeze(1) + torch.cumsum(omega.double(), dim=1)
    return wrap_angle(total).to(omega.dtype)


def _chunked_core(inp: ScanInputs, chunk_size: int) -> tuple[Tensor, Mamba3State]:
    """Evaluate the scan chunk by chunk; the chunk loop is the only Python loop."""
    theta, h0, k_prev, v_prev = inp.init
    q, k = inp.q, inp.k
    if inp.omega is not None:
        # Rotation is per token and cheap: do it once for the whole sequence, before chunking.
        angle = _cumulative_angle(theta, inp.omega)  # (B, L, H, S)
        q = rotate_pairs(q, angle.unsqueeze(2), inp.pairing)
        k = rotate_pairs(k, angle.unsqueeze(2), inp.pairing)
        theta = angle[:, -1]
    # Head-major layouts so that each chunk's contractions are batched matmuls over (B, H).
    q = q.permute(0, 3, 1, 2, 4)  # (B, H, L, R, N)
    k = k.permute(0, 3, 1, 2, 4)
    x = inp.x.permute(0, 3, 1, 2, 4)  # (B, H, L, R, P)

    gamma = inp.lam * inp.dt  # (B, H, L)
    beta_over_alpha = (1.0 - inp.lam) * inp.dt
    eta = torch.cat((beta_over_alpha[..., 1:], torch.zeros_like(beta_over_alpha[..., :1])), -1)
    kappa = gamma + eta  # key scale; crosses chunk boundaries (pre-added state), not sequences

    x_prev = v_prev.unsqueeze(1) * inp.psi  # (B, R, H, P)
    eta_init = beta_over_alpha[..., 0, None, None]
    state = h0 + eta_init * torch.einsum("brhp,brhn->bhpn", x_prev, k_prev)  # (B, H, P, N)

    # Split once instead of slicing per chunk: the backward of ``split`` is one concatenation,
    # while per-chunk slices would each scatter into a full-length zero gradient (O(L^2 / C)).
    ys: list[Tensor] = []
    k_c = k  # the last chunk's rotated keys give the final k state
    for q_c, k_c, x_c, adt_c, kappa_c, gamma_c in zip(
        q.split(chunk_size, dim=2),
        k.split(chunk_size, dim=2),
        x.split(chunk_size, dim=2),
        inp.adt.split(chunk_size, dim=-1),
        kappa.split(chunk_size, dim=-1),
        gamma.split(chunk_size, dim=-1),
        strict=True,
    ):
        cs = torch.cumsum(adt_c, dim=-1)  # (B, H, C), decay from the chunk start

        n = cs.shape[-1]
        strictly_lower = torch.ones(n, n, dtype=torch.bool, device=cs.device).tril(-1)
        decay = (cs[..., :, None] - cs[..., None, :]).masked_fill(~strictly_lower, -math.inf)
        weights = decay.exp() * kappa_c[..., None, :] + torch.diag_embed(gamma_c)  # (B,H,t,s)

        scores = torch.einsum("bhtrn,bhsun->bhtrsu", q_c, k_c) * weights[:, :, :, None, :, None]
        y_c = torch.einsum("bhtrsu,bhsup->bhtrp", scores, x_c)
        y_c = y_c + torch.exp(cs)[..., None, None] * torch.einsum("bhtrn,bhpn->bhtrp", q_c, state)
        ys.append(y_c)

        to_end = (torch.exp(cs[..., -1:] - cs) * kappa_c)[..., None, None]  # (B, H, C, 1, 1)
        state = torch.exp(cs[..., -1])[..., None, None] * state + torch.einsum(
            "bhsup,bhsun->bhpn", x_c * to_end, k_c
        )

    y = torch.cat(ys, dim=2).permute(0, 2, 3, 1, 4)  # (B, L, R, H, P)
    if inp.D is not None:
        y = y + inp.D[:, None] * inp.x
    k_last = k_c[:, :, -1].transpose(1, 2)  # (B, R, H, N)
    return y, Mamba3State(theta, state, k_last, inp.v[:, -1])


def mamba3_scan_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adt: Tensor,
    dt: Tensor,
    trap: Tensor | None,
    q_bias: Tensor,
    k_bias: Tensor,
    angles: Tensor | None,
    D: Tensor | None,
    mimo_x: Tensor | None = None,
    *,
    pairing: str = "interleaved",
    initial_state: Mamba3State | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Mamba3State]:
    """Chunked Mamba-3 scan; same signature and results as the reference scans.

    See :func:`hybridkit.kernels.mamba3.reference.mamba3_scan_sequential` for shapes and
    semantics. ``chunk_size`` trades the O(C) per-token intra-chunk work against the number of
    sequential chunk steps; the official kernels use 64 for SISO and 64 / R for MIMO, and the
    same choice keeps the (C*R)^2 score block small here. Differentiable with plain autograd.
    """
    if chunk_size < 1:
        raise ValueError(f"mamba3 scan: chunk_size must be >= 1, got {chunk_size}")
    return run_scan(
        partial(_chunked_core, chunk_size=chunk_size),
        q,
        k,
        v,
        adt,
        dt,
        trap,
        q_bias,
        k_bias,
        angles,
        D,
        mimo_x,
        pairing,
        initial_state,
        cu_seqlens,
    )
