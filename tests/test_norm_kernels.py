"""Fused Triton norms (``hybridkit.kernels.norm``) against the float64 torch formulas.

CPU CI runs the unmarked tests under ``TRITON_INTERPRET=1`` at tiny shapes (``make test`` sets
it; torch >= 2.13 imports Triton with torch, so setting it here is only a fallback); outputs and
gradients are compared by relative norm error, with the kernels' output buffers poisoned with
NaN first so that an unwritten element cannot pass. ``pytest -m gpu`` runs the same checks at
the 400M model's shapes, in bf16, and under ``torch.compile``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hybridkit.kernels import norm as norm_ops  # noqa: E402
from hybridkit.kernels.norm.reference import (  # noqa: E402
    gated_rms_norm_reference,
    rms_norm_reference,
)
from tests.helpers import rel_err, set_launch  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poisoned_empty(monkeypatch):
    """The kernels' output buffers (out, rstd, dx, dz) hold NaN until the kernels write them."""
    from hybridkit.kernels.norm import op

    real_forward, real_backward = op.norm_forward, op.norm_backward

    def forward(x, z, weight, out, rstd, *rest):
        out.fill_(float("nan")), rstd.fill_(float("nan"))
        return real_forward(x, z, weight, out, rstd, *rest)

    def backward(dout, x, z, weight, rstd, dx, dz, *rest, **kwargs):
        for t in (dx, dz, kwargs.get("dx2")):
            if t is not None:
                t.fill_(float("nan"))
        return real_backward(dout, x, z, weight, rstd, dx, dz, *rest, **kwargs)

    monkeypatch.setattr(op, "norm_forward", forward)
    monkeypatch.setattr(op, "norm_backward", backward)


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=F64).to(out.device, out.dtype)
    return torch.autograd.grad(out, inputs, dout, allow_unused=True)


def _leaf(t, dtype=torch.float32):
    return t.to(DEVICE, dtype).requires_grad_()


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(3, 5, 24), (1, 1, 7), (2, 33)])
def test_rms_norm_matches_float64(shape, poisoned_empty):
    x64, w64 = torch.randn(shape, dtype=F64), 1 + 0.1 * torch.randn(shape[-1], dtype=F64)
    x, w = _leaf(x64), _leaf(w64)
    out = norm_ops.rms_norm(x, w, 1e-5, backend="triton")
    ref = rms_norm_reference(x64.requires_grad_(), w64.requires_grad_(), 1e-5)
    assert out.dtype == x.dtype and out.shape == x.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-6
    for got, want in zip(_grads(out, (x, w)), _grads(ref, (x64, w64)), strict=True):
        assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5


@pytest.mark.triton
@pytest.mark.parametrize("pre_gate", [True, False])
@pytest.mark.parametrize(("dim", "group"), [(24, 8), (24, 24), (20, 5)])
def test_gated_norm_matches_float64(pre_gate, dim, group, poisoned_empty):
    _check_gated(6, dim, group, pre_gate, torch.float32, 1e-5, out_tol=1e-6)


#: launches other than the defaults that ``benchmarks/norm.py --sweep`` times: each must be
#: right, not only fast (the tile sizes matter on the CPU too, the warps only on a GPU)
LAUNCHES = {  # (fwd elements, fwd warps, bwd elements, bwd warps, bwd programs per SM)
    "small": (32, 1, 16, 1, 16),
    "warps": (1024, 2, 512, 2, 16),
    "wide": (4096, 4, 1024, 4, 8),
    "one_warp": (1024, 1, 512, 1, 16),  # the fastest backward of the 2026-12-06 H100 sweep
    "former": (2048, 8, 2048, 8, 4),  # the defaults before that sweep
}


def _check_gated(rows, dim, group, pre_gate, dtype, tol, out_tol=None):
    """The gated norm (float32 out, finite) and its gradients against float64 on ``DEVICE``
    within ``tol`` (the output within ``out_tol`` when given)."""
    y64, z64 = torch.randn(rows, dim, dtype=F64), torch.randn(rows, dim, dtype=F64)
    w64 = 1 + 0.1 * torch.randn(dim, dtype=F64)
    y, z, w = _leaf(y64, dtype), _leaf(z64, dtype), _leaf(w64)
    out = norm_ops.gated_rms_norm(
        y, z, w, group_size=group, eps=1e-5, norm_before_gate=pre_gate, backend="triton"
    )
    leaves64 = [t.to(DEVICE).requires_grad_() for t in (y64, z64, w64)]
    ref = gated_rms_norm_reference(*leaves64, group, 1e-5, pre_gate)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, ref) < (out_tol or tol)
    for got, want in zip(_grads(out, (y, z, w)), _grads(ref, leaves64), strict=True):
        assert torch.isfinite(got.float()).all() and rel_err(got, want) < tol


@pytest.mark.triton
@pytest.mark.parametrize("launch", sorted(LAUNCHES))
@pytest.mark.parametrize("pre_gate", [True, False])
def test_other_launches_match_float64(launch, pre_gate, monkeypatch, poisoned_empty):
    """Several rows per tile and one (a group wider than the tile), an odd group."""
    from hybridkit.kernels.norm import triton_kernels

    set_launch(monkeypatch, triton_kernels, LAUNCHES[launch])
    _check_gated(7, 24, 8, pre_gate, torch.float32, 1e-5)
    _check_gated(5, 40, 20, pre_gate, torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("launch", sorted(LAUNCHES))
@pytest.mark.parametrize("pre_gate", [True, False])
def test_gpu_other_launches(launch, pre_gate, monkeypatch):
    from hybridkit.kernels.norm import triton_kernels

    set_launch(monkeypatch, triton_kernels, LAUNCHES[launch])
    _check_gated(16384, 2048, 64, pre_gate, torch.bfloat16, 1e-2)
    _check_gated(1000, 2048, 2048, pre_gate, torch.float32, 1e-5)


@pytest.mark.triton
def test_strided_views_and_low_precision_inputs():
    """The Mamba-3 layer hands in ``z`` as a strided slice of ``in_proj``'s output, in bf16."""
    packed = torch.randn(2, 5, 3 * 16, dtype=F64)
    y64, z64 = packed[..., :16], packed[..., 16:32]  # row stride 48, unit column stride
    w64 = torch.ones(16, dtype=F64)
    y, z = _leaf(y64, torch.bfloat16), _leaf(z64, torch.bfloat16)
    w = _leaf(w64)
    out = norm_ops.gated_rms_norm(
        y, z, w, group_size=8, eps=1e-5, norm_before_gate=True, backend="triton"
    )
    ref = gated_rms_norm_reference(y.detach().double(), z.detach().double(), w64, 8, 1e-5, True)
    assert rel_err(out, ref) < 1e-5
    dy, dz, dw = _grads(out, (y, z, w))
    assert dy.dtype == dz.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert all(torch.isfinite(g.float()).all() for g in (dy, dz, dw))


def test_empty_input_and_dispatch_rules():
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    out = norm_ops.rms_norm(x, w, 1e-5, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 8) and w.grad is not None and torch.all(w.grad == 0)
    cpu = torch.randn(2, 8)
    assert norm_ops.resolve_backend("auto", cpu, 8) == "torch"
    assert norm_ops.resolve_backend("auto", cpu.double(), 8) == "torch"
    with pytest.raises(ValueError, match="allowed: auto, torch, triton"):
        norm_ops.resolve_backend("cuda", cpu, 8)
    with pytest.raises(ValueError, match="do not split"):
        norm_ops.gated_rms_norm(cpu, cpu, w, group_size=3, eps=1e-5, norm_before_gate=True)


@pytest.mark.triton
def test_custom_op_fake_impls_match_the_real_ones():
    """``torch.library.opcheck``: fake shapes/strides/dtypes, autograd registration, schema."""
    y = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    z = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    cases = ((y, z, w, 8, 1e-5, True, "float32"), (y, None, w, 16, 1e-5, False, ""),
             (y, None, w, 16, 1e-5, False, "bfloat16"))  # fmt: skip
    for args in cases:
        torch.library.opcheck(torch.ops.hybridkit.fused_norm_fwd.default, args, test_utils=checks)


@pytest.mark.triton
def test_compiles_fullgraph_with_the_custom_op():
    torch._dynamo.reset()
    y = torch.randn(2, 3, 16, device=DEVICE, dtype=F64).float().requires_grad_()
    z = torch.randn(2, 3, 16, device=DEVICE).requires_grad_()
    w = (1 + 0.1 * torch.randn(16, device=DEVICE)).requires_grad_()

    def fn(y, z, w):
        h = norm_ops.rms_norm(y, w, 1e-5, backend="triton")
        return norm_ops.gated_rms_norm(
            h, z, w, group_size=8, eps=1e-5, norm_before_gate=True, backend="triton"
        )

    eager = fn(y, z, w)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(y, z, w)
    assert rel_err(compiled, eager) < 1e-6
    for a, b in zip(_grads(compiled, (y, z, w)), _grads(eager, (y, z, w)), strict=True):
        assert rel_err(a, b) < 1e-6


def _set_norm_backend(model: torch.nn.Module, backend: str) -> None:
    from hybridkit.layers.norm import GatedRMSNorm, RMSNorm

    for module in model.modules():
        if isinstance(module, (RMSNorm, GatedRMSNorm)):
            module.backend = backend


@pytest.mark.triton
def test_model_with_triton_norms_matches_torch_norms():
    """Every norm of a tiny hybrid (block norms, BCNorm, the grouped pre-gate output norm) through
    the kernels: same loss and gradients as through torch."""
    from hybridkit import build_model
    from tests.helpers import attn_block, mamba_block, tiny_recipe

    m, a = mamba_block(outproj_norm="grouped_pregate"), attn_block(qk_norm=True)
    recipe = tiny_recipe("m a", d_model=16, vocab=32, m=m, a=a)
    model = build_model(recipe, seed=0)
    ids = torch.randint(0, 32, (2, 9))
    results = {}
    for backend in ("torch", "triton"):
        _set_norm_backend(model, backend)
        model.zero_grad()
        loss = model(ids, targets=ids)
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    (l_ref, g_ref), (l_got, g_got) = results["torch"], results["triton"]
    assert rel_err(l_got, l_ref) < 1e-6
    for got, want in zip(g_got, g_ref, strict=True):
        assert rel_err(got, want) < 1e-4


# --- GPU: real shapes, bf16, the model, Inductor ----------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "dim", "group", "gated"),
    [(16384, 1024, 1024, False), (16384, 128, 128, False), (16384, 2048, 64, True),
     (4096, 2048, 2048, True), (1000, 2048, 64, True)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_shapes(rows, dim, group, gated, dtype):
    y64 = torch.randn(rows, dim, dtype=F64, device="cuda")
    z64 = torch.randn(rows, dim, dtype=F64, device="cuda")
    w64 = 1 + 0.1 * torch.randn(dim, dtype=F64, device="cuda")
    y, z, w = y64.to(dtype).requires_grad_(), z64.to(dtype).requires_grad_(), _leaf(w64)
    yr, zr = y.detach().double().requires_grad_(), z.detach().double().requires_grad_()
    wr = w64.clone().requires_grad_()
    if gated:
        out = norm_ops.gated_rms_norm(
            y, z, w, group_size=group, eps=1e-5, norm_before_gate=True, backend="triton"
        )
        ref = gated_rms_norm_reference(yr, zr, wr, group, 1e-5, True)
        inputs, refs = (y, z, w), (yr, zr, wr)
    else:
        out = norm_ops.rms_norm(y, w, 1e-5, backend="triton")
        ref = rms_norm_reference(yr, wr, 1e-5)
        inputs, refs = (y, w), (yr, wr)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) < tol
    for got, want in zip(_grads(out, inputs), _grads(ref, refs), strict=True):
        assert rel_err(got, want) < tol


@pytest.mark.gpu
def test_gpu_model_compiles_fullgraph_with_triton_norms():
    from hybridkit import build_model
    from tests.helpers import attn_block, mamba_block, tiny_recipe

    torch._dynamo.reset()
    m = mamba_block(outproj_norm="grouped_pregate", d_state=32, headdim=32, chunk_size=64)
    recipe = tiny_recipe("m a", d_model=64, vocab=128, m=m, a=attn_block(qk_norm=True))
    model = build_model(recipe, seed=0).cuda()
    _set_norm_backend(model, "triton")
    ids = torch.randint(0, 128, (2, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(ids, targets=ids)
        compiled = torch.compile(model, fullgraph=True)(ids, targets=ids)
    assert abs(compiled.item() - eager.item()) < 1e-2 * abs(eager.item())


# --- the residual add and the next pre-norm in one launch (inference) ------------------------
@pytest.mark.triton
@pytest.mark.parametrize("shape", [(2, 1, 24), (5, 33), (1, 1, 7)])
def test_add_norm_matches_the_two_ops(shape):
    """``add_rms_norm`` through its kernel (forced on, no autograd): the sum exactly as torch's
    add rounds it, and the norm of that sum; outputs are fresh (not views of the inputs), and a
    strided delta (a slice of a wider tensor) works."""
    from hybridkit.kernels.config import kernel_config

    g = torch.Generator().manual_seed(len(shape))
    h = torch.randn(shape, generator=g).to(DEVICE)
    wide = torch.randn((*shape[:-1], shape[-1] + 5), generator=g).to(DEVICE)
    delta = wide[..., 2 : 2 + shape[-1]]
    w = torch.randn(shape[-1], generator=g).to(DEVICE)
    with torch.no_grad(), kernel_config(fused_add_norm=True):
        s, out = norm_ops.add_rms_norm(h, delta, w, 1e-5, backend="triton")
    want_s = h + delta
    assert torch.equal(s, want_s) and s.shape == h.shape and s.data_ptr() != h.data_ptr()
    want = rms_norm_reference(want_s.double(), w.double(), 1e-5)
    assert rel_err(out, want) < 1e-6


@pytest.mark.triton
def test_add_norm_runs_the_two_ops_unless_inference_with_the_setting_on(monkeypatch):
    """Off by the setting, under autograd without ``train_norms`` and on the torch backend:
    h + delta, then rms_norm."""
    from hybridkit.kernels.config import kernel_config
    from hybridkit.kernels.norm import triton_kernels

    def fail(*args, **kwargs):
        raise AssertionError("the fused kernel ran")

    monkeypatch.setattr(triton_kernels, "add_norm_forward", fail)
    h, delta, w = torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)
    for setting, grad, backend in ((False, False, "triton"), (True, True, "triton"),
                                   (True, False, "torch")):  # fmt: skip
        hh = h.clone().requires_grad_(grad)
        # training has its own setting (train_norms, the tests below)
        with kernel_config(fused_add_norm=setting, train_norms=False):
            s, out = norm_ops.add_rms_norm(hh, delta, w, 1e-5, backend=backend)
        assert torch.allclose(s, h + delta)
    fused_on = kernel_config(fused_add_norm=True)
    with pytest.raises(AssertionError, match="fused kernel ran"), torch.no_grad(), fused_on:
        norm_ops.add_rms_norm(h, delta, w, 1e-5, backend="triton")


@pytest.mark.triton
def test_decode_with_the_fused_add_norm_equals_decode_without(monkeypatch):
    """A tiny hybrid's prefill and decode steps with every residual add fused into the norm after
    it (norms forced to the Triton backend, interpreter): the logits of the unfused steps.
    (Decoding equals the forward without a cache: ``tests/test_generation.py``.)"""
    from hybridkit import build_model
    from hybridkit.kernels.config import kernel_config
    from hybridkit.kernels.norm import triton_kernels
    from tests.helpers import attn_block, mamba_block, tiny_recipe

    calls = []
    real = triton_kernels.add_norm_forward
    monkeypatch.setattr(triton_kernels, "add_norm_forward", lambda *a: calls.append(1) or real(*a))

    m, a = mamba_block(outproj_norm="grouped_pregate"), attn_block()
    model = build_model(tiny_recipe("m a", d_model=16, vocab=32, m=m, a=a), seed=0).eval()
    _set_norm_backend(model, "triton")
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))

    def logits():
        cache = model.allocate_cache(2, 8)
        with torch.no_grad():
            model(ids, cache=cache)
            return torch.stack([model.step(ids[:, i], cache) for i in range(3)])

    with kernel_config(fused_add_norm=False):
        plain = logits()
    assert not calls
    with kernel_config(fused_add_norm=True):
        fused = logits()
    assert len(calls) == 4 * 4  # 3 adds in the blocks + 1 into the final norm; prefill + 3 steps
    assert rel_err(fused, plain) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 128, 16384])
def test_gpu_add_norm_at_model_shapes(rows):
    """bf16 on the GPU at the 400M model's width: the sum bitwise torch's, the norm within bf16
    rounding of the float64 formula (the unfused Triton norm's tolerance)."""
    from hybridkit.kernels.config import kernel_config

    h = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), kernel_config(fused_add_norm=True):
        s, out = norm_ops.add_rms_norm(h, delta, w, 1e-5)
    assert torch.equal(s, h + delta)
    want = rms_norm_reference((h + delta).double(), w.double(), 1e-5)
    assert rel_err(out, want) < 1e-2


# --- the residual add and the next pre-norm in one launch each way (eager training) ------------
@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every float tensor ``torch.empty`` / ``empty_like`` returns holds NaN: the fused add +
    norm allocates its sum, output and rstd inside the launch helpers."""
    for name in ("empty", "empty_like"):
        real = getattr(torch, name)

        def poisoned(*args, _real=real, **kwargs):
            t = _real(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        monkeypatch.setattr(torch, name, poisoned)


def _add_norm_case(shape, delta_dtype, seed):
    """h (float32), delta (``delta_dtype``, a strided slice), w, and the gradients fed to the
    sum and to the normed output, as float64 originals and device leaves."""
    g = torch.Generator().manual_seed(seed)
    h64 = torch.randn(shape, generator=g, dtype=F64)
    wide64 = torch.randn((*shape[:-1], shape[-1] + 3), generator=g, dtype=F64)
    w64 = 1 + 0.1 * torch.randn(shape[-1], generator=g, dtype=F64)
    ds64 = torch.randn(shape, generator=g, dtype=F64)
    dout64 = torch.randn(shape, generator=g, dtype=F64)
    wide = wide64.to(DEVICE, delta_dtype).requires_grad_()
    return h64, wide64, w64, ds64, dout64, _leaf(h64), wide, _leaf(w64)


@pytest.mark.triton
@pytest.mark.parametrize(
    ("shape", "delta_dtype", "out_dtype"),
    [((2, 3, 24), torch.bfloat16, torch.bfloat16), ((5, 33), torch.float32, None),
     ((1, 1, 7), torch.bfloat16, None)],
)  # fmt: skip
def test_training_add_norm_matches_float64(shape, delta_dtype, out_dtype, poisoned_allocations):
    """``add_rms_norm`` under autograd with ``train_norms``: one forward kernel (the sum as
    torch's add rounds it, the norm in ``out_dtype``) and one backward kernel, whose h gradient
    is the sum's gradient plus the norm's (float32) and whose delta gradient is the same in
    delta's dtype; against float64 autograd of the two ops, every buffer poisoned first."""
    from hybridkit.kernels.config import kernel_config
    from hybridkit.kernels.norm import triton_kernels

    calls = []
    real = triton_kernels.add_norm_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_kernels, "add_norm_forward", lambda *a: calls.append(a) or real(*a))
        from hybridkit.kernels.norm import op

        mp.setattr(op, "add_norm_forward", triton_kernels.add_norm_forward)
        h64, wide64, w64, ds64, dout64, h, wide, w = _add_norm_case(shape, delta_dtype, 3)
        delta = wide[..., 1 : 1 + shape[-1]]
        with kernel_config(train_norms=True):
            s, out = norm_ops.add_rms_norm(h, delta, w, 1e-5, backend="triton", out_dtype=out_dtype)
    assert len(calls) == 1 and calls[0][-1] is not None  # the rstd for the backward
    assert s.dtype == torch.float32 and out.dtype == (out_dtype or torch.float32)
    assert torch.equal(s, h.detach() + delta.detach())
    leaves = [t.clone().requires_grad_() for t in (h64, wide64, w64)]
    s64 = leaves[0] + leaves[1].to(delta_dtype).double()[..., 1 : 1 + shape[-1]]
    out64 = rms_norm_reference(s64, leaves[2], 1e-5)
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, out64) < (1e-2 if out_dtype == torch.bfloat16 else 1e-6)
    got = torch.autograd.grad((s, out), (h, wide, w), (ds64.float(), dout64.to(out.dtype)))
    want = torch.autograd.grad((s64, out64), leaves, (ds64, dout64.to(out.dtype).double()))
    dh, dwide, dw = got
    assert all(torch.isfinite(g.float()).all() for g in got)
    assert rel_err(dh, want[0]) < 1e-5 and rel_err(dw, want[2]) < 1e-5
    d_delta = dwide[..., 1 : 1 + shape[-1]]
    # the same values rounded to delta's dtype (the interpreter's bf16 casts truncate; the GPU
    # test checks the rounding bit for bit)
    assert d_delta.dtype == delta_dtype and rel_err(d_delta, dh) < 1e-2
    assert not dwide[..., 0].any() and not dwide[..., 1 + shape[-1] :].any()


@pytest.mark.triton
def test_training_add_norm_dispatch_rules(monkeypatch):
    """The fused training pair runs only with autograd on, ``train_norms`` on, the Triton
    backend, equal shapes and a sum that keeps h's dtype (bf16 h + float32 delta is float32 in
    torch: the two ops run)."""
    from hybridkit.kernels.config import kernel_config
    from hybridkit.kernels.norm import op

    calls = []
    monkeypatch.setattr(op.FusedAddNormFunction, "apply", lambda *a: calls.append(a) or a[:2])
    h = torch.randn(2, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE)
    on = {"train_norms": True}
    cases = [  # (delta, settings, backend, fused)
        (torch.randn(2, 8, device=DEVICE), on, "triton", True),
        (torch.randn(2, 8, device=DEVICE), {}, "triton", True),  # on by default
        (torch.randn(2, 8, device=DEVICE), {"train_norms": False}, "triton", False),
        (torch.randn(2, 8, device=DEVICE), on, "torch", False),
        (torch.randn(1, 8, device=DEVICE), on, "triton", False),
    ]
    for delta, settings, backend, fused in cases:
        calls.clear()
        with kernel_config(**settings):
            norm_ops.add_rms_norm(h, delta, w, 1e-5, backend=backend)
        assert bool(calls) == fused, (settings, backend, delta.shape)
    calls.clear()
    hb = h.detach().bfloat16().requires_grad_()
    with kernel_config(**on):
        delta = torch.randn(2, 8, device=DEVICE)
        s, _ = norm_ops.add_rms_norm(hb, delta, w, 1e-5, backend="triton")
    assert not calls and s.dtype == torch.float32


def test_projection_dtype_follows_autocast_and_the_setting():
    from hybridkit.kernels.config import kernel_config

    x = torch.randn(2, 4)
    assert norm_ops.projection_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm_ops.projection_dtype(x) == torch.bfloat16  # on by default
        assert norm_ops.projection_dtype(x, torch.float16) == torch.bfloat16
        assert norm_ops.projection_dtype(x.double()) == torch.float64
        with torch.no_grad():  # inference keeps the dtype it was timed with
            assert norm_ops.projection_dtype(x) == torch.float32
        with kernel_config(train_norms=False):
            assert norm_ops.projection_dtype(x) == torch.float32


def test_projection_dtype_keeps_the_dtype_under_compile():
    """Compiled, the norms keep their dtype (Inductor fuses the cast into the norm itself, and
    the compiled step stays the graph that was timed)."""

    def fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return x * 2, norm_ops.projection_dtype(x) == torch.bfloat16

    _, narrowed = torch.compile(fn, fullgraph=True, backend="eager")(torch.randn(2, 4))
    assert not narrowed
    assert fn(torch.randn(2, 4))[1]  # eager: the autocast dtype


def _train_step(model, ids, settings, autocast):
    from hybridkit.kernels.config import kernel_config

    model.zero_grad()
    with kernel_config(**settings), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = model(ids, targets=ids)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.triton
def test_model_training_with_train_norms_matches_without(monkeypatch):
    """A tiny hybrid trained one step with its norms on the kernels: ``train_norms`` on (every
    residual add fused with the norm after it, the adds carried across blocks, each a kernel
    pair) gives the loss and gradients of the unfused ops, and runs the fused pair once per add
    (4 parts in 2 blocks: 3 adds, and 1 into the final norm)."""
    from hybridkit import build_model
    from hybridkit.kernels.norm import op
    from tests.helpers import attn_block, mamba_block, tiny_recipe

    calls = []
    real = op.FusedAddNormFunction.apply
    monkeypatch.setattr(op.FusedAddNormFunction, "apply", lambda *a: calls.append(1) or real(*a))
    m, a = mamba_block(outproj_norm="grouped_pregate"), attn_block(qk_norm=True)
    model = build_model(tiny_recipe("m a", d_model=16, vocab=32, m=m, a=a), seed=0)
    _set_norm_backend(model, "triton")
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))
    l_off, g_off = _train_step(model, ids, {"train_norms": False}, False)
    assert not calls
    l_on, g_on = _train_step(model, ids, {"train_norms": True}, False)
    assert len(calls) == 4
    assert rel_err(l_on, l_off) < 1e-6
    for got, want in zip(g_on, g_off, strict=True):
        assert rel_err(got, want) < 1e-5


def test_model_under_autocast_same_with_norms_in_the_projection_dtype():
    """On the torch path under CPU bf16 autocast: the norms storing their outputs in bf16 (what
    the projections cast them to) give the very loss and gradients of float32 outputs cast by
    autocast; only the passes over memory differ."""
    from hybridkit import build_model
    from tests.helpers import attn_block, mamba_block, tiny_recipe

    m, a = mamba_block(outproj_norm="grouped_pregate"), attn_block(qk_norm=True)
    model = build_model(tiny_recipe("m a m", d_model=16, vocab=32, m=m, a=a), seed=0)
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(2))
    l_off, g_off = _train_step(model, ids, {"train_norms": False}, True)
    l_on, g_on = _train_step(model, ids, {"train_norms": True}, True)
    assert torch.equal(l_on, l_off)
    for got, want in zip(g_on, g_off, strict=True):
        assert rel_err(got, want) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [16384, 1000])
def test_gpu_training_add_norm_at_model_shapes(rows):
    """The 400M model's residual stream under bf16 autocast (h float32, delta bf16, output
    bf16): sum bitwise torch's, output and gradients against float64 autograd of the two ops."""
    from hybridkit.kernels.config import kernel_config

    g = torch.Generator(device="cuda").manual_seed(rows)
    h64 = torch.randn(rows, 1024, device="cuda", dtype=F64, generator=g)
    d64 = torch.randn(rows, 1024, device="cuda", dtype=F64, generator=g)
    w64 = 1 + 0.1 * torch.randn(1024, device="cuda", dtype=F64, generator=g)
    h, w = h64.float().requires_grad_(), w64.float().requires_grad_()
    delta = d64.bfloat16().requires_grad_()
    with kernel_config(train_norms=True):
        s, out = norm_ops.add_rms_norm(h, delta, w, 1e-5, out_dtype=torch.bfloat16)
    assert torch.equal(s, h.detach() + delta.detach()) and out.dtype == torch.bfloat16
    leaves = [t.detach().double().requires_grad_() for t in (h, delta, w)]
    s64 = leaves[0] + leaves[1]
    out64 = rms_norm_reference(s64, leaves[2], 1e-5)
    assert rel_err(out, out64) < 1e-2
    ds = torch.randn(rows, 1024, device="cuda", generator=g)
    dout = torch.randn(rows, 1024, device="cuda", generator=g).bfloat16()
    got = torch.autograd.grad((s, out), (h, delta, w), (ds, dout))
    want = torch.autograd.grad((s64, out64), leaves, (ds.double(), dout.double()))
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[2], want[2]) < 1e-4
    assert torch.equal(got[1], got[0].bfloat16())


@pytest.mark.gpu
def test_gpu_model_training_with_train_norms_matches_without():
    """A small hybrid's eager bf16-autocast training step with ``train_norms`` on and off: the
    same loss and gradients within bf16 noise (the kernels differ only in what they fuse)."""
    from hybridkit import build_model
    from hybridkit.kernels.config import kernel_config
    from tests.helpers import attn_block, mamba_block, tiny_recipe

    m = mamba_block(outproj_norm="grouped_pregate", d_state=32, headdim=32, chunk_size=64)
    recipe = tiny_recipe("m a m", d_model=128, vocab=256, m=m, a=attn_block(qk_norm=True))
    model = build_model(recipe, seed=0).cuda()
    ids = torch.randint(0, 256, (2, 512), device="cuda")
    results = []
    for on in (False, True):
        model.zero_grad()
        with kernel_config(train_norms=on), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, targets=ids)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l_off, g_off), (l_on, g_on) = results
    assert rel_err(l_on, l_off) < 1e-3
    for got, want in zip(g_on, g_off, strict=True):
        assert torch.isfinite(got).all() and rel_err(got, want) < 2e-2
