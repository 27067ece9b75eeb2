"""The few-row linear kernel (``hybridkit/kernels/linear``): against ``F.linear`` through the
Triton interpreter (fp32, exact products), the dispatch rules (only inference calls of <= 16 rows
with ``skinny_linear`` on), a decode step through it equal to one without it, and ``-m gpu`` the
bf16 kernel at the 400M model's shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridkit import kernels
from hybridkit.kernels import config
from hybridkit.kernels.linear import linear, resolve_backend
from hybridkit.layers.linear import Linear
from tests.helpers import set_launch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.triton
@pytest.mark.parametrize(
    "m,k,n,bias",
    [
        (1, 64, 16, False),
        (1, 700, 1030, True),  # the one-row kernel: K and N past its 512 x 8 tile, bias
        (5, 300, 40, True),
        (16, 256, 8200, False),
        (3, 17, 33, True),
    ],
)
def test_kernel_matches_f_linear(m, k, n, bias):
    """fp32 through the interpreter: rows, K and N not multiples of the tiles, bias or not, x a
    row-strided view (a slice of a wider tensor); the output is poisoned-free (fresh) and
    matches F.linear to fp32 rounding."""
    from hybridkit.kernels.linear.triton_kernels import skinny_linear

    gen = torch.Generator().manual_seed(m * 1000 + n)
    wide = torch.randn(m, k + 7, generator=gen)
    x = wide[:, 3 : 3 + k]  # row stride k + 7, unit column stride
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    got = skinny_linear(x, w, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (m, n) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.triton
@pytest.mark.parametrize("m", [1, 5])
def test_kernel_in_half_precision(m):
    """fp16 through the interpreter (its bf16 dot is not exact, fp16's is): the tensor-core
    branch of the 16-row kernel and the one-row kernel, within fp16 rounding of the output."""
    from hybridkit.kernels.linear.triton_kernels import skinny_linear

    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 300, generator=gen).half()
    w = (torch.randn(40, 300, generator=gen) / 300**0.5).half()
    b = torch.randn(40, generator=gen).half()
    got = skinny_linear(x, w, b)
    want = F.linear(x.double(), w.double(), b.double())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.triton
@pytest.mark.parametrize(
    "m,bias,dtype",
    [
        (1, True, torch.float32),
        (5, False, torch.float32),
        (3, True, torch.float16),
        (1, False, torch.float16),
    ],
)
def test_glu_kernel_matches_linear_then_swiglu(m, bias, dtype):
    """``glu=True``: the product's halves [value | gate] leave as value * silu(gate), each half
    rounded to the dtype first (as F.linear stores them), F = 37 (not a tile multiple)."""
    from hybridkit.kernels.linear.triton_kernels import skinny_linear

    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 70, generator=gen).to(dtype)
    w = (torch.randn(74, 70, generator=gen) / 70**0.5).to(dtype)
    b = torch.randn(74, generator=gen).to(dtype) if bias else None
    got = skinny_linear(x, w, b, glu=True)
    value, gate = F.linear(x.double(), w.double(), None if b is None else b.double()).chunk(2, -1)
    value, gate = value.to(dtype).double(), gate.to(dtype).double()
    want = value * F.silu(gate)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert got.shape == (m, 37) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="even number of rows"):
        skinny_linear(x, w[:73], None, glu=True)


@pytest.mark.triton
@pytest.mark.parametrize(
    "m,k,n,glu,dtype",
    [
        (1, 700, 40, False, torch.float32),  # one row, K past two of its 512 tiles
        (1, 70, 74, True, torch.float32),
        (5, 300, 33, False, torch.float32),  # 16-row kernel, K past its 256 tile
        (16, 64, 74, True, torch.float32),
        (3, 300, 40, False, torch.float16),
    ],
)
def test_prenorm_kernel_matches_add_norm_then_linear(m, k, n, glu, dtype):
    """``prenorm``: the product of ``rms_norm(h + delta) * w`` and the sum ``h + delta`` (the
    new residual, stored by one program, rounded like torch's add), against the add, the
    float64 norm and F.linear (then SwiGLU with ``glu``); h and delta row-strided views."""
    from hybridkit.kernels.linear.triton_kernels import skinny_linear
    from hybridkit.layers.norm import rms_norm

    gen = torch.Generator().manual_seed(m * 100 + k)
    h = torch.randn(m, k + 5, generator=gen).to(dtype)[:, 2 : 2 + k]
    delta = torch.randn(m, k + 3, generator=gen).to(dtype)[:, 1 : 1 + k]
    norm_w = (1.0 + 0.3 * torch.randn(k, generator=gen)).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    s, got = skinny_linear(delta, w, b, glu=glu, prenorm=(h, norm_w, 1e-5))
    assert torch.equal(s, h + delta) and s.is_contiguous()
    x = rms_norm((h + delta).double(), norm_w.double(), 1e-5)
    want = F.linear(x, w.double(), b.double())
    if glu:
        value, gate = want.chunk(2, -1)
        want = value * F.silu(gate)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert got.shape == (m, n // 2 if glu else n) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="prenorm"):
        skinny_linear(delta, w, b, prenorm=(h[:, 1:], norm_w[1:], 1e-5))


#: launches other than the defaults that ``benchmarks/skinny_linear.py --sweep`` times, as the
#: module constants they set: each must be right, not only fast (tile sizes matter in the
#: interpreter too; warps and stages only on a GPU, where the interpreter's 1 / 1 do not apply)
LAUNCHES = {
    "narrow": dict(GEMV_BLOCK_N=4, GEMV_BLOCK_K=256, GEMV_WARPS=2, BLOCK_K=128, WARPS=2),
    "wide": dict(GEMV_BLOCK_N=16, GEMV_BLOCK_K=1024, GEMV_WARPS=8, GEMV_STAGES=2, STAGES=2,
                 NARROW_BLOCK_N=32, WIDE_BLOCK_N=64, WARPS=8),
    "deep": dict(GEMV_STAGES=8, BLOCK_K=512, STAGES=3, NARROW_BLOCK_N=32),
    "former": dict(GEMV_BLOCK_N=8, WARPS=4),  # the defaults before the H100 sweep
    # the one-row kernel's whole-K tiles (PDL's default), here without PDL; the larger cap
    # lets the K 1,100 x 70 case of the tests below take it too
    "preload": dict(GEMV_PRELOAD=2, GEMV_PRELOAD_MAX=1 << 15),
}  # fmt: skip


@pytest.mark.triton
@pytest.mark.parametrize("launch", sorted(LAUNCHES))
def test_other_launches_match_f_linear(launch, monkeypatch):
    """The one-row and 16-row kernels at the sweep's other tile sizes, fp32 through the
    interpreter: K and N past every tile, an output wide enough for ``WIDE_BLOCK_N``, GLU,
    prenorm and bias, against float64."""
    from hybridkit.kernels.linear import triton_kernels
    from hybridkit.kernels.linear.triton_kernels import skinny_linear
    from hybridkit.layers.norm import rms_norm

    set_launch(monkeypatch, triton_kernels, LAUNCHES[launch])
    gen = torch.Generator().manual_seed(7)
    for m, k, n in ((1, 1100, 70), (5, 600, 40), (3, 20, 8200), (16, 40, 36)):
        x = torch.randn(m, k, generator=gen)
        w = torch.randn(n, k, generator=gen) / k**0.5
        b = torch.randn(n, generator=gen)
        want = F.linear(x.double(), w.double(), b.double())
        torch.testing.assert_close(skinny_linear(x, w, b).double(), want, rtol=1e-5, atol=1e-4)
        value, gate = want.chunk(2, -1)
        got = skinny_linear(x, w, b, glu=True).double()
        torch.testing.assert_close(got, value * F.silu(gate), rtol=1e-5, atol=1e-4)
        h, nw = torch.randn(m, k, generator=gen), 1 + 0.1 * torch.randn(k, generator=gen)
        s, got = skinny_linear(x, w, b, prenorm=(h, nw, 1e-5))
        normed = rms_norm((h + x).double(), nw.double(), 1e-5)
        torch.testing.assert_close(s, h + x)
        want = F.linear(normed, w.double(), b.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("launch", sorted(LAUNCHES))
def test_gpu_other_launches(launch, monkeypatch):
    """The same launches on the GPU (their warps and stages apply there): the bf16 model-shape
    tests at each."""
    from hybridkit.kernels.linear import triton_kernels

    set_launch(monkeypatch, triton_kernels, LAUNCHES[launch])
    for rows in (1, 16):
        test_bf16_kernel_at_model_shapes(rows)
        test_bf16_prenorm_kernel_at_model_shapes(rows)


def test_whole_tile_loads_only_where_they_fit(monkeypatch):
    """``GEMV_PRELOAD``: by default only under PDL, and only where a program's tile (K padded to
    a power of two, both halves with the gate) is at most ``GEMV_PRELOAD_MAX`` elements."""
    from hybridkit.kernels.linear import triton_kernels as tk

    assert not tk.gemv_preload(1024, glu=False, pdl=False)
    assert tk.gemv_preload(1024, glu=True, pdl=True)  # fc1 + SwiGLU: 2 x 4 x 1,024
    assert tk.gemv_preload(2816, glu=False, pdl=True)  # fc2: 4 x 4,096
    assert not tk.gemv_preload(2816, glu=True, pdl=True)  # 2 x 4 x 4,096: past the cap
    monkeypatch.setattr(tk, "GEMV_PRELOAD", 2)
    assert tk.gemv_preload(1024, glu=False, pdl=False)
    monkeypatch.setattr(tk, "GEMV_PRELOAD", 0)
    assert not tk.gemv_preload(1024, glu=False, pdl=True)


def test_kernel_refuses_too_many_rows():
    from hybridkit.kernels.linear.triton_kernels import skinny_linear

    with pytest.raises(ValueError, match="skinny_linear"):
        skinny_linear(torch.randn(17, 8), torch.randn(4, 8), None)


@pytest.mark.triton
def test_dispatch_runs_the_kernel_only_for_few_row_inference(monkeypatch):
    """As if on CUDA: on by default for up to 16 rows (``skinny_rows`` lowers that for plain
    linears) and for up to 16 rows of the fused fc1 + SwiGLU whatever it says; no autograd,
    matching dtypes, not under autocast; a bad backend name is an error naming the allowed
    ones."""
    monkeypatch.delenv(config.ENV_VAR, raising=False)  # the defaults, whatever the shell sets
    monkeypatch.setattr(kernels.linear, "_on_cuda", lambda x: True)
    w = torch.randn(8, 4)
    x1, x17 = torch.randn(2, 1, 4), torch.randn(17, 4)
    assert resolve_backend("auto", x1[:1], w) == "triton"  # one row: the defaults
    assert resolve_backend("auto", x1, w) == "triton"  # two rows too (skinny_rows 16) ...
    assert resolve_backend("auto", x17, w) == "torch"  # ... but not 17
    assert resolve_backend("auto", x17, w, glu=True) == "torch"
    with config.kernel_config(skinny_rows=1):
        assert resolve_backend("auto", x1, w) == "torch"  # two rows: cuBLAS ...
        assert resolve_backend("auto", x1, w, glu=True) == "triton"  # ... unless with SwiGLU
    with config.kernel_config(skinny_linear=False):
        assert resolve_backend("auto", x1[:1], w) == "torch"
        assert resolve_backend("auto", x1, w, glu=True) == "torch"
    with config.kernel_config(skinny_rows=16):
        assert resolve_backend("auto", x1, w) == "triton"
        assert resolve_backend("auto", x17, w) == "torch"
        assert resolve_backend("auto", x1, w.half()) == "torch"
        assert resolve_backend("auto", x1, w, torch.zeros(8).half()) == "torch"  # bias dtype
        assert resolve_backend("auto", x1, w, torch.zeros(16)[::2]) == "torch"  # strided bias
        assert resolve_backend("auto", x1, w.requires_grad_()) == "torch"
        with torch.no_grad():
            assert resolve_backend("auto", x1, w) == "triton"
        assert resolve_backend("torch", x1, w.detach()) == "torch"
    with pytest.raises(ValueError, match="allowed: auto, torch, triton"):
        resolve_backend("cublas", x1, w)


@pytest.mark.triton
def test_linear_keeps_leading_axes_and_the_module_is_an_nn_linear():
    layer = Linear(6, 10, bias=True)
    assert isinstance(layer, torch.nn.Linear)
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        got = linear(x, layer.weight, layer.bias, backend="triton")
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 3, 10)


@pytest.mark.triton
def test_decode_through_the_kernel_equals_decode_without(monkeypatch):
    """A tiny hybrid's generation (Mamba-3, attention, MLP, head: every projection at one row
    per sequence) through the kernel, in the interpreter, gives the logits of the same steps
    through F.linear."""
    from hybridkit.build import build_model
    from tests.test_train import make

    recipe = make(steps=1)
    model = build_model(recipe, seed=0).eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))

    def step_logits() -> torch.Tensor:
        cache = model.allocate_cache(2, 8)
        with torch.no_grad():
            model(ids, cache=cache)
            return torch.stack([model.step(ids[:, i], cache) for i in range(3)])

    plain = step_logits()
    calls = []
    real = kernels.linear.resolve_backend

    def spy(*args, **kw):
        calls.append(real(*args, **kw))
        return calls[-1]

    monkeypatch.setattr(kernels.linear, "_on_cuda", lambda x: True)
    monkeypatch.setattr(kernels.linear, "resolve_backend", spy)
    with config.kernel_config(skinny_rows=16):  # two sequences: two rows per projection
        fused = step_logits()
    assert "triton" in calls
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
def test_bf16_kernel_at_model_shapes(rows):
    """bf16 on the GPU at the 400M model's projections and the layer benchmark's: within bf16
    rounding of F.linear (fp32 accumulation in both)."""
    from hybridkit.kernels.linear.triton_kernels import skinny_linear

    shapes = [(1024, 4480), (2048, 1024), (1024, 5632), (2816, 1024), (1024, 32000), (2048, 8672)]
    for k, n in shapes:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        got = skinny_linear(x, w, None).float()
        want = F.linear(x.float(), w.float())
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    # the MLP's first projection with its activation (d_ff 2816)
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5632, 1024, device="cuda", dtype=torch.bfloat16) / 32
    value, gate = F.linear(x, w).chunk(2, -1)
    want = (value.float() * F.silu(gate.float())).to(torch.bfloat16)
    got = skinny_linear(x, w, None, glu=True)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.triton
@pytest.mark.parametrize("m", [1, 4])
def test_prenorm_kernel_stays_finite_where_the_norm_does_in_fp16(m):
    """fp16 with a residual channel of 20,000 and a norm weight of 4: ``s * w`` is past fp16's
    range, ``s / rms(s) * w`` is not. The 16-row kernel rounds its input tile to fp16, so it
    must normalise before rounding (a review found the first version gave inf); the one-row
    kernel stays in fp32."""
    from hybridkit.kernels.linear.triton_kernels import skinny_linear
    from hybridkit.layers.norm import rms_norm

    gen = torch.Generator().manual_seed(m)
    h = torch.randn(m, 64, generator=gen).half()
    h[:, 5] = 20000.0
    delta = torch.randn(m, 64, generator=gen).half()
    norm_w = torch.full((64,), 4.0).half()
    w = (torch.randn(24, 64, generator=gen) / 8).half()
    s, got = skinny_linear(delta, w, None, prenorm=(h, norm_w, 1e-5))
    want = F.linear(rms_norm((h + delta).double(), norm_w.double(), 1e-5), w.double())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=3e-3, atol=3e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
def test_bf16_prenorm_kernel_at_model_shapes(rows):
    """bf16 on the GPU, ``prenorm`` at the 400M model's first projections (in_proj, wqkv, fc1 +
    SwiGLU, the head; K = d_model 1024): the sum bitwise torch's add, the product within bf16
    rounding of add -> RMSNorm -> F.linear."""
    from hybridkit.kernels.linear.triton_kernels import skinny_linear
    from hybridkit.layers.norm import rms_norm

    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    h, delta = torch.randn(rows, 1024, **bf16), torch.randn(rows, 1024, **bf16)
    norm_w = 1.0 + 0.1 * torch.randn(1024, **bf16)
    x = rms_norm(h + delta, norm_w, 1e-5)
    for n, glu in ((4480, False), (1536, False), (5632, True), (32000, False)):
        w = torch.randn(n, 1024, **bf16) / 32
        s, got = skinny_linear(delta, w, None, glu=glu, prenorm=(h, norm_w, 1e-5))
        assert torch.equal(s, h + delta)
        want = F.linear(x, w)
        if glu:
            value, gate = want.chunk(2, -1)
            want = (value.float() * F.silu(gate.float())).to(torch.bfloat16)
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.triton
def test_show_reports_the_decode_linears(monkeypatch):
    """``hybridkit show`` lists what a decode step's linears run, with how to change it."""
    from hybridkit.kernels.linear import describe_decode

    monkeypatch.delenv(config.ENV_VAR, raising=False)
    assert describe_decode("cpu", torch.bfloat16) == "torch (F.linear)"
    assert describe_decode("cuda", torch.bfloat16).startswith("triton")  # the default
    assert "F.linear" in describe_decode("cuda", torch.float64)
    with config.kernel_config(skinny_linear=False):
        assert "skinny_linear=1" in describe_decode("cuda", torch.bfloat16)
    assert "folded into its first projection at 1 row" in describe_decode("cuda", torch.bfloat16)
    with config.kernel_config(norm_linear=16):
        assert "folded into its first projection at <= 16 rows" in describe_decode(
            "cuda", torch.bfloat16
        )
    with config.kernel_config(norm_linear=0):
        assert "folded" not in describe_decode("cuda", torch.bfloat16)


@pytest.mark.triton
@pytest.mark.parametrize("batch,rows", [(1, 1), (2, 16)])
def test_decode_with_norm_linear_equals_decode_without(monkeypatch, batch, rows):
    """``norm_linear``: a tiny hybrid (Mamba-3 with the grouped norm, attention, MLP, tied head)
    prefills and decodes with every block's add + pre-norm (and the final norm) folded into the
    next projection's kernel (the one-row kernel at batch 1, the 16-row one at batch 2), in the
    interpreter: the same logits as the unfused steps, and each fold counted."""
    from hybridkit import build_model
    from hybridkit.kernels.linear import triton_kernels
    from tests.helpers import attn_block, mamba_block, tiny_recipe

    m, a = mamba_block(outproj_norm="grouped_pregate"), attn_block()
    model = build_model(tiny_recipe("m a", d_model=16, vocab=32, m=m, a=a), seed=0).eval()
    ids = torch.randint(0, 32, (batch, 5), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(kernels.linear, "_on_cuda", lambda x: True)
    folds = []
    real = triton_kernels.skinny_linear

    def spy(*args, **kw):
        folds.append(kw.get("prenorm") is not None)
        return real(*args, **kw)

    monkeypatch.setattr(triton_kernels, "skinny_linear", spy)

    def logits(**settings) -> torch.Tensor:
        cache = model.allocate_cache(batch, 8)
        with torch.no_grad(), config.kernel_config(skinny_rows=rows, **settings):
            model(ids, cache=cache)
            return torch.stack([model.step(ids[:, i], cache) for i in range(3)])

    plain = logits(norm_linear=0)
    assert not any(folds)
    folded = logits(norm_linear=16)
    # per step: 2 blocks x (mixer + MLP) minus the first block's mixer (nothing pending), + the
    # head; the prefill's 5 or 10 rows fold where the few-row kernel takes them: the two fc1 +
    # SwiGLU (up to 16 rows), and at skinny_rows 16 also wqkv and the head
    assert sum(folds) == 3 * 4 + (2 if rows == 1 else 4)
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
    # the default folds one row only: a decode step of two sequences runs unfused, and so
    # does every prefill
    folds.clear()
    default = logits(norm_linear=1)
    assert sum(folds) == (3 * 4 if batch == 1 else 0)  # the prefill (5 rows) never folds
    torch.testing.assert_close(default, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_norm_linear_graph_equals_eager_and_stays_near_unfused(batch):
    """bf16 on the GPU with ``norm_linear``: 128 greedy tokens through the CUDA graph equal the
    eager steps' (the folded kernels capture like any other), and each static step's logits
    stay within bf16 tolerance of the same steps without the fold."""
    from hybridkit import build_model
    from hybridkit.generation import Sampling, generate
    from tests.helpers import attn_block, mamba_block, rel_err, tiny_recipe

    m, a = mamba_block(outproj_norm="grouped_pregate"), attn_block()
    recipe = tiny_recipe("m m a", d_model=64, vocab=128, m=m, a=a)
    model = build_model(recipe, seed=0, dtype=torch.bfloat16, device="cuda").eval()
    ids = torch.randint(0, 128, (batch, 16), device="cuda")
    greedy = Sampling(temperature=0)

    def static_logits(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            cache = model.allocate_cache(batch, tokens.shape[1])
            model(tokens[:, :16], cache=cache)
            cache.make_static(torch.full((1,), 16, dtype=torch.long, device="cuda"))
            return torch.stack([model.step(tokens[:, t], cache) for t in range(16, 48)], 1)

    with config.kernel_config(norm_linear=16, skinny_rows=16):
        graph = generate(model, ids, 128, sampling=greedy, use_graph=True)
        eager = generate(model, ids, 128, sampling=greedy, use_graph=False)
        folded = static_logits(graph)
    with config.kernel_config(norm_linear=0, skinny_rows=16):
        plain = static_logits(graph)
    assert torch.equal(graph, eager)
    assert rel_err(folded.float(), plain.float()) < 3e-2


def test_only_a_layer_whose_own_forward_says_so_gets_a_pending_norm():
    """``accepts_pending_norm`` is a promise about one ``forward``: a subclass that overrides
    ``forward`` does not inherit it."""
    from hybridkit.layers.mlp import SwiGLU
    from hybridkit.model import takes_pending_norm

    class Scaled(SwiGLU):
        def forward(self, x, **kw):
            return super().forward(2 * x, **kw)

    class Renamed(SwiGLU):
        pass

    # instances made without __init__: only their classes matter here
    assert takes_pending_norm(SwiGLU.__new__(SwiGLU))
    assert takes_pending_norm(Renamed.__new__(Renamed))
    assert not takes_pending_norm(Scaled.__new__(Scaled))
    assert not takes_pending_norm(torch.nn.Linear(2, 2))


def test_split_k_rule():
    """Slices per column tile: a power of two up to SPLIT_K_MAX, within the programs-per-SM
    budget, each slice at least BLOCK_K deep."""
    from hybridkit.kernels.linear.triton_kernels import BLOCK_K, SPLIT_K_MAX, split_k

    assert SPLIT_K_MAX == 4 and BLOCK_K == 256  # the cases below assume these
    assert split_k(64, 2048, 132) == 4  # out_proj back to d_model 1,024: 256 programs
    assert split_k(96, 1024, 132) == 2  # qkv (1,536 columns): 4 would be 384 > 264
    assert split_k(280, 1024, 132) == 1  # in_proj fills the GPU alone
    assert split_k(64, 300, 132) == 1  # K too short for two slices of BLOCK_K
    assert split_k(64, 600, 132) == 2


@pytest.mark.triton
@pytest.mark.parametrize(
    "m,k,n,bias",
    [(16, 1024, 40, True), (5, 1100, 33, False), (2, 700, 16, True)],
)
def test_split_k_matches_f_linear(m, k, n, bias):
    """K in slices whose partials the last program of each tile adds (``SPLIT_K_MAX``), fp32
    through the interpreter: K 1,024 in four slices, K 1,100 in three (no empty slice), K 700
    in two; the workspace poisoned with NaN first (every partial must be written before it is
    read), the counters back at zero afterwards, and a second call bitwise equal."""
    from hybridkit.kernels.linear import triton_kernels as tk

    gen = torch.Generator().manual_seed(k + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    ws, count = tk._WORKSPACE.get(x.device, 4 * 3 * 16 * 16, 3)
    ws.fill_(float("nan"))
    got = tk.skinny_linear(x, w, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert tk._WORKSPACE.get(x.device, 0, 0)[1].eq(0).all()
    assert torch.equal(tk.skinny_linear(x, w, b), got)


@pytest.mark.triton
def test_split_k_is_taken_for_narrow_outputs(monkeypatch):
    """The split path runs where the rule says so (a split that silently never ran would pass
    the equality test above): its workspace's partials are written."""
    from hybridkit.kernels.linear import triton_kernels as tk

    x, w = torch.randn(4, 1024), torch.randn(16, 1024)
    ws, _ = tk._WORKSPACE.get(x.device, 4 * 16 * 16, 1)
    ws.fill_(float("nan"))
    tk.skinny_linear(x, w, None)
    assert not torch.isnan(ws[: 4 * 16 * 16]).any()  # all four slices stored their partials
    monkeypatch.setattr(tk, "SPLIT_K_MAX", 1)
    ws.fill_(float("nan"))
    tk.skinny_linear(x, w, None)
    assert torch.isnan(ws).all()  # no split: the workspace is not touched


@pytest.mark.gpu
def test_gpu_split_k_in_a_cuda_graph_replayed():
    """The split path on the GPU (bf16, out_proj's 2,048 -> 1,024 at 16 rows: 64 tiles in four
    slices, and the qkv projection's 1,024 -> 1,536 in two), captured in a CUDA graph and
    replayed with new inputs: every replay equals the eager call bitwise (slices added in a
    fixed order whichever program finishes last; the counters reset for the next launch), and
    both are within bf16 rounding of F.linear."""
    from hybridkit.kernels.linear import triton_kernels as tk

    for k, n, split in ((2048, 1024, 4), (1024, 1536, 2)):
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert tk.split_k(n // 16, k, sms) == split or sms != 132
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
        tk.skinny_linear(x, w, None)  # warm-up: compiles, sizes the workspace
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = tk.skinny_linear(x, w, None)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            y.fill_(float("nan"))
            graph.replay()
            eager = tk.skinny_linear(x, w, None)
            assert torch.equal(y, eager)
            want = F.linear(x.float(), w.float())
            torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)
        assert tk._WORKSPACE.get(x.device, 0, 0)[1].eq(0).all()
