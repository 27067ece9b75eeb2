"""The fused MIMO output kernels (``hybridkit.kernels.mamba3.output``) against the float64 torch
formula, and the layer that uses them.

CPU CI runs the unmarked tests under ``TRITON_INTERPRET=1`` at tiny shapes, with the kernels'
output buffers poisoned with NaN first so that an unwritten element cannot pass; ``pytest -m
gpu`` runs the 400M model's shapes in bf16, a compiled MIMO model, and the dispatch on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hybridkit.kernels.config import kernel_config  # noqa: E402
from hybridkit.kernels.mamba3.output import (  # noqa: E402
    mimo_output,
    plan_mimo_output,
    tile,
)
from tests.helpers import rel_err, set_launch  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poisoned_empty(monkeypatch):
    """The kernels' outputs (out, dy, dz) hold NaN until the kernels write them."""
    from hybridkit.kernels.mamba3.output import op

    real_forward, real_backward = op.mimo_output_forward, op.mimo_output_backward

    def forward(y, z, mz, mo, weight, out, *rest):
        out.fill_(float("nan"))
        return real_forward(y, z, mz, mo, weight, out, *rest)

    def backward(dout, y, z, mz, mo, weight, dy, dz, *rest):
        dy.fill_(float("nan")), dz.fill_(float("nan"))
        return real_backward(dout, y, z, mz, mo, weight, dy, dz, *rest)

    monkeypatch.setattr(op, "mimo_output_forward", forward)
    monkeypatch.setattr(op, "mimo_output_backward", backward)


def _inputs(B, L, R, H, P, *, pad=5, device="cpu", seed=0):
    """float64 leaves: y (B, L, R, H, P), a projection whose slice is z, mimo_z, mimo_o and a
    norm weight, all away from their inits so every term matters."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return [
        rnd(B, L, R, H, P).to(device),
        rnd(B, L, H * P + 2 * pad).to(device),  # z = proj[..., pad : pad + H * P]
        (1 + 0.3 * rnd(H, R, P)).to(device),
        (rnd(H, R, P) / R).to(device),
        (1 + 0.2 * rnd(H * P)).to(device),
    ]


def _run(leaves, shape, *, group, mode, backend, pad=5):
    y, proj, mz, mo, w = leaves
    B, L, R, H, P = shape
    z = proj[..., pad : pad + H * P].reshape(B, L, H, P)  # strided, as in_proj's split gives it
    return mimo_output(y, z, mz, mo, w, group_size=group, eps=1e-5, mode=mode, backend=backend)


def _check(shape, group, mode, dtype=torch.float32, device="cpu", tol=1e-5, seed=0):
    base = _inputs(*shape, device=device, seed=seed)
    ref_leaves = [t.clone().requires_grad_() for t in base]
    got_leaves = [
        t.to(dtype if i < 2 else torch.float32).requires_grad_() for i, t in enumerate(base)
    ]
    ref = _run(ref_leaves, shape, group=group, mode=mode, backend="torch")
    got = _run(got_leaves, shape, group=group, mode=mode, backend="triton")
    assert got.dtype == dtype and got.shape == ref.shape and torch.isfinite(got).all()
    assert rel_err(got, ref) < tol
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    dout = dout.to(device)
    want = torch.autograd.grad(ref, ref_leaves, dout, allow_unused=True)
    have = torch.autograd.grad(got, got_leaves, dout.to(dtype), allow_unused=True)
    names = ("y", "z", "mimo_z", "mimo_o", "weight")
    for name, a, b in zip(names, have, want, strict=True):
        if mode == "none" and name == "weight":
            assert a is None and b is None
            continue
        assert a.dtype == got_leaves[names.index(name)].dtype, name
        assert torch.isfinite(a).all() and rel_err(a, b) < tol, (name, rel_err(a, b))


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["none", "pregate", "postgate"])
@pytest.mark.parametrize(
    ("shape", "group"),
    [((2, 5, 2, 3, 8), 8), ((1, 7, 4, 2, 8), 16), ((2, 3, 8, 2, 4), 4), ((1, 4, 4, 3, 5), 5),
     ((1, 1, 2, 2, 8), 16)],
)  # fmt: skip
def test_matches_float64(shape, group, mode, poisoned_empty):
    """Per-head and whole-width groups, a group that is not a power of two, one token, ranks
    2 / 4 / 8, every norm placement: output and every gradient."""
    _check(shape, group, mode)


@pytest.mark.triton
@pytest.mark.parametrize("rank", [2, 4, 8])
def test_the_model_group_width(rank, poisoned_empty):
    """Groups of 64 channels (the 400M model's heads): the tiles the GPU runs, (16 / 8 / 4)
    tokens forward and (8 / 4 / 2) backward, over a token count no tile divides."""
    _check((1, 37, rank, 2, 64), 64, "postgate")


@pytest.mark.triton
def test_bf16_inputs_return_bf16_within_its_precision(poisoned_empty):
    _check((2, 6, 4, 2, 8), 8, "pregate", dtype=torch.bfloat16, tol=2e-2)


def test_empty_sequence():
    leaves = [t.float().requires_grad_() for t in _inputs(2, 0, 2, 2, 4)]
    out = _run(leaves, (2, 0, 2, 2, 4), group=4, mode="pregate", backend="triton")
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert all(torch.all(t.grad == 0) for t in leaves)


@pytest.mark.triton
def test_dispatch_rules_and_errors():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert plan_mimo_output("auto", device=cpu, dtype=torch.float32, rank=4, group_size=64)[0] == (
        "torch"
    )
    assert plan_mimo_output("triton", device=cpu, dtype=torch.float32, rank=4, group_size=64) == (
        "triton",
        "",
    )
    with kernel_config(mimo_output=True):
        on = plan_mimo_output("auto", device=cuda, dtype=torch.bfloat16, rank=4, group_size=64)
        for rank, group in ((3, 64), (4, 2048)):
            chosen, why = plan_mimo_output(
                "auto", device=cuda, dtype=torch.bfloat16, rank=rank, group_size=group
            )
            assert chosen == "torch" and "does not fit" in why, (rank, group)
        wide = plan_mimo_output("auto", device=cuda, dtype=F64, rank=4, group_size=64)
    assert on == ("triton", "") and wide[0] == "torch"
    assert plan_mimo_output(  # on by default
        "auto", device=cuda, dtype=torch.bfloat16, rank=4, group_size=64
    ) == ("triton", "")
    with kernel_config(mimo_output=False):
        chosen, why = plan_mimo_output(
            "auto", device=cuda, dtype=torch.bfloat16, rank=4, group_size=64
        )
    assert chosen == "torch" and "mimo_output=0" in why
    assert tile(4, 64) == (8, 64) and tile(2, 5) == (128, 8) and tile(8, 512) is None
    with pytest.raises(ValueError, match="allowed: auto, torch, triton"):
        plan_mimo_output("cuda", device=cpu, dtype=torch.float32, rank=2, group_size=8)
    for dtype, rank, group in ((torch.float32, 3, 64), (torch.float32, 4, 2048), (F64, 2, 8)):
        with pytest.raises(ValueError, match="the Triton kernels cannot run this call"):
            plan_mimo_output("triton", device=cpu, dtype=dtype, rank=rank, group_size=group)
    y, proj, mz, mo, w = _inputs(1, 3, 2, 2, 4)
    z = proj[..., 5:13].reshape(1, 3, 2, 4)
    with pytest.raises(ValueError, match="allowed: none, pregate, postgate"):
        mimo_output(y, z, mz, mo, w, group_size=4, eps=1e-5, mode="grouped")
    with pytest.raises(ValueError, match="do not agree"):
        mimo_output(y, z, mz[:, :1], mo, w, group_size=4, eps=1e-5, mode="none")
    with pytest.raises(ValueError, match="needs a weight"):
        mimo_output(y, z, mz, mo, None, group_size=4, eps=1e-5, mode="postgate")
    with pytest.raises(ValueError, match="a group dividing 8 .got 3."):
        mimo_output(y, z, mz, mo, w, group_size=3, eps=1e-5, mode="pregate")
    with pytest.raises(ValueError, match="eps > 0 .got 0.0."):
        mimo_output(y, z, mz, mo, w, group_size=4, eps=0.0, mode="pregate")


@pytest.mark.triton
@pytest.mark.parametrize("on", [False, True])
def test_the_dispatch_on_cuda_traces_fullgraph(on):
    """A MIMO layer plans its output on every forward; on CUDA that reads the ``mimo_output``
    setting, which Dynamo cannot trace from the ``ContextVar``: it broke a compiled MIMO model's
    graph at every layer (the H100 run of 2026-12-06). The plan must be a trace-time constant."""
    torch._dynamo.reset()
    cuda = torch.device("cuda")

    def fn(x):
        chosen, _ = plan_mimo_output(
            "auto", device=cuda, dtype=torch.bfloat16, rank=4, group_size=64
        )  # fmt: skip
        return x + (1 if chosen == "triton" else 2)

    with kernel_config(mimo_output=on):
        out = torch.compile(fn, fullgraph=True, backend="eager")(torch.zeros(2))
    assert out.tolist() == ([1.0, 1.0] if on else [2.0, 2.0])


@pytest.mark.triton
@pytest.mark.parametrize("group", [3, 5, 16, 2048])
def test_without_a_norm_the_group_is_ignored(group, poisoned_empty):
    """``mode="none"`` has no group: whatever the caller passes, the kernels tile by heads (a
    group not dividing H * P left channels unwritten, a wider one launched no program)."""
    shape = (1, 5, 4, 2, 4)
    leaves = [t.float() for t in _inputs(*shape)]
    got = _run(leaves, shape, group=group, mode="none", backend="triton")
    want = _run([t.double() for t in leaves], shape, group=group, mode="none", backend="torch")
    assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5


@pytest.mark.triton
def test_custom_op_fake_impls_match_the_real_ones():
    """``torch.library.opcheck``: fake shapes / strides / dtypes, autograd registration, schema;
    z a strided slice as the layer passes it."""
    from hybridkit.kernels.mamba3.output import op  # noqa: F401 (registers the ops)

    y, proj, mz, mo, w = (t.float().to(DEVICE) for t in _inputs(1, 3, 2, 2, 4))
    z = proj[..., 5:13].reshape(1, 3, 2, 4)
    mz2 = mz.transpose(0, 1).reshape(2, 8).contiguous()
    mo2 = mo.transpose(0, 1).reshape(2, 8).contiguous()
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    for weight, norm in ((w, 1), (None, 0)):
        args = [t.requires_grad_() if t is not None else None for t in (y, z, mz2, mo2, weight)]
        args = (*args, 4, 1e-5, norm)
        torch.library.opcheck(torch.ops.hybridkit.mimo_output_fwd.default, args, test_utils=checks)


@pytest.mark.triton
def test_compiles_fullgraph_with_the_custom_op():
    torch._dynamo.reset()
    leaves = [t.float().requires_grad_() for t in _inputs(1, 3, 4, 2, 4)]

    def fn(*ls):
        return _run(ls, (1, 3, 4, 2, 4), group=4, mode="postgate", backend="triton")

    eager = fn(*leaves)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    assert rel_err(compiled, eager) < 1e-6
    dout = torch.randn(eager.shape)
    for a, b in zip(
        torch.autograd.grad(compiled, leaves, dout),
        torch.autograd.grad(eager, leaves, dout),
        strict=True,
    ):
        assert rel_err(a, b) < 1e-6


@pytest.mark.triton
@pytest.mark.parametrize("norm", ["none", "grouped_pregate", "postgate"])
def test_layer_with_the_kernels_matches_the_torch_output(norm, monkeypatch):
    """A MIMO layer's output and every parameter gradient, with its output through the kernels
    and through the torch formula (the scan on the chunked path both times)."""
    from hybridkit.layers.mamba3 import Mamba3, Mamba3Spec

    spec = Mamba3Spec(d_state=8, headdim=8, mimo_rank=2, outproj_norm=norm, backend="chunked")
    layer = Mamba3(spec, d_model=16, layer_idx=0)
    with torch.no_grad():  # away from the inits (ones, 1/R), so every term is exercised
        for p in (layer.mimo_z, layer.mimo_o) + ((layer.norm.weight,) if layer.norm else ()):
            p.add_(0.2 * torch.randn(p.shape))
    u = torch.randn(2, 9, 16)
    results = {}
    for backend in ("torch", "triton"):
        opts = layer._mimo_output_options()
        monkeypatch.setattr(
            layer, "_mimo_output_options", lambda o=opts, b=backend: {**o, "backend": b}
        )
        layer.zero_grad()
        out = layer(u)
        out.square().sum().backward()
        results[backend] = (out.detach(), [p.grad.clone() for p in layer.parameters()])
    (o_ref, g_ref), (o_got, g_got) = results["torch"], results["triton"]
    assert rel_err(o_got, o_ref) < 1e-5
    for got, want in zip(g_got, g_ref, strict=True):
        assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize(
    ("norm", "rank", "kernels"),
    [("none", 4, True), ("postgate", 4, False), ("grouped_pregate", 3, False),
     ("grouped_postgate", 2, True)],
)  # fmt: skip
@pytest.mark.triton
def test_layers_asking_for_triton_run_the_kernels_where_they_fit(norm, rank, kernels):
    """A layer whose ``backend`` is ``triton``: its output through the kernels when they fit it
    (no norm: tiles of a head), else the torch formula (a whole-width norm wider than a tile,
    rank 3), never an error; the result as the chunked layer's."""
    from hybridkit.layers.mamba3 import Mamba3, Mamba3Spec

    spec = dict(d_state=8, headdim=16, mimo_rank=rank, outproj_norm=norm)
    ref = Mamba3(Mamba3Spec(**spec, backend="chunked"), d_model=768, layer_idx=0)
    layer = Mamba3(Mamba3Spec(**spec, backend="triton"), d_model=768, layer_idx=0)
    layer.load_state_dict(ref.state_dict())
    opts = layer._mimo_output_options()
    assert opts["backend"] == ("triton" if kernels else "torch"), opts
    y = torch.randn(1, 3, rank, layer.nheads, 16)
    z = torch.randn(1, 3, layer.nheads, 16)
    assert rel_err(layer.output(y, z), ref.output(y, z)) < 1e-5


def test_show_reports_the_output_path():
    from hybridkit.layers.mamba3 import Mamba3, Mamba3Spec

    layer = Mamba3(Mamba3Spec(d_state=8, headdim=8, mimo_rank=2), d_model=16, layer_idx=0)
    assert layer.backends("cpu", torch.float32, 64)["mamba3 MIMO output"] == "torch"
    siso = Mamba3(Mamba3Spec(d_state=8, headdim=8), d_model=16, layer_idx=0)
    assert "mamba3 MIMO output" not in siso.backends("cpu", torch.float32, 64)


#: launches other than the defaults that ``benchmarks/mimo_output.py`` sweeps: each must be
#: right, not only fast (the tile sizes matter on the CPU too, the warps only on a GPU)
LAUNCHES = {  # (fwd elements, fwd warps, bwd elements, bwd warps, bwd programs per SM)
    "first": (2048, 8, 512, 8, 6),
    "small": (1024, 1, 256, 1, 24),
    "wide": (4096, 4, 1024, 4, 12),
    "one_warp": (2048, 1, 256, 1, 6),  # the fastest backward of the 2026-12-06 H100 sweep
    "former": (2048, 2, 256, 2, 6),  # the defaults before that sweep
}


@pytest.mark.triton
@pytest.mark.parametrize("launch", sorted(LAUNCHES))
@pytest.mark.parametrize("mode", ["pregate", "postgate"])
def test_other_launches_match_float64(launch, mode, monkeypatch, poisoned_empty):
    """Tiles of several tokens and of one, rank 4 and 8, a group that is not a power of two."""
    from hybridkit.kernels.mamba3.output import triton_kernels

    set_launch(monkeypatch, triton_kernels, LAUNCHES[launch])
    _check((2, 9, 4, 2, 8), 8, mode)
    _check((1, 5, 8, 2, 6), 6, mode)


# --- GPU: the 400M model's shapes in bf16, a compiled MIMO model ----------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("launch", sorted(LAUNCHES))
@pytest.mark.parametrize("mode", ["pregate", "postgate"])
def test_gpu_other_launches(launch, mode, monkeypatch):
    from hybridkit.kernels.mamba3.output import triton_kernels

    set_launch(monkeypatch, triton_kernels, LAUNCHES[launch])
    _check((2, 1024, 4, 32, 64), 64, mode, dtype=torch.bfloat16, device="cuda", tol=1e-2)
    _check((1, 333, 8, 32, 64), 256, mode, dtype=torch.float32, device="cuda", tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "pregate", "postgate"])
@pytest.mark.parametrize(("rank", "group"), [(4, 64), (2, 64), (8, 64), (4, 256)])
def test_gpu_model_shapes(rank, group, mode):
    _check((2, 1024, rank, 32, 64), group, mode, dtype=torch.bfloat16, device="cuda", tol=1e-2)
    _check((1, 333, rank, 32, 64), group, mode, dtype=torch.float32, device="cuda", tol=1e-5)


@pytest.mark.gpu
def test_gpu_compiled_mimo_model_matches_the_torch_output():
    """A compiled MIMO hybrid with the output kernels: loss and gradients as with the torch
    formula (mimo_output=0), bf16 autocast."""
    from hybridkit import build_model
    from tests.helpers import attn_block, mamba_block, tiny_recipe

    m = mamba_block(mimo_rank=4, outproj_norm="grouped_pregate", d_state=32, headdim=32,
                    chunk_size=16)  # fmt: skip
    recipe = tiny_recipe("m a", d_model=64, vocab=128, m=m, a=attn_block())
    ids = torch.randint(0, 128, (2, 256), device="cuda")
    results = []
    for on in (False, True):
        torch._dynamo.reset()
        model = build_model(recipe, seed=0).cuda()
        with kernel_config(mimo_output=on), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.compile(model, fullgraph=True)(ids, targets=ids)
            loss.backward()
        results.append((loss.item(), [p.grad.float().clone() for p in model.parameters()]))
    (l_ref, g_ref), (l_got, g_got) = results
    assert abs(l_got - l_ref) < 1e-2 * abs(l_ref)
    for got, want in zip(g_got, g_ref, strict=True):
        assert rel_err(got, want) < 5e-2
