"""GPU fuzz of the Triton Mamba-3 scan against the float64 chunked path, and 64-bit offsets.

Each fuzz case is drawn from its seed (batch, length, heads, groups, sizes, rotation, trapezoid,
chunk, precision, packing, initial state, with or without backward; SISO, and from seed 1000 on
MIMO ranks 2 / 4 / 8 with the "halves" pairing), runs through the dispatch
point with ``backend="triton"`` and is compared with :func:`mamba3_scan_chunked` on float64
copies of the same inputs (itself checked against the sequential recurrence to 1e-10 in
``test_mamba3_reference.py``). A case that runs past :data:`CASE_SECONDS` (compilation
included) fails instead of hanging the suite. Every failure prints the case, which replays with
``pytest tests/test_kernel_fuzz_gpu.py -k "case-<seed>"``.

Run them all in one call, compilations spread over processes:
``python -m pytest -m gpu -n 14 --dist loadgroup tests`` (the 64-bit offset tests, ~45 GB
each, then run one after the other).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import pytest
import torch

from hybridkit.kernels.config import kernel_config
from hybridkit.kernels.mamba3.chunked import mamba3_scan_chunked
from hybridkit.kernels.mamba3.ops import mamba3_scan
from hybridkit.kernels.mamba3.state import Mamba3State
from tests.helpers import angle_err, rel_err
from tests.test_triton_siso import Case, _inputs, _state

N_CASES = 100
N_MIMO_CASES = 40  # seeds 1000.. (the SISO seeds and their draws stay as they were)
CASE_SECONDS = 240
CHUNKS = (16, 32, 64, 128)


@dataclass(frozen=True)
class FuzzCase:
    seed: int
    case: Case
    bf16: bool
    backward: bool

    def __str__(self) -> str:
        return f"case-{self.seed}: {asdict(self.case)} bf16={self.bf16} backward={self.backward}"


def _length(rng: random.Random, C: int) -> int:
    kind = rng.choice(["tiny", "odd", "chunk", "long"])
    if kind == "tiny":
        return rng.choice([1, 2, 3])
    if kind == "odd":
        return 2 * rng.randrange(2, 700) + 1
    if kind == "chunk":
        return max(1, C * rng.randrange(1, 20) + rng.choice([-1, 0, 1]))
    return rng.randrange(1000, 4000)


def _packing(rng: random.Random, L: int) -> tuple[int, ...]:
    """Boundaries of 1-4 packed sequences covering [0, L], empty ones allowed."""
    cuts = sorted(rng.randrange(0, L + 1) for _ in range(rng.randrange(0, 4)))
    return (0, *cuts, L)


def draw(seed: int) -> FuzzCase:
    rng = random.Random(seed)
    C = rng.choice(CHUNKS)
    L = _length(rng, C)
    H = rng.choice([1, 2, 4, 8])
    N = rng.choice([32, 64, 128])
    rope = rng.choice([0.0, 0.5, 1.0])  # 0: rotation off (a real-valued SSM)
    cu = _packing(rng, L) if rng.random() < 0.25 else None
    case = Case(
        B=1 if cu else rng.randrange(1, 4),
        L=L,
        H=H,
        G=rng.choice([1, H]),
        N=N,
        P=rng.choice([32, 64]),
        S=int(N * rope) // 2 if rope else 1,
        C=C,
        init=rng.random() < 0.4,
        cu=cu,
        trap=rng.random() < 0.75,
        angles=rope > 0,
        D=rng.random() < 0.8,
    )
    return FuzzCase(seed, case, bf16=rng.random() < 0.5, backward=rng.random() < 0.7)


def draw_mimo(seed: int) -> FuzzCase:
    """A MIMO case: rank 2 / 4 / 8, "halves" pairing, per-rank x scaling, chunk C with C x R
    rows among the kernels' heights (docs/mamba3.md 3.9); otherwise drawn like ``draw``."""
    rng = random.Random(seed)
    R = rng.choice([2, 4, 8])
    C = rng.choice([c // R for c in CHUNKS if c // R >= 2])
    fc = draw(seed)
    c = fc.case
    L = _length(rng, C)
    cu = _packing(rng, L) if c.cu else None
    case = replace(c, R=R, C=C, L=L, cu=cu, B=1 if cu else c.B, halves=True)
    if case.angles:  # halves pairing rotates at most N/2 pairs
        case = replace(case, S=min(case.S, case.N // 2))
    return replace(fc, case=case)


CASES = [draw(seed) for seed in range(N_CASES)]
CASES += [draw_mimo(seed) for seed in range(1000, 1000 + N_MIMO_CASES)]


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise TimeoutError in the test if it is still running after ``seconds`` (main thread:
    SIGALRM also interrupts a wait on the compiler's ptxas process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{what} still running after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _run(fc: FuzzCase) -> dict[str, float]:
    c = fc.case
    dtype = torch.bfloat16 if fc.bf16 else torch.float32
    inp = _inputs(c, dtype, "cuda", fc.seed)
    st = _state(c, "cuda", fc.seed + 1, dtype)
    cu = torch.tensor(c.cu, device="cuda") if c.cu else None
    leaves = {k: v.clone().requires_grad_(fc.backward) for k, v in inp.items() if v is not None}
    init = [t.clone().requires_grad_(fc.backward) for t in st] if st is not None else None
    torch.full((64 << 20,), float("nan"), device="cuda")  # poison what the outputs will reuse
    with torch.set_grad_enabled(fc.backward):
        y, fs = mamba3_scan(
            **{k: leaves.get(k) for k in inp},
            initial_state=Mamba3State(*init) if init else None,
            cu_seqlens=cu,
            chunk_size=c.C,
            backend="triton",
            pairing=c.pairing,
        )
    ref_leaves = {k: v.detach().double().requires_grad_(fc.backward) for k, v in leaves.items()}
    ref_init = [t.detach().double().requires_grad_(fc.backward) for t in init] if init else None
    with torch.set_grad_enabled(fc.backward):
        yr, fr = mamba3_scan_chunked(
            **{k: ref_leaves.get(k) for k in inp},
            initial_state=Mamba3State(*ref_init) if ref_init else None,
            cu_seqlens=cu,
            chunk_size=16,
            pairing=c.pairing,
        )
    assert torch.isfinite(y).all(), "non-finite output"
    errs = {"y": rel_err(y, yr), "angle": angle_err(fs.angle, fr.angle)}
    errs |= {n: rel_err(getattr(fs, n), getattr(fr, n)) for n in ("ssm", "k", "v")}
    if fc.backward:
        g = torch.Generator(device="cuda").manual_seed(fc.seed + 2)
        wy = torch.randn(y.shape, generator=g, device="cuda", dtype=torch.float64)
        ws = [torch.randn(t.shape, generator=g, device="cuda", dtype=torch.float64) for t in fs]

        def loss(out, state):
            terms = [(a.double() * w).sum() for a, w in zip(state, ws, strict=True)]
            return (out.double() * wy).sum() + sum(terms)

        loss(y, fs).backward()
        loss(yr, fr).backward()
        errs |= {f"d{k}": rel_err(leaves[k].grad, ref_leaves[k].grad) for k in leaves}
        if "D" in leaves:
            # dD_h = sum over every token and channel of dy * x: with few heads a random
            # cotangent makes that sum cancel, so measure its error against the sum of the
            # magnitudes (the bound for rounded terms), not against the cancelled total
            x = ref_leaves["v"].detach()[:, :, None]  # (B, L, 1, H, P), times psi for MIMO
            if "mimo_x" in ref_leaves:
                x = x * ref_leaves["mimo_x"].detach().transpose(0, 1)  # (R, H, P)
            scale = (wy * x).abs().sum((0, 1, 2, 4))
            errs["dD"] = (
                (leaves["D"].grad.double() - ref_leaves["D"].grad).norm() / scale.norm()
            ).item()
        if init:
            for name, a, b in zip(Mamba3State._fields, init, ref_init, strict=True):
                errs[f"dinit.{name}"] = rel_err(a.grad, b.grad)
    return errs


def _limits(fc: FuzzCase) -> tuple[float, float, dict[str, float]]:
    if not fc.bf16:
        return 1e-4, 1e-4, {}
    # bf16 operands: ~4e-3 typical; the angle gradients are differences of large rotated
    # products (see test_triton_siso's GPU grid); short sequences have few terms to average
    return 2e-2, 5e-2, {"ddt": 1.5e-1, "dangles": 1.5e-1, "dinit.angle": 1.5e-1}


@pytest.mark.gpu
@pytest.mark.parametrize("fc", CASES, ids=[f"case-{c.seed}" for c in CASES])
def test_fuzz_triton_matches_chunked(fc: FuzzCase):
    start = time.perf_counter()
    try:
        with kernel_config(autotune=False), time_limit(CASE_SECONDS, str(fc)):
            errs = _run(fc)
    except Exception as err:
        pytest.fail(f"{fc}\n{type(err).__name__}: {err}")
    finally:
        torch.cuda.empty_cache()  # leave the memory to the 64-bit offset tests in parallel
    tol_f, tol_b, loose = _limits(fc)
    bad = {
        k: e
        for k, e in errs.items()
        if not e <= (loose.get(k, tol_b) if k.startswith("d") else tol_f)
    }
    seconds = time.perf_counter() - start
    print(f"\n{fc.seed} {seconds:.1f}s " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    assert not bad, f"{fc}\nerrors over tolerance: {bad}\nall: {errs}"


def test_fuzz_draws_cover_the_space():
    """The seeded draws cover what the fuzz promises (checked on any machine)."""
    cs = [fc.case for fc in CASES]
    assert {1, 2, 3} <= {c.L for c in cs} and any(c.L % 2 and c.L > 3 for c in cs)
    assert any(c.L % c.C in (1, c.C - 1) and c.L > c.C for c in cs)
    assert {c.C * c.R for c in cs} == set(CHUNKS) and {c.B for c in cs} == {1, 2, 3}
    assert {c.R for c in cs} == {1, 2, 4, 8} and all(c.halves for c in cs if c.R > 1)
    assert any(c.G == c.H > 1 for c in cs) and any(c.G == 1 < c.H for c in cs)
    assert {c.S * 2 / c.N for c in cs if c.angles} == {0.5, 1.0} and any(not c.angles for c in cs)
    assert any(not c.trap for c in cs) and any(c.init for c in cs) and any(c.cu for c in cs)
    assert {fc.bf16 for fc in CASES} == {True, False}
    assert {fc.backward for fc in CASES} == {True, False}
    assert max(c.L for c in cs) >= 3000 and len(CASES) >= 100 + 40


def test_time_limit_interrupts_a_stall():
    with pytest.raises(TimeoutError, match="stall still running"), time_limit(0.2, "stall"):
        time.sleep(5)


# ----------------------------------------------------------------------------- 64-bit offsets


def _twin_inputs(L: int, H: int, P: int, N: int, packed: bool) -> dict:
    """One random sequence of L tokens, twice: as batch rows 0 and 1, or packed end to end."""
    g = torch.Generator(device="cuda").manual_seed(0)
    S = N // 4

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device="cuda") * scale

    dt = torch.rand(1, H, L, generator=g, device="cuda") * 0.1 + 1e-3
    one = {
        "q": rand(1, L, 1, 1, N).bfloat16(),
        "k": rand(1, L, 1, 1, N).bfloat16(),
        "v": rand(1, L, H, P).bfloat16(),
        "adt": -dt * (torch.rand(1, H, L, generator=g, device="cuda") + 0.5),
        "dt": dt,
        "trap": rand(1, H, L).bfloat16(),
        "angles": rand(1, L, H, S).bfloat16(),
    }
    axis = {"q": 1, "k": 1, "v": 1, "angles": 1, "adt": 2, "dt": 2, "trap": 2}
    twin = {k: torch.cat([t, t], dim=axis[k] if packed else 0) for k, t in one.items()}
    twin |= {"q_bias": rand(H, 1, N), "k_bias": rand(H, 1, N), "D": rand(H)}
    return twin


def _halves(t: torch.Tensor, packed: bool, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not packed:
        return t[0], t[1]
    return t.chunk(2, dim=axis)


@pytest.mark.gpu
@pytest.mark.xdist_group("past_int32")  # ~45 GB each: one at a time (``--dist loadgroup``)
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "varlen"])
def test_offsets_past_int32(packed: bool):
    """Two identical sequences whose tensors pass 2^31 elements (B * L * H * P): identical,
    finite halves of the output and of every per-token gradient."""
    L, H, P, N = 600_000, 32, 64, 64
    assert 2 * L * H * P > 2**31 and 2 * L > 2**31 // (H * P)
    x = _twin_inputs(L, H, P, N, packed)
    leaves = {k: v.requires_grad_() for k, v in x.items()}
    cu = torch.tensor([0, L, 2 * L], device="cuda") if packed else None
    y, _ = mamba3_scan(**leaves, cu_seqlens=cu, chunk_size=64, backend="triton", return_state=False)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    a, b = _halves(y, packed, 1)
    assert torch.equal(a, b)
    dy = torch.randn(a.shape, device="cuda", dtype=y.dtype)
    y.backward(torch.cat([dy, dy], dim=1) if packed else torch.stack([dy, dy]))
    axis = {"q": 1, "k": 1, "v": 1, "angles": 1, "adt": 2, "dt": 2, "trap": 2}
    for name, ax in axis.items():
        grad = leaves[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name
        ga, gb = _halves(grad, packed, ax)
        assert torch.equal(ga, gb), f"d{name}: halves differ by {(ga - gb).abs().max().item()}"
