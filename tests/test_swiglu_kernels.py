"""Fused SwiGLU (``hybridkit.kernels.swiglu``) against the float64 torch formula.

CPU CI runs the unmarked tests under ``TRITON_INTERPRET=1`` (``make test``) at tiny shapes with
NaN-poisoned output buffers; ``pytest -m gpu`` checks the 400M model's shape in bf16.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # a fallback: torch >= 2.13 imports Triton with torch
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hybridkit.kernels.swiglu import resolve_backend, swiglu  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(h: torch.Tensor) -> torch.Tensor:
    value, gate = h.double().chunk(2, dim=-1)
    return value * F.silu(gate)


@pytest.fixture
def poisoned(monkeypatch):
    """Output buffers hold NaN until the kernels write them."""
    from hybridkit.kernels.swiglu import op

    real_forward, real_backward = op.swiglu_forward, op.swiglu_backward

    def forward(h, out):
        real_forward(h, out.fill_(float("nan")))

    def backward(h, dout, dh):
        real_backward(h, dout, dh.fill_(float("nan")))

    monkeypatch.setattr(op, "swiglu_forward", forward)
    monkeypatch.setattr(op, "swiglu_backward", backward)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(2, 3, 2 * 20), (1, 2 * 130), (17, 2 * 7)])
def test_matches_float64_forward_and_backward(shape, poisoned):
    h64 = torch.randn(shape, dtype=F64)
    h = h64.float().to(DEVICE).requires_grad_()
    out = swiglu(h, backend="triton")
    ref = _reference(h64.requires_grad_())
    assert out.dtype == torch.float32 and out.shape == ref.shape and rel_err(out, ref) < 1e-6
    dout = torch.randn(ref.shape, dtype=F64)
    (got,) = torch.autograd.grad(out, h, dout.float().to(DEVICE))
    (want,) = torch.autograd.grad(ref, h64, dout)
    assert torch.isfinite(got).all() and rel_err(got, want) < 1e-6


@pytest.mark.triton
def test_strided_bf16_input_and_dispatch():
    base = torch.randn(4, 3 * 16, dtype=F64).to(DEVICE, torch.bfloat16).requires_grad_()
    h = base[:, 8:40]  # row stride 48, as a slice of a wider projection would be
    out = swiglu(h, backend="triton")
    assert out.dtype == torch.bfloat16 and rel_err(out, _reference(h.detach())) < 1e-2
    out.float().sum().backward()
    assert torch.isfinite(base.grad[:, 8:40].float()).all()
    assert torch.all(base.grad[:, :8] == 0) and torch.all(base.grad[:, 40:] == 0)
    assert resolve_backend("auto", torch.randn(2, 4)) == "torch"
    with pytest.raises(ValueError, match="allowed: auto, torch, triton"):
        resolve_backend("fast", torch.randn(2, 4))
    with pytest.raises(ValueError, match="odd"):
        swiglu(torch.randn(2, 5))


@pytest.mark.triton
def test_custom_ops_and_fullgraph_compile():
    h = torch.randn(3, 2 * 12, device=DEVICE, requires_grad=True)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.hybridkit.swiglu_fwd.default, (h,), test_utils=checks)
    torch._dynamo.reset()

    def fn(h):
        return swiglu(h, backend="triton") * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(h)
    assert rel_err(compiled, fn(h)) < 1e-7
    (g1,) = torch.autograd.grad(compiled.sum(), h)
    (g2,) = torch.autograd.grad(fn(h).sum(), h)
    assert rel_err(g1, g2) < 1e-7


@pytest.mark.triton
def test_mlp_layer_with_the_kernels_matches_torch():
    from hybridkit import build_model
    from hybridkit.layers.mlp import SwiGLU
    from tests.helpers import tiny_recipe

    model = build_model(tiny_recipe("m a", d_model=16, vocab=32), seed=0)
    ids = torch.randint(0, 32, (2, 9))
    results = []
    for backend in ("torch", "triton"):
        for module in model.modules():
            if isinstance(module, SwiGLU):
                module.act_backend = backend
        model.zero_grad()
        loss = model(ids, targets=ids)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l_ref, g_ref), (l_got, g_got) = results
    assert rel_err(l_got, l_ref) < 1e-6
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(g_got, g_ref, strict=True))


@pytest.mark.gpu
def test_gpu_400m_mlp_shape_in_bf16():
    h64 = torch.randn(16384, 2 * 2816, dtype=F64, device="cuda")
    h = h64.to(torch.bfloat16).requires_grad_()
    out = swiglu(h, backend="triton")
    ref = _reference(h.detach())
    assert rel_err(out, ref) < 1e-2
    dout = torch.randn(ref.shape, dtype=F64, device="cuda")
    (got,) = torch.autograd.grad(out, h, dout.to(torch.bfloat16))
    hr = h.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(_reference(hr), hr, dout)
    assert rel_err(got, want) < 1e-2


def test_auto_picks_the_kernels_under_compile(monkeypatch):
    """CUDA tensors get the kernels under ``torch.compile`` too (the activation sits between two
    matmuls, so the opaque op costs no fusion; the module docstring has the measurement)."""
    import types

    import hybridkit.kernels.swiglu as dispatch

    monkeypatch.setattr(dispatch, "HAVE_TRITON", True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    cuda_like = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert dispatch.resolve_backend("auto", cuda_like) == "triton"
    wide = types.SimpleNamespace(is_cuda=True, dtype=torch.float64)
    assert dispatch.resolve_backend("auto", wide) == "torch"
    assert dispatch.resolve_backend("auto", torch.randn(2, 4)) == "torch"


@pytest.mark.gpu
def test_gpu_compiled_mlp_uses_the_kernels_and_matches_eager_torch():
    """A compiled SwiGLU MLP under bf16 autocast (``auto``: the custom ops) against the eager
    torch formula: loss and every gradient within bf16 noise."""
    from hybridkit.layers.mlp import MLPSpec, SwiGLU

    torch.manual_seed(0)
    mlp = SwiGLU(MLPSpec(d_ff=512), d_model=256, layer_idx=0).cuda()
    x = torch.randn(4, 128, 256, device="cuda")
    results = {}
    for name, backend in (("compiled", "auto"), ("eager", "torch")):
        mlp.act_backend = backend
        mlp.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        run = torch.compile(mlp, fullgraph=True) if name == "compiled" else mlp
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(x)
        out.float().pow(2).mean().backward()
        results[name] = [out.float().detach()] + [p.grad.clone() for p in mlp.parameters()]
    for got, want in zip(results["compiled"], results["eager"], strict=True):
        assert rel_err(got, want) < 2e-2


@pytest.mark.triton
def test_kernels_compiled_inside_activation_checkpointing():
    """What a compiled, checkpointed CUDA model now runs (the kernels are ``auto``'s compiled
    choice): the custom ops traced fullgraph inside per-block activation checkpointing, whose
    backward runs the forward op again; loss and every gradient equal the eager torch formula's
    without checkpointing."""
    from hybridkit import build_model
    from hybridkit.layers.mlp import SwiGLU
    from tests.helpers import tiny_recipe

    model = build_model(tiny_recipe("m a", d_model=16, vocab=32), seed=0)
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    results = {}
    for compiled in (False, True):
        for module in model.modules():
            if isinstance(module, SwiGLU):
                module.act_backend = "triton" if compiled else "torch"
        model.activation_checkpointing = compiled
        model.zero_grad()
        torch._dynamo.reset()
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        loss = run(ids, targets=ids)
        loss.backward()
        results[compiled] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    (l_ref, g_ref), (l_got, g_got) = results[False], results[True]
    assert rel_err(l_got, l_ref) < 1e-6
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(g_got, g_ref, strict=True))
