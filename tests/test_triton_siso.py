"""Triton Mamba-3 SISO scan (forward + backward) against the float64 references.

CPU CI runs the unmarked tests under ``TRITON_INTERPRET=1`` at tiny shapes (set here when no
GPU is present, before Triton is imported); ``pytest -m gpu`` runs the same checks at real
shapes, in the precise fp32 mode (~1e-5) and the fast bf16 mode (~1e-2), plus
``torch.compile(fullgraph=True)`` at two lengths. Every check uses fresh random inputs (never
zeros) and compares the output, every final-state tensor and every gradient (all inputs and the
initial state) by relative norm error; angles modulo 2 pi.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

if not torch.cuda.is_available():  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridkit.errors import HybridkitError  # noqa: E402
from hybridkit.kernels.mamba3 import ops  # noqa: E402
from hybridkit.kernels.mamba3.chunked import mamba3_scan_chunked  # noqa: E402
from hybridkit.kernels.mamba3.chunkscan import mamba3_scan_triton  # noqa: E402
from hybridkit.kernels.mamba3.reference import mamba3_scan_sequential  # noqa: E402
from hybridkit.kernels.mamba3.state import Mamba3State  # noqa: E402
from tests.helpers import angle_err, rel_err, slow_params  # noqa: E402

F64 = torch.float64


@dataclass(frozen=True)
class Case:
    B: int = 2
    L: int = 37
    H: int = 2
    G: int = 1
    N: int = 16
    P: int = 16
    S: int = 3
    C: int = 16
    init: bool = False
    cu: tuple[int, ...] | None = None
    trap: bool = True
    angles: bool = True
    D: bool = True
    R: int = 1  # MIMO rank (tests/test_triton_mimo.py)
    halves: bool = False  # "halves" rotary pairing (MIMO's)

    @property
    def pairing(self) -> str:
        return "halves" if self.halves else "interleaved"


def _inputs(c: Case, dtype: torch.dtype, device: str, seed: int) -> dict[str, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    B = 1 if c.cu else c.B

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    def unit(t):
        return t / t.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()

    dt = torch.exp(
        torch.empty(B, c.H, c.L, dtype=F64).uniform_(math.log(1e-3), math.log(0.5), generator=g)
    )
    inp = {
        "q": unit(randn(B, c.L, c.R, c.G, c.N)).to(dtype),
        "k": unit(randn(B, c.L, c.R, c.G, c.N)).to(dtype),
        "v": randn(B, c.L, c.H, c.P).to(dtype),
        "adt": (-torch.empty(B, c.H, c.L, dtype=F64).uniform_(0.5, 4.0, generator=g) * dt).float(),
        "dt": dt.float(),
        "trap": randn(B, c.H, c.L).to(dtype) if c.trap else None,
        "q_bias": randn(c.H, c.R, c.N).float(),
        "k_bias": randn(c.H, c.R, c.N).float(),
        "angles": randn(B, c.L, c.H, c.S).to(dtype) if c.angles else None,
        "D": randn(c.H).float() if c.D else None,
    }
    if c.R > 1:
        inp["mimo_x"] = (1.0 + 0.5 * randn(c.H, c.R, c.P)).float()
    return {k: (v.to(device) if v is not None else None) for k, v in inp.items()}


def _state(c: Case, device: str, seed: int, dtype: torch.dtype) -> Mamba3State | None:
    if not c.init:
        return None
    g = torch.Generator().manual_seed(seed)
    n = len(c.cu) - 1 if c.cu else c.B
    st = Mamba3State(
        torch.empty(n, c.H, c.S, dtype=F64).uniform_(2.0, 4.0, generator=g).float(),
        torch.randn(n, c.H, c.P, c.N, generator=g, dtype=F64).float(),
        torch.randn(n, c.R, c.H, c.N, generator=g, dtype=F64).to(dtype),
        torch.randn(n, c.H, c.P, generator=g, dtype=F64).to(dtype),
    )
    return Mamba3State(*(t.to(device) for t in st))


def check(
    c: Case,
    dtype: torch.dtype,
    device: str,
    fast: bool,
    tol_f: float,
    tol_b: float,
    seed: int = 0,
    reference=mamba3_scan_sequential,
    loose: dict[str, float] | None = None,
) -> dict[str, float]:
    """Forward, final state and every gradient against ``reference`` in float64."""
    inp = _inputs(c, dtype, device, seed)
    st = _state(c, device, seed + 1, dtype)
    cu = torch.tensor(c.cu, device=device) if c.cu else None
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items() if v is not None}
    sl = [t.clone().requires_grad_() for t in st] if st is not None else None
    y, fs = mamba3_scan_triton(
        **{k: leaves.get(k) for k in inp},
        initial_state=Mamba3State(*sl) if sl else None,
        cu_seqlens=cu,
        chunk_size=c.C,
        fast=fast,
        pairing=c.pairing,
    )
    g = torch.Generator().manual_seed(seed + 7)
    wy = torch.randn(y.shape, generator=g, dtype=F64).to(device)
    ws = [torch.randn(t.shape, generator=g, dtype=F64).to(device) for t in fs]
    assert torch.isfinite(y).all()
    loss = (y.double() * wy).sum() + sum(
        (a.double() * b).sum() for a, b in zip(fs, ws, strict=True)
    )
    loss.backward()

    l64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    s64 = [t.detach().double().requires_grad_() for t in sl] if sl else None
    args = {k: l64.get(k) for k in inp}
    yr, fr = reference(
        **args,
        initial_state=Mamba3State(*s64) if s64 else None,
        cu_seqlens=cu,
        pairing=c.pairing,
    )
    lr = (yr * wy).sum() + sum((a * b).sum() for a, b in zip(fr, ws, strict=True))
    lr.backward()

    errs = {"y": rel_err(y, yr), "angle": angle_err(fs.angle, fr.angle)}
    for name in ("ssm", "k", "v"):
        a, b = getattr(fs, name), getattr(fr, name)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        errs[name] = rel_err(a, b)
    bad = {k: e for k, e in errs.items() if not e <= tol_f}
    gerrs = {f"d{k}": rel_err(leaves[k].grad, l64[k].grad) for k in leaves}
    if sl:
        for name, a, b in zip(Mamba3State._fields, sl, s64, strict=True):
            gerrs[f"dinit.{name}"] = rel_err(a.grad, b.grad)
    loose = loose or {}
    bad.update({k: e for k, e in gerrs.items() if not e <= loose.get(k, tol_b)})
    assert not bad, f"{c} errors above {tol_f}/{tol_b}: {bad} (all: {errs | gerrs})"
    return errs | gerrs


def check_gpu_case(c: Case, prec: str) -> dict[str, float]:
    """A GPU grid case (``prec`` "fp32" or "bf16") against the float64 reference (chunked, or
    sequential at length 1), the caching allocator poisoned with NaN first. bf16 operands:
    ~4e-3 on outputs and most gradients; the angle gradients (dangles and what depends on
    them: ddt, dinit.angle) are differences of large rotated products and land at 1e-2..5e-2
    (the official SISO tests allow 1e-1 on gradients)."""
    torch.full((64 << 20,), float("nan"), device="cuda")
    ref = mamba3_scan_chunked if c.L > 1 else mamba3_scan_sequential
    if prec == "fp32":
        return check(c, torch.float32, "cuda", fast=False, tol_f=1e-5, tol_b=1e-5, reference=ref)
    return check(
        c, torch.bfloat16, "cuda", fast=True, tol_f=1e-2, tol_b=2e-2, reference=ref,
        loose={"dangles": 8e-2, "ddt": 4e-2, "dinit.angle": 4e-2},
    )  # fmt: skip


# ----------------------------------------------------------------------------- CPU (interpreter)

CPU_CASES = {
    "basic": Case(),
    "init_split_grouped": Case(H=4, G=2, init=True),
    "len1_init": Case(L=1, init=True),
    "varlen_init_split": Case(B=1, L=40, H=4, G=2, init=True, cu=(0, 5, 5, 22, 40)),
    "euler_norotation_noD": Case(L=20, trap=False, angles=False, D=False, init=True),
    "n32_p32_c32": Case(B=1, L=40, N=32, P=32, S=8, C=32),
    "varlen_empty_first_and_last": Case(B=1, L=20, H=2, init=True, cu=(0, 0, 7, 20, 20)),
    # every pair rotates (rope_fraction 1): the angle tiles are N/2 wide, nothing is widened
    "full_rotation_init": Case(S=8, init=True),
    # more than half of the pairs rotate: still N/2-wide angle tiles, masked past S
    "rotation_above_half": Case(S=5),
}


@pytest.mark.triton
@pytest.mark.parametrize(
    "name", slow_params(CPU_CASES, {"init_split_grouped", "varlen_init_split"})
)
def test_triton_siso_matches_reference_cpu(name: str):
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU runs the gpu-marked grid")
    check(CPU_CASES[name], torch.float32, "cpu", fast=False, tol_f=1e-5, tol_b=1e-5)


@pytest.mark.parametrize("init", [False, True])
def test_empty_input_returns_initial_state(init: bool):
    """L = 0: an empty output and the initial state (or zeros) back unchanged."""
    c = Case(B=2, L=0, init=init)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = _inputs(c, torch.float32, dev, 0)
    st = _state(c, dev, 1, torch.float32)
    y, fs = mamba3_scan_triton(**inp, initial_state=st, chunk_size=16, fast=False)
    expect = st if st is not None else Mamba3State.zeros(2, c.H, c.P, c.N, c.S, device=dev)
    assert y.shape == (2, 0, 1, c.H, c.P)
    for a, b in zip(fs, expect, strict=True):
        assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["triton", "chunked", "reference"])
def test_return_state_false_skips_the_state(backend: str):
    """``return_state=False`` (what training layers pass): same output and gradients, no state."""
    c = Case(L=20, H=2)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = _inputs(c, torch.float32, dev, 4)
    grads = []
    for rs in (True, False):
        leaves = {k: v.clone().requires_grad_() for k, v in inp.items() if v is not None}
        y, st = ops.mamba3_scan(**leaves, chunk_size=16, backend=backend, return_state=rs)
        assert (st is None) == (not rs)
        y.pow(2).sum().backward()
        grads.append([y.detach()] + [t.grad for t in leaves.values()])
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < 1e-6


@pytest.mark.triton
def test_state_only_loss_matches_the_reference():
    """Only the final state feeds the loss (y unused): the backward gets no output gradient
    (autograd does not materialize zeros for it) and must still match the reference."""
    c = Case(L=20, H=2, init=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = _inputs(c, torch.float32, dev, 6)
    grads = []
    for scan in (mamba3_scan_triton, mamba3_scan_sequential):
        leaves = {k: v.clone().requires_grad_() for k, v in inp.items() if v is not None}
        kw = dict(chunk_size=16, fast=False) if scan is mamba3_scan_triton else {}
        _, st = scan(**leaves, initial_state=_state(c, dev, 1, torch.float32), **kw)
        (st.ssm.pow(2).sum() + st.k.sum()).backward()
        # q and D do not reach the state: the reference leaves their .grad None
        grads.append([torch.zeros_like(t) if t.grad is None else t.grad for t in leaves.values()])
    names = [k for k, v in inp.items() if v is not None]
    for name, a, b in zip(names, *grads, strict=True):
        assert rel_err(a, b) < 1e-5 if b.abs().max() > 0 else a.abs().max() < 1e-6, name


def test_tuner_times_each_candidate_once_per_key(monkeypatch):
    """The tuned kernels' launch choice: every candidate (warps, optional register cap) timed
    on the first launch of a key (flags + tensor dtypes), the fastest kept, later launches of
    that key not timed again; with autotune off the default runs untimed."""
    from hybridkit.kernels import config
    from hybridkit.kernels.mamba3.chunkscan import launch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # real launch options, not 1 warp
    launches, timed = [], []

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, **kw):
                assert kw["num_stages"] == 1
                launches.append((grid, kw["num_warps"], kw.get("maxnreg"), kw["C"]))

            return run

    cost = {(4, None): 2.0, (4, 168): 1.0, (8, None): 1.5, (16, None): 3.0}

    def timer(fn):
        fn()
        timed.append(launches[-1][1:3])
        return cost[launches[-1][1:3]]

    monkeypatch.setattr(launch, "_median_ms", timer)
    tuned = launch.TunedKernel(FakeKernel(), ["C"], (4, (4, 168), 8, 16), default=8)
    x = torch.zeros(2)
    with config.kernel_config(autotune=True):
        for _ in range(3):
            tuned[(5,)](x, 7, C=64)
        assert timed == list(cost)
        assert launches[4:] == [((5,), 4, 168, 64)] * 3  # the fastest, once per call after tuning
        tuned[(5,)](x.double(), 7, C=64)  # another dtype: a new key, timed again
        tuned[(5,)](x, 7, C=32)  # another flag value: a new key
    assert timed == list(cost) * 3
    assert len(tuned.best) == 3
    with config.kernel_config(autotune=False):
        tuned[(5,)](x, 7, C=16)
    assert timed == list(cost) * 3 and launches[-1] == ((5,), 8, None, 16)


def test_launch_candidates_may_set_pipeline_stages(monkeypatch):
    """A candidate is warps, (warps, register cap) or (warps, cap, stages); without stages a
    launch gets 1 (the chunk kernels have no loop to pipeline)."""
    from hybridkit.kernels.mamba3.chunkscan import launch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert launch.launch_options(4, None, 2) == {"num_warps": 4, "num_stages": 2}
    assert launch.launch_options(8, 168) == {"num_warps": 8, "num_stages": 1, "maxnreg": 168}
    assert launch._as_triple(8) == (8, None, 1)
    assert launch._as_triple((4, 168)) == (4, 168, 1)
    assert launch._as_triple((4, None, 3)) == (4, None, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch.launch_options(8, 168, 3) == {"num_warps": 1, "num_stages": 1}


def test_tuner_skips_candidates_that_do_not_compile(monkeypatch):
    """A candidate the compiler rejects (out of shared memory for its stages, say) is skipped
    and the others are timed; when none compiles the error says so."""
    from triton.runtime.errors import OutOfResources

    from hybridkit.kernels import config
    from hybridkit.kernels.mamba3.chunkscan import launch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    class FakeKernel:
        def __init__(self, bad):
            self.bad = bad

        def __getitem__(self, grid):
            def run(*args, **kw):
                if kw["num_stages"] in self.bad:
                    raise OutOfResources(300000, 232448, "shared memory")

            return run

    monkeypatch.setattr(launch, "_median_ms", lambda fn: fn() or 1.0)
    with config.kernel_config(autotune=True):
        tuned = launch.TunedKernel(FakeKernel({3}), ["C"], (4, (4, None, 3)), default=4)
        tuned[(1,)](torch.zeros(1), C=16)
        assert list(tuned.best.values()) == [{"num_warps": 4, "num_stages": 1}]
        broken = launch.TunedKernel(FakeKernel({1, 3}), ["C"], (4, (4, None, 3)), default=4)
        with pytest.raises(RuntimeError, match="no launch candidate compiled"):
            broken[(1,)](torch.zeros(1), C=16)


def test_kernel_config_from_code_and_environment(monkeypatch):
    """One configuration: the variable is read at launch time (not import), bad values name
    the variable, the key and what it accepts; ``kernel_config`` overrides it in a block."""
    from hybridkit.kernels import config

    monkeypatch.setenv(config.ENV_VAR, "autotune=0,bwd_warps=8,bwd_maxnreg=168,chunk_sizes=32:64")
    cfg = config.current_config()
    assert (cfg.autotune, cfg.bwd_warps, cfg.bwd_maxnreg, cfg.chunk_sizes) == (
        False,
        8,
        168,
        (32, 64),
    )
    with config.kernel_config(bwd_warps=4) as inner:
        assert config.current_config() is inner and inner.bwd_warps == 4 and not inner.autotune
    assert config.current_config().bwd_warps == 8
    monkeypatch.setenv(config.ENV_VAR, "step_warps=16,step_maxnreg=80,fa4_decode=1,step_split=2")
    assert config.step_launch() == (16, 80, 2) and config.fa4_decode_enabled()
    monkeypatch.setenv(config.ENV_VAR, "norm_linear=0")
    assert not config.norm_linear_enabled()
    assert config.changed_settings() == "norm_linear=0"
    monkeypatch.setenv(config.ENV_VAR, "")
    assert config.current_config() == config.KernelConfig()
    assert config.step_launch() == (0, 0, 4) and not config.fa4_decode_enabled()
    assert config.norm_linear_enabled() and config.changed_settings() == "defaults"
    for bad, match in (
        ("bwd_warps=3", r"HYBRIDKIT_KERNELS=.*bwd_warps=3: allowed \(1, 2, 4, 8, 16\)"),
        ("bwd_maxnreg=300", r"HYBRIDKIT_KERNELS=.*24\.\.255"),
        ("step_warps=3", r"HYBRIDKIT_KERNELS=.*step_warps=3: allowed None or \(1, 2, 4"),
        ("step_maxnreg=8", r"HYBRIDKIT_KERNELS=.*step_maxnreg=8: allowed None or 24\.\.255"),
        ("step_split=3", r"HYBRIDKIT_KERNELS=.*step_split=3: allowed \(1, 2, 4, 8\)"),
        ("skinny_rows=17", r"HYBRIDKIT_KERNELS=.*skinny_rows=17: allowed 1\.\.16"),
        ("norm_linear=17", r"HYBRIDKIT_KERNELS=.*norm_linear=17: allowed 0\.\.16"),
        ("norm_linear=true", r"HYBRIDKIT_KERNELS=.*norm_linear: 'true': expected a whole"),
        ("chunk_sizes=48", r"HYBRIDKIT_KERNELS=.*subset of \(16, 32, 64, 128\)"),
        ("autotune=maybe", r"HYBRIDKIT_KERNELS=.*autotune: 'maybe': allowed 0, 1"),
        ("fa4_decode=2", r"HYBRIDKIT_KERNELS=.*fa4_decode: '2': allowed 0, 1"),
        ("warps=8", r"HYBRIDKIT_KERNELS=.*'warps=8'.*autotune, bwd_maxnreg"),
        ("bwd_x_warps=6", r"HYBRIDKIT_KERNELS=.*bwd_x_warps=6: allowed None or \(1, 2, 4"),
        ("qk_heads=3", r"HYBRIDKIT_KERNELS=.*qk_heads=3: allowed \(1, 2, 4, 8, 16, 32, 64\)"),
        # the last of two silently won; the dispatch takes the last size as the tallest
        ("bwd_warps=4,bwd_warps=8", r"HYBRIDKIT_KERNELS=.*bwd_warps is given twice"),
        ("chunk_sizes=64:16", r"HYBRIDKIT_KERNELS=.*ascending order \(e\.g\. 16:64\)"),
        ("chunk_sizes=32:32", r"HYBRIDKIT_KERNELS=.*list each size once"),
        # digits of other scripts ('٨' was read as 8), superscripts, huge numbers
        ("bwd_warps=\u0668", r"HYBRIDKIT_KERNELS=.*bwd_warps: '\u0668': expected a whole"),
        ("bwd_warps=\u00b2", r"HYBRIDKIT_KERNELS=.*bwd_warps: '\u00b2': expected a whole"),
        ("bwd_warps=" + "9" * 5000, r"HYBRIDKIT_KERNELS=.*bwd_warps: '9+': expected a whole"),
    ):
        monkeypatch.setenv(config.ENV_VAR, bad)
        with pytest.raises(ValueError, match=match):
            config.current_config()


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(step_split=4.0), r"step_split=4\.0: expected an int$"),  # passed as 4.0 == 4
        (dict(pdl="0"), r"pdl='0': expected True or False"),  # a truthy string
        (dict(autotune=1), r"autotune=1: expected True or False"),
        (dict(step_warps=True), r"step_warps=True: expected an int or None"),
        (dict(bwd_warps=None), r"bwd_warps=None: expected an int$"),
        (dict(chunk_sizes=[16, 64]), r"chunk_sizes=\[16, 64\]: expected a tuple of ints"),
        (dict(chunk_sizes=(16.0, 64)), r"expected a tuple of ints"),
    ],
)
def test_kernel_config_in_code_checks_each_value_kind(changes, match):
    """``kernel_config(...)`` from Python gets the checks ``HYBRIDKIT_KERNELS`` gets (the
    variable's parser only ever builds ints, bools and int tuples)."""
    from hybridkit.kernels import config

    with pytest.raises(ValueError, match=match), config.kernel_config(**changes):
        pass
    with config.kernel_config(step_maxnreg=None, step_split=2, pdl=True) as cfg:
        assert cfg.step_split == 2 and cfg.pdl


def test_backward_x_kernel_may_have_its_own_warps(monkeypatch):
    """``bwd_x_warps`` sets the x kernel's warps alone; unset, every backward chunk kernel
    runs ``bwd_warps``; ``bwd_maxnreg`` caps all three."""
    from hybridkit.kernels import config
    from hybridkit.kernels.mamba3.chunkscan.launch import backward_chunk_options

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(config.ENV_VAR, "bwd_x_warps=8")
    assert backward_chunk_options("qk") == dict(num_warps=4, num_stages=1)
    assert backward_chunk_options("x") == dict(num_warps=8, num_stages=1)
    monkeypatch.setenv(config.ENV_VAR, "bwd_warps=8,bwd_x_warps=none,bwd_maxnreg=200")
    assert backward_chunk_options("x") == dict(num_warps=8, num_stages=1, maxnreg=200)
    assert backward_chunk_options("qk") == dict(num_warps=8, num_stages=1, maxnreg=200)
    with pytest.raises(ValueError, match="'q': allowed 'qk' or 'x'"):
        backward_chunk_options("q")


@pytest.mark.triton
def test_each_backward_chunk_kernel_launches_with_its_own_options(monkeypatch):
    """What the launch passes each kernel: the x kernel its own warps (``bwd_x_warps``; from
    2026-12-04 to 12-06 it silently got ``bwd_warps``). The forward runs (interpreter) under
    the settings; the backward's launches are recorded."""
    from hybridkit.kernels import config
    from hybridkit.kernels.mamba3.chunkscan import launch
    from hybridkit.kernels.mamba3.chunkscan import op as scan_op

    seen: dict[str, tuple] = {}

    class Kernels:  # the backward module's kernels, by attribute
        def __getattr__(self, name):
            return Launcher(name)

    class Launcher:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch_with(*args, **kw):
                seen[self.name] = (kw.get("num_warps"), kw.get("maxnreg"))

            return launch_with

    leaves = {
        k: v.requires_grad_()
        for k, v in _inputs(Case(L=20, H=2), torch.float32, "cpu", 3).items()
        if v is not None
    }
    with config.kernel_config(bwd_warps=2, bwd_x_warps=8, bwd_maxnreg=200):
        out = ops.mamba3_scan(**leaves, chunk_size=16, backend="triton")[0]
    monkeypatch.setattr(scan_op, "K_bwd", Kernels())
    monkeypatch.setattr(scan_op, "BWD_DSTATE", Launcher("_bwd_dstate_kernel"))
    monkeypatch.setattr(launch, "interpreting", lambda: False)  # real warp counts
    out.sum().backward()
    assert seen["_bwd_x_kernel"] == (8, 200)
    assert seen["_bwd_q_kernel"] == seen["_bwd_k_kernel"] == (2, 200)


@pytest.mark.triton
def test_triton_chunk_narrows_what_is_not_validated():
    """fp32 (precise) kernels keep C x max(N, P) <= 4096, bf16 ones <= 8192 (and C <= 32 when
    P < N / 2); the dispatch point reports the narrower chunk; the result does not depend on
    it."""
    from hybridkit.kernels.config import triton_chunk

    assert triton_chunk(128, 128, 32, fast=False) == 32  # the configuration that stalled
    assert triton_chunk(64, 64, 64, fast=False) == 64
    assert triton_chunk(128, 64, 64, fast=True) == 128
    assert triton_chunk(128, 128, 64, fast=True) == 64  # not validated at C 128
    assert triton_chunk(16, 512, 64, fast=False) == 16  # never below the smallest chunk
    assert triton_chunk(64, 128, 32, fast=True) == 32  # wrong outputs at C 64 (GPU fuzz)
    assert triton_chunk(64, 64, 32, fast=True) == 64
    plan = ops.plan_scan(
        "auto", device="cuda", dtype=torch.float32, length=5, rank=1, d_state=128, headdim=32,
        chunk_size=128,
    )  # fmt: skip
    assert plan == ops.ScanPlan("triton", 32, "chunk 32") and plan.describe() == "triton (chunk 32)"


@pytest.mark.triton
def test_dispatch_rules(monkeypatch):
    def plan(
        device="cuda", length=64, rank=1, dtype=torch.bfloat16, chunk=64, n=128, backend="auto"
    ):
        return ops.plan_scan(
            backend, device=device, dtype=dtype, length=length, rank=rank, d_state=n,
            headdim=64, chunk_size=chunk,
        ).backend  # fmt: skip

    assert plan() == "triton"
    assert plan(length=1) == "reference"
    assert plan(rank=3) == "chunked"  # MIMO ranks 2 / 4 / 8 have kernels (test_triton_mimo)
    assert plan(device="cpu") == "chunked"
    assert plan(dtype=torch.float64) == "chunked"
    assert plan(chunk=256) == "chunked"
    assert plan(n=48) == "chunked"
    assert ops.plan_scan(
        "auto", device="cuda", dtype=torch.bfloat16, length=9, rank=1, d_state=128,
        headdim=16, chunk_size=64,
    ).reason.startswith("d_state 128 / headdim 16")  # fmt: skip
    assert plan(device="cpu", backend="triton") == "triton"  # the interpreter runs it
    with monkeypatch.context() as env:  # no interpreter: a clear error, not Triton's
        env.setenv("TRITON_INTERPRET", "0")  # "0 active drivers" from the first launch
        with pytest.raises(HybridkitError, match="'triton' runs on a CUDA device.*not on cpu"):
            plan(device="cpu", backend="triton")
        assert plan(device="cuda", backend="triton") == "triton"
        assert plan(device="meta", backend="triton") == "triton"  # show, study records: sizes
        env.setenv("TRITON_INTERPRET", "Yes")  # Triton reads this as on, and so do we
        assert plan(device="cpu", backend="triton") == "triton"
    assert plan(backend="cute") == plan()  # cute is a decode-step backend; the scan is auto's
    with pytest.raises(ValueError, match="allowed: auto, reference, chunked, triton, cute"):
        plan(backend="tilelang")


@pytest.mark.triton
def test_checkpointing_reads_saved_tensors_once():
    """Non-reentrant activation checkpointing around the op gives the same gradients."""
    c = Case(L=20, H=2, init=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = _inputs(c, torch.float32, dev, 3)

    def run(use_ckpt: bool):
        leaves = {k: v.clone().requires_grad_() for k, v in inp.items() if v is not None}

        def f(*vals):
            kw = dict(zip(leaves, vals, strict=True))
            y, st = mamba3_scan_triton(**kw, chunk_size=16, fast=False)
            return y.sum() + st.ssm.sum()

        vals = tuple(leaves.values())
        if use_ckpt:
            out = torch.utils.checkpoint.checkpoint(f, *vals, use_reentrant=False)
        else:
            out = f(*vals)
        out.backward()
        return [t.grad for t in vals]

    for a, b in zip(run(True), run(False), strict=True):
        assert rel_err(a, b) < 1e-6


@pytest.mark.triton
@pytest.mark.parametrize("rank, shared_angles", [(1, False), (2, False), (1, True)])
def test_fake_impl_and_registration(rank: int, shared_angles: bool):
    """Schema, fake (meta) implementation and autograd registration via opcheck, with the
    gates as the layer passes them: (B, H, L) views of (B, L, H) tensors (the real backward
    returns contiguous gradients for them, and so must the fake one, or ``torch.compile``
    fails in the backward); SISO and MIMO (per-rank scaling, halves pairing); angles shared
    over heads, (B, L, 1, S), whose gradient the kernels write per head (the fake gave the
    input's shape and inductor failed on it)."""
    c = Case(L=20, H=2, init=True, R=rank, C=16 // rank, halves=rank > 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = _inputs(c, torch.float32, dev, 4)
    if shared_angles:
        inp["angles"] = inp["angles"][:, :, :1].contiguous()
    gates = {k: inp[k].transpose(1, 2).contiguous().transpose(1, 2) for k in ("adt", "dt", "trap")}
    assert gates["dt"].stride(-1) != 1
    init = torch.randn(c.B, c.H, c.P, c.N, device=dev)  # initial state, relative frame
    names = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "mimo_x")
    tensors = [gates.get(k, inp.get(k)) for k in names] + [init, None]
    args = tuple(t.requires_grad_() if t is not None else None for t in tensors)
    args += (c.C, False, c.halves)
    torch.library.opcheck(
        torch.ops.hybridkit.mamba3_scan_fwd.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    y, total, end, states = torch.ops.hybridkit.mamba3_scan_fwd(*args)
    bwd_args = (torch.randn_like(y), torch.randn_like(total), torch.randn_like(end))
    bwd_args += tuple(t.detach() if t is not None else None for t in tensors)
    bwd_args += (states, c.C, False, c.halves, [8, 0, 168, 0, 2])  # qk_heads 2: both heads
    torch.library.opcheck(
        torch.ops.hybridkit.mamba3_scan_bwd.default,
        bwd_args,
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.triton
@pytest.mark.parametrize("compiled", [False, True])
def test_backward_launches_with_the_settings_of_its_forward(monkeypatch, compiled: bool):
    """On a GPU autograd runs the backward in a worker thread of its own, where a
    ``kernel_config`` block around the forward is not in force (a ContextVar stays in its
    thread): the backward must launch with the settings its forward saw, eager and compiled.
    Here the backward runs in a new thread, as on a GPU, under a different environment."""
    import threading

    from hybridkit.kernels import config
    from hybridkit.kernels.mamba3.chunkscan import op as scan_op

    seen: list[tuple] = []
    real = scan_op._launch_backward

    def spy(*args, **kwargs):
        cfg = config.current_config()
        seen.append((cfg.bwd_warps, cfg.bwd_x_warps, cfg.bwd_maxnreg, cfg.autotune, cfg.qk_heads))
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_op, "_launch_backward", spy)
    monkeypatch.setenv(config.ENV_VAR, "bwd_warps=2,autotune=1,qk_heads=1")
    torch._dynamo.reset()
    c = Case(L=20, H=2)
    leaves = {
        k: v.requires_grad_()
        for k, v in _inputs(c, torch.float32, "cpu", 3).items()
        if v is not None
    }

    def loss(**kw):
        return ops.mamba3_scan(**kw, chunk_size=16, backend="triton")[0].square().sum()

    fn = torch.compile(loss, fullgraph=True, backend="aot_eager") if compiled else loss
    settings = dict(bwd_warps=8, bwd_x_warps=4, bwd_maxnreg=168, autotune=False, qk_heads=2)
    with config.kernel_config(**settings):
        out = fn(**leaves)
    errors: list[BaseException] = []

    def backward() -> None:
        try:
            out.backward()
        except BaseException as err:  # noqa: BLE001  (re-raised in the test's thread)
            errors.append(err)

    worker = threading.Thread(target=backward)
    worker.start()
    worker.join()
    assert not errors, errors
    assert seen == [(8, 4, 168, False, 2)]
    assert all(t.grad is not None for t in leaves.values())


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 4])
def test_compiles_fullgraph_through_the_dispatch_point(rank: int):
    """``torch.compile(fullgraph=True)`` traces the dispatch point and the Triton scan (the
    kernel configuration is read as a trace-time constant), forward and backward, and matches
    eager, SISO and MIMO. On the CPU the op's kernels run in the interpreter."""
    torch._dynamo.reset()
    c = Case(L=40, H=2, R=rank, halves=rank > 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = _inputs(c, torch.float32, dev, 8)

    def loss(**kw):
        y, st = ops.mamba3_scan(**kw, chunk_size=16 // rank, backend="triton", pairing=c.pairing)
        return y.square().sum() + st.ssm.square().sum()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        leaves = {k: v.clone().requires_grad_() for k, v in inp.items() if v is not None}
        out = fn(**leaves)
        out.backward()
        results.append([out.detach()] + [t.grad for t in leaves.values()])
    for a, b in zip(*results, strict=True):
        assert rel_err(a, b) < 1e-5


# ----------------------------------------------------------------------------- GPU grid


@pytest.mark.gpu
def test_torch_compile_fullgraph_two_lengths():
    """A small module around the op compiles with fullgraph=True; two lengths; fwd + bwd."""
    torch._dynamo.reset()
    H, G, N, P, S = 4, 1, 64, 64, 16

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(P, P, device="cuda")
            self.q_bias = torch.nn.Parameter(torch.ones(H, 1, N, device="cuda"))
            self.k_bias = torch.nn.Parameter(torch.ones(H, 1, N, device="cuda"))
            self.D = torch.nn.Parameter(torch.ones(H, device="cuda"))

        def forward(self, q, k, v, adt, dt, trap, ang):
            y, st = ops.mamba3_scan(
                q,
                k,
                self.proj(v),
                adt,
                dt,
                trap,
                self.q_bias,
                self.k_bias,
                ang,
                self.D,
                chunk_size=64,
                backend="triton",
            )
            return y.float().square().mean() + st.ssm.square().mean()

    model = Tiny()
    compiled = torch.compile(model, fullgraph=True)
    for L in (256, 320):
        c = Case(B=2, L=L, H=H, G=G, N=N, P=P, S=S, C=64)
        inp = _inputs(c, torch.float32, "cuda", L)
        args = (inp["q"], inp["k"], inp["v"], inp["adt"], inp["dt"], inp["trap"], inp["angles"])
        model.zero_grad()
        ref = model(*args)
        ref.backward()
        g_ref = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        out = compiled(*args)
        out.backward()
        assert rel_err(out, ref) < 1e-5
        for a, b in zip([p.grad for p in model.parameters()], g_ref, strict=True):
            assert rel_err(a, b) < 1e-4


@pytest.mark.gpu
def test_auto_dispatch_uses_triton_on_gpu():
    c = Case(B=2, L=300, H=4, G=1, N=64, P=64, S=16, C=64, init=True)
    inp = _inputs(c, torch.float32, "cuda", 9)
    st = _state(c, "cuda", 10, torch.float32)
    args = dict(inp)
    y, fs = ops.mamba3_scan(**args, initial_state=st, chunk_size=64, backend="auto")
    yr, fr = ops.mamba3_scan(**args, initial_state=st, chunk_size=64, backend="chunked")
    assert y.dtype == torch.float32 and rel_err(y, yr) < 1e-4 and rel_err(fs.ssm, fr.ssm) < 1e-4


GPU_CASES = {
    "n128_p64_init": (Case(B=2, L=2345, H=4, G=1, N=128, P=64, S=32, C=64, init=True), "fp32"),
    "n64_p32_g2_split": (Case(B=2, L=2345, H=4, G=2, N=64, P=32, S=16, C=64), "fp32"),
    "n32_p64_c32_split": (
        Case(B=2, L=1000, H=4, G=1, N=32, P=64, S=8, C=32, init=True),
        "fp32",
    ),
    "varlen_n64_p64": (
        Case(
            B=1,
            L=2346,
            H=4,
            G=2,
            N=64,
            P=64,
            S=16,
            C=64,
            init=True,
            cu=(0, 700, 700, 701, 2001, 2346),
        ),
        "fp32",
    ),
    "len1": (Case(B=2, L=1, H=4, N=64, P=64, S=16, C=64, init=True), "fp32"),
    "bf16_n128_p64_init": (Case(B=2, L=2345, H=4, G=1, N=128, P=64, S=32, C=64, init=True), "bf16"),
    "bf16_varlen": (
        Case(
            B=1,
            L=2346,
            H=4,
            G=2,
            N=128,
            P=64,
            S=32,
            C=64,
            init=True,
            cu=(0, 1000, 1001, 2346),
        ),
        "bf16",
    ),
    "bf16_n64_p32_c128_g2": (Case(B=2, L=700, H=4, G=2, N=64, P=32, S=16, C=128), "bf16"),
    # the benchmark's third shape in miniature (bf16, N 64, P 64, chunk 64, G 1)
    "bf16_n64_p64_c64": (Case(B=2, L=700, H=4, G=1, N=64, P=64, S=16, C=64), "bf16"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_triton_siso_matches_reference_gpu(name: str):
    c, prec = GPU_CASES[name]
    errs = check_gpu_case(c, prec)
    print(f"\n{name}: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))


def test_refusal_names_the_reason():
    """A call the kernels cannot run is refused with the rule it breaks (not a generic list):
    here a d_state that is not a power of two, and float64 inputs. The GPU's minimum (32: tl.dot
    needs N / 2 >= 16, and headdim 16 gave wrong outputs in the GPU fuzz) is in the rule too."""
    inp = _inputs(Case(N=12), torch.float32, "cpu", seed=5)
    with pytest.raises(ValueError, match=r"d_state 12 / headdim 16: needs powers of two"):
        mamba3_scan_triton(**inp, chunk_size=16, fast=False)
    inp = _inputs(Case(), F64, "cpu", seed=6)
    with pytest.raises(ValueError, match="float64 inputs"):
        mamba3_scan_triton(**inp, chunk_size=16, fast=False)
    from hybridkit.kernels.mamba3.chunkscan import unsupported_reason

    gpu = unsupported_reason(1, 16, 16, torch.bfloat16, True, "interleaved")
    assert gpu is not None and "both >= 32" in gpu
    assert unsupported_reason(1, 16, 16, torch.bfloat16, False, "interleaved") is None
