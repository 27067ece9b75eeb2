"""Ground-truth Mamba-3 scans: the token-by-token recurrence and the closed (quadratic) form.

Both implement docs/mamba3.md section 2 exactly (exponential-trapezoidal update, data-dependent
rotation, per-head biases, MIMO rank R with SISO as R = 1) and run in float64 whenever any input is
float64. They exist to be *obviously* correct rather than fast: every faster path (the chunked
torch scan, later Triton kernels) is tested against them, and the two are tested against each
other to ~1e-10, which pins down the trapezoid shift, the initial-state rule and the final state.

Shared conventions (per batch b, head h, group ``g(h) = h // (H // G)``):

* ``Theta_t = (Theta_{t-1} + pi * tanh(angles_t) * dt_t) mod 2 pi``;
* ``q_t, k_t`` = group input + per-head bias, rotated by ``Theta_t`` (pairing per variant);
* ``h_t = alpha_t h_{t-1} + beta_t sum_r xt_{t-1,r} (x) kbar_{t-1,r} + gamma_t sum_r xt_{t,r} (x)
  kbar_{t,r}`` with ``xt_{t,r} = x_t * psi_r``;
* ``y_{t,r} = h_t . qbar_{t,r} + D x~_{t,r}``.

The preprocessing helpers here (:func:`prepare_scan_inputs`, :func:`run_scan`,
:func:`rotate_pairs`, :func:`wrap_angle`) are shared with :mod:`.chunked` so that every
implementation validates and upcasts its inputs identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from hybridkit.kernels.mamba3.state import Mamba3State

__all__ = [
    "PAIRINGS",
    "ScanInputs",
    "mamba3_scan_quadratic",
    "mamba3_scan_sequential",
    "prepare_scan_inputs",
    "rotate_pairs",
    "run_scan",
    "wrap_angle",
]

TWO_PI = 2.0 * math.pi
PAIRINGS = ("interleaved", "halves")


class ScanInputs(NamedTuple):
    """Validated inputs in the compute dtype, with everything per-token already broadcast.

    Group expansion, bias add, psi scaling and sigmoid(trap) are done once here so that the
    implementations differ only in how they evaluate the recurrence.
    """

    q: Tensor  # (B, L, R, H, N) biased, per head, unrotated
    k: Tensor  # (B, L, R, H, N)
    x: Tensor  # (B, L, R, H, P) x scaled by psi per rank
    v: Tensor  # (B, L, H, P) raw x (compute dtype), source of the final v state
    adt: Tensor  # (B, H, L)
    dt: Tensor  # (B, H, L)
    lam: Tensor  # (B, H, L) sigmoid(trap), or ones for exponential-Euler
    omega: Tensor | None  # (B, L, H, S) per-token angle increments pi * tanh(a) * dt
    D: Tensor | None  # (H,)
    psi: Tensor  # (R, H, P)
    pairing: str
    init: Mamba3State  # compute dtype; zeros when no initial state was given


def wrap_angle(theta: Tensor) -> Tensor:
    """``theta mod 2 pi`` in [0, 2 pi), written as the spec's ``v - 2 pi floor(v / 2 pi)``.

    The floor has zero gradient, so the derivative is 1 everywhere (as for the kernels).
    """
    return theta - TWO_PI * torch.floor(theta / TWO_PI)


def rotate_pairs(u: Tensor, theta: Tensor, pairing: str) -> Tensor:
    """Rotate the first ``S = theta.shape[-1]`` dimension pairs of ``u`` counter-clockwise.

    ``u`` is (..., N) and ``theta`` broadcasts against (..., S). Pairs are ``(2j, 2j+1)`` for
    ``"interleaved"`` (SISO kernels) and ``(j, j + N//2)`` for ``"halves"`` (MIMO kernels); the
    remaining dimensions pass through. Built from slices and ``cat`` (no in-place writes) so
    autograd works through it.
    """
    n_angles = theta.shape[-1]
    if n_angles == 0:
        return u
    cos, sin = torch.cos(theta), torch.sin(theta)
    # split/unbind rather than indexing: their backward is a cat/stack, whereas every slice's
    # backward allocates and zero-fills a full-size gradient.
    dstate = u.shape[-1]
    if pairing == "interleaved":
        pairs, rest = u.split((2 * n_angles, dstate - 2 * n_angles), dim=-1)
        u0, u1 = pairs.unflatten(-1, (n_angles, 2)).unbind(-1)
        rot = torch.stack((u0 * cos - u1 * sin, u0 * sin + u1 * cos), dim=-1).flatten(-2)
        return torch.cat((rot, rest), dim=-1)
    half = dstate // 2
    sizes = (n_angles, half - n_angles, n_angles, dstate - half - n_angles)
    u0, mid0, u1, mid1 = u.split(sizes, dim=-1)
    return torch.cat((u0 * cos - u1 * sin, mid0, u0 * sin + u1 * cos, mid1), dim=-1)


def _shape_error(name: str, tensor: Tensor, expected: str) -> ValueError:
    return ValueError(f"mamba3 scan: {name} must have shape {expected}, got {tuple(tensor.shape)}")


def _check_shapes(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, mimo_x, pairing) -> int:
    """Raise a ValueError naming the first input whose shape is off; return S (0 without
    angles)."""
    batch, length, rank, ngroups, dstate = q.shape
    if k.shape != q.shape:
        raise _shape_error("k", k, f"{tuple(q.shape)} (same as q)")
    if v.dim() != 4 or v.shape[:2] != (batch, length):
        raise _shape_error("v", v, f"({batch}, {length}, H, P)")
    nheads, headdim = v.shape[2], v.shape[3]
    if ngroups == 0 or nheads % ngroups != 0:
        raise ValueError(
            f"mamba3 scan: nheads ({nheads}) must be a multiple of ngroups ({ngroups})"
        )
    if rank == 0:
        raise ValueError("mamba3 scan: the rank axis of q/k (R) must be at least 1")
    gate_shape = (batch, nheads, length)
    for name, t in (("adt", adt), ("dt", dt), ("trap", trap)):
        if t is not None and t.shape != gate_shape:
            raise _shape_error(name, t, str(gate_shape))
    bias_shape = (nheads, rank, dstate)
    for name, t in (("q_bias", q_bias), ("k_bias", k_bias)):
        if t.shape != bias_shape:
            raise _shape_error(name, t, str(bias_shape))
    if pairing not in PAIRINGS:
        raise ValueError(f"mamba3 scan: pairing must be one of {PAIRINGS}, got {pairing!r}")
    n_angles = 0
    if angles is not None:
        if angles.dim() != 4 or angles.shape[:3] != (batch, length, nheads):
            raise _shape_error("angles", angles, f"({batch}, {length}, {nheads}, S)")
        n_angles = angles.shape[3]
        if pairing == "interleaved" and 2 * n_angles > dstate:
            raise ValueError(
                f"mamba3 scan: interleaved pairing needs 2*S <= N, got S={n_angles}, N={dstate}"
            )
        if pairing == "halves" and n_angles > dstate // 2:
            raise ValueError(
                f"mamba3 scan: halves pairing needs S <= N//2, got S={n_angles}, N={dstate}"
            )
    if D is not None and D.shape != (nheads,):
        raise _shape_error("D", D, f"({nheads},)")
    if mimo_x is not None and mimo_x.shape != (nheads, rank, headdim):
        raise _shape_error("mimo_x", mimo_x, str((nheads, rank, headdim)))
    return n_angles


def _sequence_bounds(cu_seqlens: Tensor | None, batch: int, length: int) -> list[int] | None:
    """The packed sequences' boundaries as a host list (validated), or None."""
    if cu_seqlens is None:
        return None
    if batch != 1:
        raise ValueError(f"mamba3 scan: cu_seqlens requires batch size 1, got {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise _shape_error("cu_seqlens", cu_seqlens, "(nseq + 1,) with nseq >= 1")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex:
        raise ValueError(f"mamba3 scan: cu_seqlens must be integer, got {cu_seqlens.dtype}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != length:
        raise ValueError(
            f"mamba3 scan: cu_seqlens must start at 0 and end at L={length}, got {bounds}"
        )
    if any(b1 < b0 for b0, b1 in zip(bounds[:-1], bounds[1:], strict=True)):
        raise ValueError(f"mamba3 scan: cu_seqlens must be non-decreasing, got {bounds}")
    return bounds


def _initial_state(
    st: Mamba3State | None, shape: tuple[int, ...], n_angles: int, has_angles: bool, dtype, device
) -> Mamba3State:
    """The initial state validated against ``shape`` = (sequences, H, P, N, R) and cast to the
    compute dtype, or zeros."""
    nstates, nheads, headdim, dstate, rank = shape
    if st is None:
        return Mamba3State.zeros(
            nstates, nheads, headdim, dstate, n_angles, rank, dtype=dtype, device=device
        )
    if st.angle.dim() != 3 or st.angle.shape[:2] != (nstates, nheads):
        raise _shape_error("initial_state.angle", st.angle, f"({nstates}, {nheads}, S)")
    if has_angles and st.angle.shape[2] != n_angles:
        raise _shape_error("initial_state.angle", st.angle, f"({nstates}, {nheads}, {n_angles})")
    checks = (
        ("initial_state.ssm", st.ssm, (nstates, nheads, headdim, dstate)),
        ("initial_state.k", st.k, (nstates, rank, nheads, dstate)),
        ("initial_state.v", st.v, (nstates, nheads, headdim)),
    )
    for name, t, want in checks:
        if t.shape != want:
            raise _shape_error(name, t, str(want))
    return Mamba3State(*(t.to(device=device, dtype=dtype) for t in st))


def prepare_scan_inputs(
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
    mimo_x: Tensor | None,
    pairing: str,
    initial_state: Mamba3State | None,
    cu_seqlens: Tensor | None,
) -> tuple[ScanInputs, list[int] | None]:
    """Validate shapes, pick the compute dtype, upcast and broadcast the per-token inputs.

    Returns the prepared inputs and, for varlen calls, the sequence boundaries as a Python list
    (the per-sequence loop needs them on the host anyway).
    """
    if q.dim() != 5:
        raise _shape_error("q", q, "(B, L, R, G, N)")
    batch, length, rank, ngroups, dstate = q.shape
    n_angles = _check_shapes(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, mimo_x, pairing)
    nheads, headdim = v.shape[2], v.shape[3]
    bounds = _sequence_bounds(cu_seqlens, batch, length)
    nstates = batch if bounds is None else len(bounds) - 1
    floats = [q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, mimo_x]
    if initial_state is not None:
        floats.extend(initial_state)
    any64 = any(t is not None and t.dtype == torch.float64 for t in floats)
    dtype = torch.float64 if any64 else torch.float32
    device = q.device

    shape = (nstates, nheads, headdim, dstate, rank)
    init = _initial_state(initial_state, shape, n_angles, angles is not None, dtype, device)

    def up(t: Tensor) -> Tensor:
        return t.to(dtype)

    def heads_after_rank(bias: Tensor) -> Tensor:
        # (H, R, N) -> (R, H, N). For R = 1 this is a reshape, whose gradient is contiguous like
        # the parameter; a transpose's gradient would differ in the size-1 dimension's stride,
        # which DDP reports as "grad strides do not match bucket view strides".
        if rank == 1:
            return up(bias).reshape(1, nheads, bias.shape[-1])
        return up(bias).transpose(0, 1)

    group_size = nheads // ngroups
    q_h = up(q).repeat_interleave(group_size, dim=3) + heads_after_rank(q_bias)
    k_h = up(k).repeat_interleave(group_size, dim=3) + heads_after_rank(k_bias)
    if mimo_x is None:
        psi = torch.ones(rank, nheads, headdim, dtype=dtype, device=device)
    else:
        psi = up(mimo_x).transpose(0, 1)
    v_c = up(v)
    x = v_c.unsqueeze(2) * psi
    dt_c = up(dt)
    lam = torch.ones_like(dt_c) if trap is None else torch.sigmoid(up(trap))
    omega = None
    if angles is not None:
        omega = math.pi * torch.tanh(up(angles)) * dt_c.transpose(1, 2).unsqueeze(-1)
    inputs = ScanInputs(
        q=q_h,
        k=k_h,
        x=x,
        v=v_c,
        adt=up(adt),
        dt=dt_c,
        lam=lam,
        omega=omega,
        D=None if D is None else up(D),
        psi=psi,
        pairing=pairing,
        init=init,
    )
    return inputs, bounds


def _split_sequences(inp: ScanInputs, bounds: list[int]) -> list[ScanInputs]:
    """The inputs of every packed sequence as a batch of one (``split``: cheap backward)."""
    sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]

    def along(t: Tensor, dim: int) -> tuple[Tensor, ...]:
        return t.split(sizes, dim=dim)

    omegas = [None] * len(sizes) if inp.omega is None else along(inp.omega, 1)
    parts = zip(
        along(inp.q, 1),
        along(inp.k, 1),
        along(inp.x, 1),
        along(inp.v, 1),
        along(inp.adt, -1),
        along(inp.dt, -1),
        along(inp.lam, -1),
        omegas,
        strict=True,
    )
    return [
        inp._replace(
            q=q,
            k=k,
            x=x,
            v=v,
            adt=adt,
            dt=dt,
            lam=lam,
            omega=omega,
            init=Mamba3State(*(t[i : i + 1] for t in inp.init)),
        )
        for i, (q, k, x, v, adt, dt, lam, omega) in enumerate(parts)
    ]


ScanCore = Callable[[ScanInputs], tuple[Tensor, Mamba3State]]


def _run_core(core: ScanCore, inp: ScanInputs) -> tuple[Tensor, Mamba3State]:
    """Run one implementation; an empty sequence returns its initial state unchanged."""
    batch, length, rank, nheads, _ = inp.q.shape
    if length == 0:
        y = inp.x.new_zeros(batch, 0, rank, nheads, inp.x.shape[-1])
        return y, inp.init
    return core(inp)


def run_scan(
    core: ScanCore,
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
    mimo_x: Tensor | None,
    pairing: str,
    initial_state: Mamba3State | None,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Mamba3State]:
    """Prepare the inputs, run ``core`` (once, or once per packed sequence), fix output dtypes.

    Varlen calls run each sequence separately so that no angle, trapezoid shift or state can leak
    across a boundary by construction.
    """
    inp, bounds = prepare_scan_inputs(
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
    if bounds is None:
        y, state = _run_core(core, inp)
    else:
        ys: list[Tensor] = []
        states: list[Mamba3State] = []
        for seq in _split_sequences(inp, bounds):
            y_i, state_i = _run_core(core, seq)
            ys.append(y_i)
            states.append(state_i)
        y = torch.cat(ys, dim=1)
        state = Mamba3State(*(torch.cat(parts, dim=0) for parts in zip(*states, strict=True)))
    # a new tuple, not ``_replace``: torch 2.5's Dynamo does not trace into collections
    return y, Mamba3State(state.angle, state.ssm, state.k, state.v.to(v.dtype))


def _rank_outer(x: Tensor, k: Tensor) -> Tensor:
    """``sum_r x_r (x) k_r`` for x (B, R, H, P), k (B, R, H, N) -> (B, H, P, N)."""
    return torch.einsum("brhp,brhn->bhpn", x, k)


def _sequential_core(inp: ScanInputs) -> tuple[Tensor, Mamba3State]:
    """Spec 2.4 / 2.5: one token at a time, exactly as a decode loop would run."""
    length = inp.q.shape[1]
    theta, h, k_prev, v_prev = inp.init
    ys: list[Tensor] = []
    for t in range(length):
        q_t, k_t = inp.q[:, t], inp.k[:, t]  # (B, R, H, N)
        if inp.omega is not None:
            theta = wrap_angle(theta + inp.omega[:, t])
            q_t = rotate_pairs(q_t, theta.unsqueeze(1), inp.pairing)
            k_t = rotate_pairs(k_t, theta.unsqueeze(1), inp.pairing)
        lam, dt = inp.lam[..., t], inp.dt[..., t]  # (B, H)
        alpha = torch.exp(inp.adt[..., t])
        beta = (1.0 - lam) * dt * alpha
        gamma = lam * dt
        x_t = inp.x[:, t]  # (B, R, H, P)
        x_prev = v_prev.unsqueeze(1) * inp.psi
        h = (
            alpha[..., None, None] * h
            + beta[..., None, None] * _rank_outer(x_prev, k_prev)
            + gamma[..., None, None] * _rank_outer(x_t, k_t)
        )
        y_t = torch.einsum("bhpn,brhn->brhp", h, q_t)
        if inp.D is not None:
            y_t = y_t + inp.D[:, None] * x_t
        ys.append(y_t)
        k_prev, v_prev = k_t, inp.v[:, t]
    return torch.stack(ys, dim=1), Mamba3State(theta, h, k_prev, v_prev)


def _quadratic_core(inp: ScanInputs) -> tuple[Tensor, Mamba3State]:
    """Spec 2.6: the whole sequence as one masked L x L (x R x R) contraction."""
    length = inp.q.shape[1]
    theta0, h0, k_prev, v_prev = inp.init
    q, k = inp.q, inp.k
    theta_last = theta0
    if inp.omega is not None:
        theta = wrap_angle(theta0.unsqueeze(1) + torch.cumsum(inp.omega, dim=1))  # (B, L, H, S)
        q = rotate_pairs(q, theta.unsqueeze(2), inp.pairing)
        k = rotate_pairs(k, theta.unsqueeze(2), inp.pairing)
        theta_last = theta[:, -1]

    gamma = inp.lam * inp.dt  # (B, H, L)
    beta_over_alpha = (1.0 - inp.lam) * inp.dt  # the next token's beta / alpha, per token
    # eta_s is the trapezoid weight token s receives from token s+1; the last token has none.
    eta = torch.cat((beta_over_alpha[..., 1:], torch.zeros_like(beta_over_alpha[..., :1])), -1)
    kappa = gamma + eta
    cs = torch.cumsum(inp.adt, dim=-1)  # (B, H, L)

    idx = torch.arange(length, device=q.device)
    strictly_lower = idx[:, None] > idx[None, :]
    # masked_fill before exp: masked (upper) entries would overflow and poison the gradient.
    decay = (cs[..., :, None] - cs[..., None, :]).masked_fill(~strictly_lower, -math.inf).exp()
    weights = decay * kappa[..., None, :] + torch.diag_embed(gamma)  # (B, H, t, s)
    scores = torch.einsum("btrhn,bsuhn->bhtrsu", q, k)
    y = torch.einsum("bhtrsu,bhts,bsuhp->btrhp", scores, weights, inp.x)

    # Initial-state term: H0 plus the first token's trapezoid contribution of the previous token.
    eta_init = beta_over_alpha[..., 0]  # (B, H)
    h_in = h0 + eta_init[..., None, None] * _rank_outer(v_prev.unsqueeze(1) * inp.psi, k_prev)
    decay_in = torch.exp(cs).transpose(1, 2)[:, :, None, :, None]  # (B, L, 1, H, 1)
    y = y + decay_in * torch.einsum("bhpn,btrhn->btrhp", h_in, q)
    if inp.D is not None:
        y = y + inp.D[:, None] * inp.x

    to_end = torch.exp(cs[..., -1:] - cs) * kappa  # (B, H, L); eta_{L-1} = 0 makes this exact
    h_last = torch.exp(cs[..., -1])[..., None, None] * h_in
    h_last = h_last + torch.einsum("bsuhp,bhs,bsuhn->bhpn", inp.x, to_end, k)
    return y, Mamba3State(theta_last, h_last, k[:, -1], inp.v[:, -1])


def mamba3_scan_sequential(
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
) -> tuple[Tensor, Mamba3State]:
    """Token-by-token Mamba-3 recurrence (docs/mamba3.md 2.4/2.5, rank R; SISO is R = 1).

    Shapes: q, k (B, L, R, G, N) after BCNorm, before bias, unrotated; v (B, L, H, P);
    adt, dt, trap (B, H, L) (trap raw pre-sigmoid, None => lambda = 1); q_bias, k_bias (H, R, N);
    angles (B, L, H, S) raw (None => no rotation); D (H,) (None => no skip); mimo_x (H, R, P)
    (None => ones). ``pairing`` is "interleaved" (2j, 2j+1) or "halves" (j, j + N//2).
    ``initial_state`` and the returned state are :class:`Mamba3State`; with ``cu_seqlens``
    (B must be 1) they hold one row per packed sequence.

    Returns y (B, L, R, H, P) in the compute dtype (float64 if any input is float64, else
    float32): the SSM output per rank including the D skip, before gating; and the final state.
    This is the slowest and most literal implementation, the one every other one is tested
    against; for L == 1 it is also exactly the decode step.
    """
    return run_scan(
        _sequential_core,
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


def mamba3_scan_quadratic(
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
) -> tuple[Tensor, Mamba3State]:
    """Closed (quadratic, L x L masked) form of the Mamba-3 scan (docs/mamba3.md 2.6).

    Same signature and results as :func:`mamba3_scan_sequential`. Evaluating the whole sequence
    as one masked contraction is an independent derivation of the same math (it has no
    recurrence to get subtly wrong), which is why the two are checked against each other; it is
    also the per-chunk building block of the chunked scan. Memory is O(L^2 R^2) per head.
    """
    return run_scan(
        _quadratic_core,
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
