"""Tests for the Mamba-3 scans: sequential recurrence, quadratic closed form and chunked path.

The sequential and quadratic forms are independent derivations of docs/mamba3.md section 2, so their
agreement to ~1e-10 in float64 pins down the trapezoid shift, the initial-state rule and the
final state; a hand-written per-(batch, head) loop with explicit N x N rotation matrices checks
the conventions (rotation sign, pairing, groups, biases, psi) that the two share. The chunked
path is then checked against both, including autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch
from torch import Tensor

from hybridkit.kernels.mamba3.chunked import mamba3_scan_chunked
from hybridkit.kernels.mamba3.reference import mamba3_scan_quadratic, mamba3_scan_sequential
from hybridkit.kernels.mamba3.state import Mamba3State
from tests.helpers import angle_err, rel_err

F64 = torch.float64
ScanFn = Callable[..., tuple[Tensor, Mamba3State]]

IMPLS: dict[str, ScanFn] = {
    "sequential": mamba3_scan_sequential,
    "quadratic": mamba3_scan_quadratic,
    "chunked": partial(mamba3_scan_chunked, chunk_size=8),
}


@dataclass(frozen=True)
class Cfg:
    """Problem sizes; ``pairing`` follows the variant (SISO interleaved, MIMO halves)."""

    B: int = 2
    H: int = 4
    G: int = 1
    N: int = 8
    P: int = 4
    R: int = 1
    S: int = 2
    pairing: str = "interleaved"


CONFIGS = {
    "siso": Cfg(R=1, G=1, S=2, pairing="interleaved"),
    "siso_grouped": Cfg(R=1, G=2, S=3, pairing="interleaved"),
    "mimo2": Cfg(R=2, G=1, S=2, pairing="halves"),
    "mimo4_grouped": Cfg(R=4, G=2, S=4, pairing="halves"),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rms_normalised(t: Tensor) -> Tensor:
    return t / t.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()


def make_inputs(
    cfg: Cfg,
    L: int,
    seed: int,
    *,
    dtype: torch.dtype = F64,
    dt_max: float = 0.5,
    batch: int | None = None,
) -> dict[str, Any]:
    """Random, realistic inputs keyed by the scan's parameter names (all optional ones present)."""
    g = _gen(seed)
    B = cfg.B if batch is None else batch
    H, G, N, P, R, S = cfg.H, cfg.G, cfg.N, cfg.P, cfg.R, cfg.S

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=F64)

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return torch.empty(*shape, dtype=F64).uniform_(lo, hi, generator=g)

    dt = torch.exp(uniform(math.log(1e-3), math.log(dt_max), B, H, L))
    inputs = {
        "q": _rms_normalised(randn(B, L, R, G, N)),
        "k": _rms_normalised(randn(B, L, R, G, N)),
        "v": randn(B, L, H, P),
        "adt": -uniform(0.5, 4.0, B, H, L) * dt,
        "dt": dt,
        "trap": randn(B, H, L),
        "q_bias": randn(H, R, N),
        "k_bias": randn(H, R, N),
        "angles": randn(B, L, H, S),
        "D": randn(H),
        "mimo_x": randn(H, R, P) / R,
    }
    return {name: t.to(dtype) for name, t in inputs.items()}


def make_state(cfg: Cfg, seed: int, *, batch: int | None = None, dtype=F64) -> Mamba3State:
    """A random initial state; angles kept away from 0 / 2 pi so finite differences never wrap."""
    g = _gen(seed)
    B = cfg.B if batch is None else batch
    return Mamba3State(
        angle=torch.empty(B, cfg.H, cfg.S, dtype=F64).uniform_(2.0, 4.0, generator=g).to(dtype),
        ssm=torch.randn(B, cfg.H, cfg.P, cfg.N, generator=g, dtype=F64).to(dtype),
        k=torch.randn(B, cfg.R, cfg.H, cfg.N, generator=g, dtype=F64).to(dtype),
        v=torch.randn(B, cfg.H, cfg.P, generator=g, dtype=F64).to(dtype),
    )


def assert_same(
    out: tuple[Tensor, Mamba3State], ref: tuple[Tensor, Mamba3State], tol: float, what: str = ""
) -> None:
    """y and every final-state tensor agree to ``tol`` (relative norm; angles modulo 2 pi)."""
    (y, st), (y_ref, st_ref) = out, ref
    assert y.shape == y_ref.shape, f"{what} y shape {y.shape} vs {y_ref.shape}"
    errors = {"y": rel_err(y, y_ref), "angle": angle_err(st.angle, st_ref.angle)}
    for name in ("ssm", "k", "v"):
        a, b = getattr(st, name), getattr(st_ref, name)
        assert a.shape == b.shape, f"{what} state.{name} shape {a.shape} vs {b.shape}"
        errors[name] = rel_err(a, b)
    assert st.angle.shape == st_ref.angle.shape
    bad = {name: e for name, e in errors.items() if not e <= tol}
    assert not bad, f"{what} errors above {tol}: {bad}"


def naive_scan(
    inputs: dict[str, Any],
    *,
    pairing: str,
    init: Mamba3State | None = None,
    euler: bool = False,
) -> tuple[Tensor, Mamba3State]:
    """Spec 2.4/2.5 written as plainly as possible: loops over batch, head and token, with
    explicit N x N rotation matrices. ``euler`` forces lambda = 1 (exponential-Euler);
    ``inputs["angles"] is None`` means no rotation. Shares no code with the library."""
    q, k, v = inputs["q"].double(), inputs["k"].double(), inputs["v"].double()
    adt, dt = inputs["adt"].double(), inputs["dt"].double()
    trap, angles = inputs["trap"], inputs["angles"]
    D, psi = inputs["D"], inputs["mimo_x"]
    B, L, R, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    S = 0 if angles is None else angles.shape[-1]
    S_state = init.angle.shape[-1] if init is not None else S  # passes through if no angles
    y = torch.zeros(B, L, R, H, P, dtype=F64)
    final = Mamba3State(
        torch.zeros(B, H, S_state, dtype=F64),
        torch.zeros(B, H, P, N, dtype=F64),
        torch.zeros(B, R, H, N, dtype=F64),
        torch.zeros(B, H, P, dtype=F64),
    )
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            scale = torch.ones(R, P, dtype=F64) if psi is None else psi[h].double()
            theta = torch.zeros(S, dtype=F64) if init is None else init.angle[b, h].double()
            state = torch.zeros(P, N, dtype=F64) if init is None else init.ssm[b, h].double()
            k_prev = torch.zeros(R, N, dtype=F64) if init is None else init.k[b, :, h].double()
            v_prev = torch.zeros(P, dtype=F64) if init is None else init.v[b, h].double()
            for t in range(L):
                rot = torch.eye(N, dtype=F64)
                if angles is not None:
                    step = math.pi * torch.tanh(angles[b, t, h].double()) * dt[b, h, t]
                    theta = torch.remainder(theta + step, 2 * math.pi)
                    for j in range(S):
                        i0, i1 = (2 * j, 2 * j + 1) if pairing == "interleaved" else (j, j + N // 2)
                        c, s = torch.cos(theta[j]), torch.sin(theta[j])
                        rot[i0, i0], rot[i0, i1], rot[i1, i0], rot[i1, i1] = c, -s, s, c
                q_t = (q[b, t, :, g] + inputs["q_bias"][h].double()) @ rot.T  # (R, N)
                k_t = (k[b, t, :, g] + inputs["k_bias"][h].double()) @ rot.T
                lam = 1.0 if euler or trap is None else torch.sigmoid(trap[b, h, t].double())
                alpha = torch.exp(adt[b, h, t])
                beta = (1 - lam) * dt[b, h, t] * alpha
                gamma = lam * dt[b, h, t]
                x_t = v[b, t, h][None, :] * scale  # (R, P)
                x_prev = v_prev[None, :] * scale
                state = alpha * state + beta * x_prev.T @ k_prev + gamma * x_t.T @ k_t
                y_t = (state @ q_t.T).T  # (R, P)
                if D is not None:
                    y_t = y_t + D[h].double() * x_t
                y[b, t, :, h] = y_t
                k_prev, v_prev = k_t, v[b, t, h]
            final.angle[b, h] = theta
            final.ssm[b, h] = state
            final.k[b, :, h] = k_prev
            final.v[b, h] = v_prev
    return y, final


# --------------------------------------------------------------------------------------------
# sequential vs quadratic


@pytest.mark.parametrize("L", [1, 7, 70])
@pytest.mark.parametrize("with_init", [False, True], ids=["fresh", "init"])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_sequential_matches_quadratic(cfg_name: str, with_init: bool, L: int) -> None:
    cfg = CONFIGS[cfg_name]
    inputs = make_inputs(cfg, L, seed=L)
    init = make_state(cfg, seed=100 + L) if with_init else None
    kw = dict(pairing=cfg.pairing, initial_state=init)
    ref = mamba3_scan_sequential(**inputs, **kw)
    assert_same(mamba3_scan_quadratic(**inputs, **kw), ref, 1e-10, "quadratic")
    assert ref[0].dtype == F64 and ref[0].shape == (cfg.B, L, cfg.R, cfg.H, cfg.P)


@pytest.mark.parametrize("cfg_name", ["siso", "mimo4_grouped"])
def test_sequential_matches_handwritten(cfg_name: str) -> None:
    cfg = CONFIGS[cfg_name]
    inputs = make_inputs(cfg, 9, seed=3)
    init = make_state(cfg, seed=4)
    ref = naive_scan(inputs, pairing=cfg.pairing, init=init)
    out = mamba3_scan_sequential(**inputs, pairing=cfg.pairing, initial_state=init)
    assert_same(out, ref, 1e-12, "sequential vs handwritten")


# --------------------------------------------------------------------------------------------
# chunked


@pytest.mark.parametrize("chunk", [4, 8, 16])
@pytest.mark.parametrize("with_init", [False, True], ids=["fresh", "init"])
@pytest.mark.parametrize("cfg_name", ["siso", "siso_grouped", "mimo2", "mimo4_grouped"])
def test_chunked_matches_sequential(cfg_name: str, with_init: bool, chunk: int) -> None:
    cfg = CONFIGS[cfg_name]
    L = 37  # not a multiple of any chunk size
    inputs = make_inputs(cfg, L, seed=chunk)
    init = make_state(cfg, seed=7) if with_init else None
    kw = dict(pairing=cfg.pairing, initial_state=init)
    ref = mamba3_scan_sequential(**inputs, **kw)
    assert_same(mamba3_scan_chunked(**inputs, **kw, chunk_size=chunk), ref, 1e-10, "chunked")


@pytest.mark.parametrize(("L", "chunk"), [(5, 16), (32, 8), (6, 1), (70, 64), (130, 64)])
def test_chunked_edge_lengths(L: int, chunk: int) -> None:
    """Shorter than a chunk, an exact multiple, chunk 1, and the default chunk size."""
    cfg = CONFIGS["mimo2"]
    inputs = make_inputs(cfg, L, seed=L)
    init = make_state(cfg, seed=L + 1)
    kw = dict(pairing=cfg.pairing, initial_state=init)
    ref = mamba3_scan_quadratic(**inputs, **kw)
    assert_same(mamba3_scan_chunked(**inputs, **kw, chunk_size=chunk), ref, 1e-10, "chunked")


@pytest.mark.parametrize("cfg_name", ["siso", "mimo4_grouped"])
def test_float32_chunked_close_to_float64(cfg_name: str) -> None:
    cfg = CONFIGS[cfg_name]
    inputs = make_inputs(cfg, 45, seed=11)
    init = make_state(cfg, seed=12)
    kw = dict(pairing=cfg.pairing)
    ref = mamba3_scan_sequential(**inputs, **kw, initial_state=init)
    in32 = {name: t.float() for name, t in inputs.items()}
    init32 = Mamba3State(*(t.float() for t in init))
    for fn in (partial(mamba3_scan_chunked, chunk_size=16), mamba3_scan_sequential):
        y, st = fn(**in32, **kw, initial_state=init32)
        assert y.dtype == torch.float32
        assert all(t.dtype == torch.float32 for t in st)
        assert_same((y, st), ref, 1e-5, "float32")


def test_bfloat16_inputs_upcast_to_float32() -> None:
    """bf16 inputs are computed in float32; the v state keeps the input dtype of v."""
    cfg = CONFIGS["siso"]
    inputs = make_inputs(cfg, 20, seed=13, dtype=torch.bfloat16)
    for name in ("adt", "dt", "q_bias", "k_bias", "D", "mimo_x"):
        inputs[name] = inputs[name].float()  # the module keeps these in fp32
    ref = mamba3_scan_sequential(**{n: t.double() for n, t in inputs.items()})
    for fn in IMPLS.values():
        y, st = fn(**inputs)
        assert y.dtype == torch.float32
        assert (st.angle.dtype, st.ssm.dtype, st.k.dtype) == (torch.float32,) * 3
        assert st.v.dtype == torch.bfloat16
        assert torch.equal(st.v, inputs["v"][:, -1])
        assert_same((y, st), ref, 1e-5, "bf16")


# --------------------------------------------------------------------------------------------
# state handoff, varlen


def _time_slice(inputs: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """Tokens ``start:end`` of every per-token input (parameters untouched)."""
    out = dict(inputs)
    for n in ("q", "k", "v", "angles"):
        out[n] = inputs[n][:, start:end]
    for n in ("adt", "dt", "trap"):
        out[n] = inputs[n][..., start:end]
    return out


@pytest.mark.parametrize("cfg_name", ["siso_grouped", "mimo2"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_state_handoff(impl: str, cfg_name: str) -> None:
    """[0:L1] then [L1:L] from the first call's final state == one call on [0:L]."""
    fn, cfg = IMPLS[impl], CONFIGS[cfg_name]
    L, L1 = 23, 9  # the split is not at a chunk boundary
    inputs = make_inputs(cfg, L, seed=21)
    init = make_state(cfg, seed=22)
    kw = dict(pairing=cfg.pairing)
    full = fn(**inputs, **kw, initial_state=init)

    first, second = _time_slice(inputs, 0, L1), _time_slice(inputs, L1, L)
    y1, st1 = fn(**first, **kw, initial_state=init)
    y2, st2 = fn(**second, **kw, initial_state=st1)
    assert_same((torch.cat((y1, y2), dim=1), st2), full, 1e-10, f"{impl} handoff")

    # an all-zero initial state is the same as none
    zeros = Mamba3State.zeros(cfg.B, cfg.H, cfg.P, cfg.N, cfg.S, cfg.R, dtype=F64)
    assert_same(fn(**inputs, **kw, initial_state=zeros), fn(**inputs, **kw), 1e-14, "zeros")


@pytest.mark.parametrize("with_init", [False, True], ids=["fresh", "init"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_varlen_equals_separate_calls(impl: str, with_init: bool) -> None:
    fn, cfg = IMPLS[impl], CONFIGS["mimo4_grouped"]
    cu = torch.tensor([0, 5, 16, 24], dtype=torch.int32)  # lengths 5, 11, 8
    nseq = len(cu) - 1
    packed = make_inputs(cfg, int(cu[-1]), seed=30, batch=1)
    init = make_state(cfg, seed=40, batch=nseq) if with_init else None
    y, st = fn(**packed, pairing=cfg.pairing, initial_state=init, cu_seqlens=cu)
    assert y.shape == (1, int(cu[-1]), cfg.R, cfg.H, cfg.P)
    assert st.ssm.shape == (nseq, cfg.H, cfg.P, cfg.N)
    for i in range(nseq):
        start, end = int(cu[i]), int(cu[i + 1])
        init_i = None if init is None else Mamba3State(*(t[i : i + 1] for t in init))
        ref = fn(**_time_slice(packed, start, end), pairing=cfg.pairing, initial_state=init_i)
        got = (y[:, start:end], Mamba3State(*(t[i : i + 1] for t in st)))
        assert_same(got, ref, 1e-12, f"{impl} sequence {i}")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_varlen_empty_sequence_keeps_its_initial_state(impl: str) -> None:
    cfg = CONFIGS["siso"]
    inputs = make_inputs(cfg, 9, seed=50, batch=1)
    init = make_state(cfg, seed=51, batch=3)
    cu = torch.tensor([0, 4, 4, 9])
    y, st = IMPLS[impl](**inputs, pairing=cfg.pairing, initial_state=init, cu_seqlens=cu)
    assert y.shape[1] == 9
    for got, want in zip(st, init, strict=True):
        assert torch.equal(got[1], want[1])


# --------------------------------------------------------------------------------------------
# ablations


@pytest.mark.parametrize("impl", list(IMPLS))
def test_trap_none_is_exponential_euler(impl: str) -> None:
    """trap=None: h = exp(adt) h + dt * sum_r x_r (x) kbar_r (Mamba-2 style, beta = 0)."""
    cfg = CONFIGS["mimo2"]
    inputs = make_inputs(cfg, 12, seed=60)
    init = make_state(cfg, seed=61)
    ref = naive_scan(inputs, pairing=cfg.pairing, init=init, euler=True)
    inputs["trap"] = None
    out = IMPLS[impl](**inputs, pairing=cfg.pairing, initial_state=init)
    assert_same(out, ref, 1e-10, f"{impl} euler")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_no_angles_equals_zero_angles_and_no_rotation(impl: str) -> None:
    fn, cfg = IMPLS[impl], CONFIGS["siso_grouped"]
    inputs = make_inputs(cfg, 12, seed=70)
    init = make_state(cfg, seed=71)
    zero_angles = dict(inputs, angles=torch.zeros_like(inputs["angles"]))
    init_zero_angle = init._replace(angle=torch.zeros_like(init.angle))
    y0, st0 = fn(**zero_angles, pairing=cfg.pairing, initial_state=init_zero_angle)

    no_angles = dict(inputs, angles=None)
    y, st = fn(**no_angles, pairing=cfg.pairing, initial_state=init)
    assert rel_err(y, y0) <= 1e-12
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(st[1:], st0[1:], strict=True))
    assert torch.equal(st.angle, init.angle)  # passes through untouched

    assert_same((y, st), naive_scan(no_angles, pairing=cfg.pairing, init=init), 1e-10, impl)
    y_fresh, st_fresh = fn(**no_angles, pairing=cfg.pairing)
    assert st_fresh.angle.shape == (cfg.B, cfg.H, 0)
    assert rel_err(y_fresh, naive_scan(no_angles, pairing=cfg.pairing)[0]) <= 1e-10


@pytest.mark.parametrize("impl", list(IMPLS))
def test_optional_inputs_none(impl: str) -> None:
    """D, mimo_x, trap and angles all None at once, against the handwritten loop."""
    cfg = CONFIGS["mimo2"]
    inputs = make_inputs(cfg, 10, seed=75)
    inputs.update(D=None, mimo_x=None, trap=None, angles=None)
    out = IMPLS[impl](**inputs, pairing=cfg.pairing)
    assert_same(out, naive_scan(inputs, pairing=cfg.pairing), 1e-10, impl)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_pairings_differ_and_match_handwritten(impl: str) -> None:
    fn, cfg = IMPLS[impl], CONFIGS["mimo2"]  # S = 2 < N // 2: both pairings leave dims alone
    inputs = make_inputs(cfg, 10, seed=80)
    outs = {}
    for pairing in ("interleaved", "halves"):
        outs[pairing] = fn(**inputs, pairing=pairing)
        assert_same(outs[pairing], naive_scan(inputs, pairing=pairing), 1e-10, pairing)
    assert rel_err(outs["interleaved"][0], outs["halves"][0]) > 1e-3
    no_angles = dict(inputs, angles=None)
    y_i, _ = fn(**no_angles, pairing="interleaved")
    y_h, _ = fn(**no_angles, pairing="halves")
    assert torch.equal(y_i, y_h)


def test_expanded_angles_view() -> None:
    """Angles shared by all heads may arrive as a stride-0 view over H."""
    cfg = CONFIGS["siso"]
    inputs = make_inputs(cfg, 11, seed=85)
    shared = inputs["angles"][:, :, :1].expand(-1, -1, cfg.H, -1)
    ref = mamba3_scan_sequential(**dict(inputs, angles=shared.contiguous()))
    for fn in IMPLS.values():
        assert_same(fn(**dict(inputs, angles=shared)), ref, 1e-12, "expanded")


# --------------------------------------------------------------------------------------------
# gradients


def _flat_outputs(fn: ScanFn, names: list[str], pairing: str) -> Callable[..., tuple[Tensor, ...]]:
    """Wrap a scan as a function of positional tensors (inputs then the 4 state tensors)."""

    def run(*tensors: Tensor) -> tuple[Tensor, ...]:
        inputs = dict(zip(names, tensors[: len(names)], strict=True))
        init = Mamba3State(*tensors[len(names) :])
        y, st = fn(**inputs, pairing=pairing, initial_state=init)
        return (y, *st)

    return run


@pytest.mark.parametrize(
    ("impl", "R"),
    [("sequential", 1), ("sequential", 2), ("quadratic", 2), ("chunked", 2)],
)
def test_gradcheck(impl: str, R: int) -> None:
    cfg = Cfg(B=1, H=2, G=1, N=4, P=2, R=R, S=1, pairing="interleaved" if R == 1 else "halves")
    L = 4 if impl != "chunked" else 5
    fn = IMPLS[impl] if impl != "chunked" else partial(mamba3_scan_chunked, chunk_size=2)
    inputs = make_inputs(cfg, L, seed=90 + R, dt_max=0.1)
    init = make_state(cfg, seed=95)
    names = list(inputs)
    tensors = [t.clone().requires_grad_() for t in [*inputs.values(), *init]]
    assert torch.autograd.gradcheck(_flat_outputs(fn, names, cfg.pairing), tensors)


@pytest.mark.parametrize("impl", ["sequential", "chunked"])
def test_gradcheck_varlen(impl: str) -> None:
    """Gradients flow to every packed sequence and its own initial-state row."""
    cfg = Cfg(B=1, H=2, G=1, N=4, P=2, R=2, S=1, pairing="halves")
    fn = IMPLS[impl] if impl != "chunked" else partial(mamba3_scan_chunked, chunk_size=2)
    cu = torch.tensor([0, 2, 5])
    inputs = make_inputs(cfg, 5, seed=97, dt_max=0.1)
    init = make_state(cfg, seed=98, batch=2)
    names = list(inputs)
    tensors = [t.clone().requires_grad_() for t in [*inputs.values(), *init]]
    run = _flat_outputs(partial(fn, cu_seqlens=cu), names, cfg.pairing)
    assert torch.autograd.gradcheck(run, tensors)


def test_chunked_gradients_match_sequential() -> None:
    cfg = CONFIGS["mimo4_grouped"]
    L = 19
    inputs = make_inputs(cfg, L, seed=100)
    init = make_state(cfg, seed=101)
    names = list(inputs)
    g = _gen(102)
    leaves = [*inputs.values(), *init]
    grads = {}
    weights = None
    for impl, fn in (
        ("sequential", mamba3_scan_sequential),
        ("chunked", partial(mamba3_scan_chunked, chunk_size=4)),
    ):
        tensors = [t.clone().requires_grad_() for t in leaves]
        outs = _flat_outputs(fn, names, cfg.pairing)(*tensors)
        if weights is None:
            weights = [torch.randn(o.shape, generator=g, dtype=F64) for o in outs]
        loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
        grads[impl] = torch.autograd.grad(loss, tensors)
    labels = [*names, "init.angle", "init.ssm", "init.k", "init.v"]
    for label, a, b in zip(labels, grads["chunked"], grads["sequential"], strict=True):
        assert rel_err(a, b) <= 1e-10, label


# --------------------------------------------------------------------------------------------
# errors


def _bad(**changes: Any) -> Callable[[dict[str, Any], Cfg], dict[str, Any]]:
    def apply(kw: dict[str, Any], cfg: Cfg) -> dict[str, Any]:
        out = dict(kw)
        for name, make in changes.items():
            out[name] = make(kw, cfg)
        return out

    return apply


def _ones(*shape: int) -> Tensor:
    return torch.ones(*shape, dtype=F64)


ERROR_CASES = {
    "q_rank": (_bad(q=lambda kw, c: kw["q"][..., 0]), "q must have shape"),
    "k_mismatch": (_bad(k=lambda kw, c: kw["k"][:, :-1]), "k must have shape"),
    "v_batch": (_bad(v=lambda kw, c: kw["v"][:1]), "v must have shape"),
    "groups": (
        _bad(
            q=lambda kw, c: _ones(c.B, 12, c.R, 3, c.N),
            k=lambda kw, c: _ones(c.B, 12, c.R, 3, c.N),
        ),
        "multiple of ngroups",
    ),
    "adt": (_bad(adt=lambda kw, c: kw["adt"][..., :-1]), "adt must have shape"),
    "trap": (_bad(trap=lambda kw, c: kw["trap"][:, :-1]), "trap must have shape"),
    "bias": (_bad(k_bias=lambda kw, c: kw["k_bias"][:, :, :-1]), "k_bias must have shape"),
    "angles": (_bad(angles=lambda kw, c: kw["angles"][:, :, :1]), "angles must have shape"),
    "interleaved_S": (
        _bad(angles=lambda kw, c: _ones(c.B, 12, c.H, c.N // 2 + 1)),
        "interleaved pairing needs",
    ),
    "halves_S": (
        _bad(
            angles=lambda kw, c: _ones(c.B, 12, c.H, c.N // 2 + 1),
            pairing=lambda kw, c: "halves",
        ),
        "halves pairing needs",
    ),
    "pairing": (_bad(pairing=lambda kw, c: "rotary"), "pairing must be one of"),
    "D": (_bad(D=lambda kw, c: _ones(c.H + 1)), "D must have shape"),
    "mimo_x": (_bad(mimo_x=lambda kw, c: _ones(c.H, c.R + 1, c.P)), "mimo_x must have shape"),
    "varlen_batch": (
        _bad(cu_seqlens=lambda kw, c: torch.tensor([0, 5, 12])),
        "requires batch size 1",
    ),
    "init_shape": (
        _bad(initial_state=lambda kw, c: Mamba3State.zeros(c.B, c.H, c.P, c.N + 1, c.S, c.R)),
        "initial_state.ssm must have shape",
    ),
    "init_angle": (
        _bad(initial_state=lambda kw, c: Mamba3State.zeros(c.B, c.H, c.P, c.N, c.S + 1, c.R)),
        "initial_state.angle must have shape",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bad_shapes_raise(impl: str, case: str) -> None:
    cfg = CONFIGS["siso"]
    kw: dict[str, Any] = dict(make_inputs(cfg, 12, seed=0), pairing="interleaved")
    change, message = ERROR_CASES[case]
    with pytest.raises(ValueError, match=message):
        IMPLS[impl](**change(kw, cfg))


VARLEN_ERRORS = {
    "float": (torch.tensor([0.0, 5.0, 12.0]), None, "must be integer"),
    "end": (torch.tensor([0, 5, 11]), None, "end at L=12"),
    "decreasing": (torch.tensor([0, 7, 5, 12]), None, "non-decreasing"),
    "init_rows": (torch.tensor([0, 5, 12]), 3, "initial_state.angle must have shape"),
}


@pytest.mark.parametrize("case", list(VARLEN_ERRORS))
def test_bad_varlen_raises(case: str) -> None:
    cfg = CONFIGS["siso"]
    cu, init_rows, message = VARLEN_ERRORS[case]
    inputs = make_inputs(cfg, 12, seed=0, batch=1)
    init = None if init_rows is None else make_state(cfg, seed=1, batch=init_rows)
    for fn in IMPLS.values():
        with pytest.raises(ValueError, match=message):
            fn(**inputs, initial_state=init, cu_seqlens=cu)


def test_bad_chunk_size_raises() -> None:
    inputs = make_inputs(CONFIGS["siso"], 4, seed=0)
    with pytest.raises(ValueError, match="chunk_size"):
        mamba3_scan_chunked(**inputs, chunk_size=0)
