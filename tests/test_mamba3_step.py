"""The fused Mamba-3 decode step against the float64 torch reference step.

CPU CI runs the Triton kernel in the interpreter (``TRITON_INTERPRET=1``, set here before Triton
is imported) at tiny shapes; ``pytest -m gpu`` runs it at real shapes (H 64, P 64, N 128,
batch 1 / 16 / 128). Every case starts from a fresh random state and random projections (never
zeros), poisons the output with NaN first, and compares the output and every updated state
tensor with the reference run in float64 on copies of the same inputs.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, replace

import pytest
import torch
from torch import Tensor

if not torch.cuda.is_available():  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridkit.kernels.config import kernel_config  # noqa: E402
from hybridkit.kernels.mamba3 import ops  # noqa: E402
from hybridkit.kernels.mamba3.state import Mamba3State  # noqa: E402
from hybridkit.kernels.mamba3.step import StepInputs, StepWeights, mamba3_step_reference  # noqa: E402
from hybridkit.kernels.mamba3.step.triton_step import mamba3_step_triton  # noqa: E402
from tests.helpers import angle_err, rel_err  # noqa: E402

F64 = torch.float64


@dataclass(frozen=True)
class Case:
    B: int = 2
    H: int = 4
    G: int = 1
    R: int = 1
    P: int = 8
    N: int = 16
    S: int = 4
    rope: bool = True
    trap: bool = True
    D: bool = True
    gated: bool = True
    heavy_tail: bool = True
    out_norm: str = "none"  # or grouped_pregate / grouped_postgate (with the gate)
    state_dtype: torch.dtype = torch.float32  # of the ssm state
    io_dtype: torch.dtype = torch.float32  # of the projections and the k / v state
    split: int = 1  # the kernel setting step_split: programs per (sequence, head)

    @property
    def pairing(self) -> str:
        return "interleaved" if self.R == 1 else "halves"


def _make(c: Case, device: str, seed: int) -> tuple[dict, Mamba3State, StepWeights]:
    """Random inputs, state and weights (float64 on the CPU; the caller casts them)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    inputs = dict(
        x=rnd(c.B, c.H, c.P),
        z=rnd(c.B, c.H, c.P) if c.gated else None,
        bk=rnd(c.B, c.R, c.G, c.N),
        cq=rnd(c.B, c.R, c.G, c.N),
        dd_dt=rnd(c.B, c.H),
        dd_a=rnd(c.B, c.H),
        trap=rnd(c.B, c.H) if c.trap else None,
        angles=rnd(c.B, c.S, scale=3.0) if c.rope else None,
    )
    s = c.S if c.rope else 0
    state = Mamba3State(
        angle=torch.rand(c.B, c.H, s, generator=g, dtype=F64) * 6.28,
        ssm=rnd(c.B, c.H, c.P, c.N),
        k=rnd(c.B, c.R, c.H, c.N),
        v=rnd(c.B, c.H, c.P),
    )
    mimo = c.R > 1
    weights = StepWeights(
        dt_bias=rnd(c.H, scale=0.5) - 2.0,
        B_bias=1.0 + rnd(c.H, c.R, c.N, scale=0.3),
        C_bias=1.0 + rnd(c.H, c.R, c.N, scale=0.3),
        B_norm=1.0 + rnd(c.N, scale=0.3),
        C_norm=1.0 + rnd(c.N, scale=0.3),
        D=rnd(c.H) if c.D else None,
        mimo_x=rnd(c.H, c.R, c.P) if mimo else None,
        mimo_z=rnd(c.H, c.R, c.P) if mimo else None,
        mimo_o=rnd(c.H, c.R, c.P) if mimo else None,
        a_activation="heavy_tail" if c.heavy_tail else "softplus",
        pairing=c.pairing,
        out_norm=None if c.out_norm == "none" else 1.0 + rnd(c.H * c.P, scale=0.3),
        out_norm_mode=c.out_norm,
    )
    del device
    return inputs, state, weights


def _to(t: Tensor | None, dtype: torch.dtype, device: str) -> Tensor | None:
    return None if t is None else t.to(device=device, dtype=dtype)


def _check(c: Case, device: str, seed: int = 0, tol: float = 1e-5, step=None) -> None:
    inputs, state, weights = _make(c, device, seed)
    # the kernel's inputs: strided views like the layer's split of in_proj (a wide row per token)
    kin = {}
    for name, t in inputs.items():
        if t is None:
            kin[name] = None
            continue
        wide = torch.full((*t.shape[:-1], t.shape[-1] + 3), float("nan"), dtype=F64)
        wide[..., : t.shape[-1]] = t
        kin[name] = _to(wide, c.io_dtype, device)[..., : t.shape[-1]]
    kstate = Mamba3State(
        _to(state.angle, torch.float32, device),
        _to(state.ssm, c.state_dtype, device),
        _to(state.k, c.io_dtype, device),
        _to(state.v, c.io_dtype, device),
    )
    tensors = [f for f, t in weights._asdict().items() if isinstance(t, Tensor)]
    kw = weights._replace(**{f: _to(getattr(weights, f), torch.float32, device) for f in tensors})
    # the reference sees exactly what the kernel sees (the rounded inputs), in float64
    rin = {n: None if t is None else t.to(F64).cpu() for n, t in kin.items()}
    rstate = Mamba3State(*(t.to(F64).cpu().clone() for t in kstate))
    rw = kw._replace(**{f: getattr(kw, f).to(F64).cpu() for f in tensors})
    want = mamba3_step_reference(StepInputs(**rin), rstate, rw)

    shape = (c.B, c.H, c.P) if c.gated else (c.B, c.R, c.H, c.P)
    odt = c.io_dtype if c.gated else torch.float32
    if step is None:
        out = torch.full(shape, float("nan"), dtype=odt, device=device)
        with kernel_config(step_split=c.split):
            got = mamba3_step_triton(StepInputs(**kin), kstate, kw, out=out)
        assert got.data_ptr() == out.data_ptr()
    else:  # a backend that allocates its output
        got = step(StepInputs(**kin), kstate, kw)
    assert torch.isfinite(got).all()
    lowp = c.io_dtype != torch.float32 or c.state_dtype != torch.float32
    t = 2e-2 if lowp else tol
    assert rel_err(got, want) < t, rel_err(got, want)
    assert rel_err(kstate.ssm, rstate.ssm) < t
    assert rel_err(kstate.k, rstate.k) < t
    assert rel_err(kstate.v, rstate.v) == 0.0  # the raw x, stored as is
    if c.rope:
        assert angle_err(kstate.angle, rstate.angle) < 1e-5


# ----------------------------------------------------------------------------- CPU (interpreter)
CPU_CASES = {
    "siso": Case(),
    "siso_odd_sizes": Case(B=1, H=3, P=6, N=12, S=3),
    "siso_groups": Case(H=4, G=2),
    "siso_rope_full": Case(S=8),
    "siso_no_rope": Case(rope=False),
    "siso_no_trap_no_D": Case(trap=False, D=False),
    "siso_softplus": Case(heavy_tail=False),
    "siso_ungated": Case(gated=False),
    "siso_grouped_pregate": Case(out_norm="grouped_pregate", P=6),
    "mimo_grouped_postgate": Case(R=2, out_norm="grouped_postgate"),
    "mimo": Case(R=2),
    "mimo_groups_ungated": Case(R=3, G=2, gated=False, S=8),
    "mimo_no_rope": Case(R=2, rope=False, trap=False),
    "bf16_state": Case(state_dtype=torch.bfloat16),
    "bf16_io": Case(R=2, io_dtype=torch.bfloat16),
    # step_split: several programs per head, then the finish launch (keys, angles, gate, norm)
    "split2_siso": Case(split=2),
    "split4_siso_pregate_odd": Case(split=4, out_norm="grouped_pregate", P=6, N=12, S=3, B=3),
    "split8_siso_ungated": Case(split=8, gated=False),
    "split2_mimo_postgate": Case(split=2, R=2, out_norm="grouped_postgate"),
    "split4_mimo_groups_ungated_norope": Case(split=4, R=3, G=2, gated=False, rope=False),
    "split2_bf16_state": Case(split=2, state_dtype=torch.bfloat16, trap=False, D=False),
}


@pytest.mark.triton
@pytest.mark.parametrize("name", list(CPU_CASES))
def test_step_interpreter(name):
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU runs the gpu-marked cases")
    _check(CPU_CASES[name], "cpu", seed=zlib.crc32(name.encode()) % 1000)


@pytest.mark.triton
@pytest.mark.parametrize("name", [n for n, c in CPU_CASES.items() if c.split > 1])
def test_split_step_reading_its_state_early(name, monkeypatch):
    """The split step's ``EARLY_STATE`` path (the state, previous v and key read before the PDL
    wait; on a GPU with PDL the default) computes what the reference does. Without PDL it is
    never chosen, so it is forced here."""
    if torch.cuda.is_available():
        pytest.skip("interpreter test; on the GPU the split cases take this path under PDL")
    from hybridkit.kernels.mamba3.step import triton_step

    assert not triton_step._early_state(False, 4, False)  # no PDL: never
    assert not triton_step._early_state(True, 1, False)  # unsplit: nothing in between
    assert not triton_step._early_state(True, 4, True)  # a PDL finish: nothing in between
    assert triton_step._early_state(True, 4, False)
    monkeypatch.setattr(triton_step, "_early_state", lambda *args: True)
    _check(CPU_CASES[name], "cpu", seed=zlib.crc32(name.encode()) % 1000 + 1)


@pytest.mark.triton
def test_dispatch_plans():
    def plan(backend, device, dtype=torch.float32, rank=1):
        return ops.plan_step(backend, device=device, dtype=dtype, rank=rank).describe()

    assert plan("auto", "cpu", torch.bfloat16) == "reference"
    assert plan("auto", "cuda", torch.float64) == "reference"
    assert plan("chunked", "cuda", torch.bfloat16) == "reference"
    assert plan("triton", "cpu") == "triton"
    assert plan("cute", "cpu") == "reference"
    assert plan("cute", "cuda", rank=2) == "triton (cute step is SISO only)"
    if ops.cute_unavailable() is not None:  # CPU CI: the CuTe DSL is not installed
        assert plan("cute", "cuda").startswith("triton (nvidia-cutlass-dsl not importable")
    with pytest.raises(ValueError, match="unknown Mamba-3 backend"):
        plan("cuda-magic", "cpu")


@pytest.mark.triton
def test_show_names_the_split_step():
    """``hybridkit show``'s decode row says when the step runs split (``step_split``)."""
    from hybridkit.layers.mamba3 import Mamba3, Mamba3Spec

    layer = Mamba3(Mamba3Spec(d_state=16, headdim=8, backend="triton"), d_model=16, layer_idx=0)
    with kernel_config(step_split=1):
        assert layer.backends("cuda", torch.bfloat16, 1) == {"mamba3 step": "triton"}
    shown = layer.backends("cuda", torch.bfloat16, 1)["mamba3 step"]  # the default, 4
    assert shown.startswith("triton (step_split=4: 4 programs per head")


def test_reference_step_is_one_token_of_the_scan():
    """The reference step equals an L = 1 call of the sequential scan with the same state."""
    from hybridkit.kernels.mamba3.gates import scalar_gates
    from hybridkit.kernels.mamba3.reference import mamba3_scan_sequential
    from hybridkit.kernels.mamba3.step import gated_output

    c = Case(R=2, G=2, H=4)
    inputs, state, w = _make(c, "cpu", 3)
    x, z = inputs["x"], inputs["z"]

    def norm(u, weight):
        return u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + w.norm_eps) * weight

    dt, adt = scalar_gates(inputs["dd_dt"], inputs["dd_a"], w.dt_bias, w.a_activation, w.a_floor)
    y, final = mamba3_scan_sequential(
        norm(inputs["cq"], w.C_norm)[:, None],
        norm(inputs["bk"], w.B_norm)[:, None],
        x[:, None],
        adt[..., None],
        dt[..., None],
        inputs["trap"][..., None],
        w.C_bias,
        w.B_bias,
        inputs["angles"][:, None, None].expand(c.B, 1, c.H, c.S),
        w.D,
        w.mimo_x,
        pairing="halves",
        initial_state=state,
    )
    st = Mamba3State(*(t.clone() for t in state))
    got = mamba3_step_reference(StepInputs(**inputs), st, w)
    assert rel_err(got, gated_output(y[:, 0], z, w.mimo_z, w.mimo_o)) < 1e-12
    for a, b in zip(st, final, strict=True):
        assert rel_err(a, b) < 1e-12


# ----------------------------------------------------------------------------- GPU
GPU_CASES = {
    f"{kind}_b{b}": replace(case, B=b)
    for b in (1, 16, 128)
    for kind, case in {
        "siso": Case(H=64, P=64, N=128, S=32),
        "siso_bf16": Case(H=64, P=64, N=128, S=32, io_dtype=torch.bfloat16),
        "siso_bf16_state": Case(H=64, P=64, N=128, S=32, state_dtype=torch.bfloat16),
        "mimo4": Case(H=64, P=64, N=128, S=32, R=4, G=2),
        "siso_grouped_pregate": Case(H=64, P=64, N=128, S=32, out_norm="grouped_pregate"),
        "mimo4_ungated_norope": Case(H=64, P=64, N=128, R=4, rope=False, gated=False),
        "split2_siso_pregate": Case(H=64, P=64, N=128, S=32, out_norm="grouped_pregate", split=2),
        "split4_siso_bf16_state": Case(
            H=64, P=64, N=128, S=32, state_dtype=torch.bfloat16, split=4
        ),  # fmt: skip
        "split2_mimo4": Case(H=64, P=64, N=128, S=32, R=4, G=2, split=2),
    }.items()
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_step_gpu(name):
    _check(GPU_CASES[name], "cuda", seed=zlib.crc32(name.encode()) % 1000)


# ----------------------------------------------------------------------------- the layer's decode
LAYER_VARIANTS = {
    "siso": {},
    "mimo": {"mimo_rank": 2},
    "siso_grouped_norm": {"outproj_norm": "grouped_pregate"},
    "mimo_norm_groups": {"mimo_rank": 2, "outproj_norm": "postgate", "ngroups": 2},
    "mimo_grouped_postgate": {"mimo_rank": 2, "outproj_norm": "grouped_postgate"},
    "real_euler": {"rope": False, "trapezoid": False, "a_activation": "softplus"},
}


@pytest.mark.triton
@pytest.mark.parametrize("name", list(LAYER_VARIANTS))
def test_layer_decode_through_the_kernel(name, monkeypatch):
    """Prefill 3 tokens, then decode 3 through the fused kernel: equals the full forward."""
    if torch.cuda.is_available():
        pytest.skip("interpreter test")
    from hybridkit.cache import InferenceCache
    from hybridkit.layers.mamba3 import Mamba3, Mamba3Spec

    spec = Mamba3Spec(d_state=16, headdim=8, **LAYER_VARIANTS[name])
    layer = Mamba3(spec, d_model=16, layer_idx=0)
    with torch.no_grad():
        for param in layer.parameters():  # constant-initialised ones too: exercise every term
            param.add_(0.2 * torch.randn_like(param))
    u = torch.randn(2, 6, 16)
    calls = []
    monkeypatch.setattr(ops, "plan_step", lambda *a, **k: calls.append(1) or ops.StepPlan("triton"))
    with torch.no_grad():
        full = layer(u)
        cache = InferenceCache(2, 6)
        cache.layers[0] = layer.allocate_cache(2, 6, torch.float32, None)
        state = cache.layers[0]
        parts = [layer(u[:, :3], cache=cache)]
        parts += [layer(u[:, t : t + 1], cache=cache) for t in range(3, 6)]
    assert len(calls) == 3  # every decode token went through the kernel
    assert all(a is b for a, b in zip(cache.layers[0], state, strict=True))  # in place
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 16, 128])
def test_cute_step_gpu(batch, state_dtype):
    """The CuTe DSL state update (SISO) against the float64 reference, as the Triton step."""
    if ops.cute_unavailable() is not None:
        pytest.skip(ops.cute_unavailable())
    from hybridkit.kernels.mamba3.step.cute_step import mamba3_step_cute

    c = Case(B=batch, H=64, P=64, N=128, S=32, state_dtype=state_dtype, io_dtype=torch.bfloat16)
    _check(c, "cuda", seed=batch, step=mamba3_step_cute)


def test_cute_kernel_compiles_for_sm90():
    """Where the CuTe DSL imports (a Python 3.12 machine with the wheels), the kernel compiles
    for sm_90a without a GPU; elsewhere (CPU CI) this skips and nothing imports cutlass."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("cutlass") is None:
        pytest.skip("nvidia-cutlass-dsl is not installed")
    script = Path(__file__).resolve().parents[1] / "benchmarks/cute_step_compile.py"
    done = subprocess.run(
        [sys.executable, str(script), "--shapes", "32x64", "--dtypes", "float32"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiled P=32 N=64" in done.stdout
