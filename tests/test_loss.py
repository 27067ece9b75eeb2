"""Chunked linear cross-entropy (``hybridkit.kernels.loss``) against ``F.cross_entropy`` of the
full logits: loss and both gradients in float64, ignored rows, label smoothing, a tied head, and
under ``torch.compile``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybridkit.kernels.loss import cross_entropy_sum, linear_cross_entropy
from tests.helpers import rel_err

F64 = torch.float64


def _inputs(tokens=37, dim=8, vocab=29, ignore_every=5):
    hidden = torch.randn(tokens, dim, dtype=F64, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=F64, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    targets[::ignore_every] = -100
    return hidden, weight, targets


def _reference(hidden, weight, targets, smoothing=0.0):
    return F.cross_entropy(
        hidden @ weight.t(), targets, ignore_index=-100, reduction="sum", label_smoothing=smoothing
    )


@pytest.mark.parametrize("chunk", [1, 7, 37, 64])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_full_logits_in_float64(chunk, smoothing):
    hidden, weight, targets = _inputs()
    ref = _reference(hidden, weight, targets, smoothing)
    g_ref = torch.autograd.grad(ref * 0.7, (hidden, weight))
    got = linear_cross_entropy(
        hidden, weight, targets, chunk_tokens=chunk, label_smoothing=smoothing
    )
    g_got = torch.autograd.grad(got * 0.7, (hidden, weight))
    assert got.dtype == F64
    assert abs(got.item() - ref.item()) < 1e-10 * abs(ref.item())
    for a, b in zip(g_got, g_ref, strict=True):
        assert rel_err(a, b) < 1e-12


def test_ignored_rows_get_no_gradient_and_all_ignored_gives_zero():
    hidden, weight, targets = _inputs()
    loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=8)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert torch.all(grad[targets == -100] == 0)
    everything_ignored = torch.full_like(targets, -100)
    zero = linear_cross_entropy(hidden, weight, everything_ignored, chunk_tokens=8)
    assert zero.item() == 0.0


def test_forward_without_gradients_skips_them_and_a_frozen_head_gets_none(monkeypatch):
    """The forward forms the gradients only where they are needed: not under ``no_grad`` (the
    gradient function is never called), only the hidden one for a frozen head."""
    from hybridkit.kernels import loss as loss_mod

    hidden, weight, targets = _inputs()
    ref = _reference(hidden, weight, targets).item()
    real = loss_mod._chunk_grad

    def refuse(*args, **kwargs):
        raise AssertionError("gradient formed without need")

    monkeypatch.setattr(loss_mod, "_chunk_grad", refuse)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets, chunk_tokens=8)
    assert abs(got.item() - ref) < 1e-10 * abs(ref)
    monkeypatch.setattr(loss_mod, "_chunk_grad", real)
    frozen = weight.detach()
    loss = linear_cross_entropy(hidden, frozen, targets, chunk_tokens=8)
    (grad,) = torch.autograd.grad(loss, hidden)
    (want,) = torch.autograd.grad(_reference(hidden, frozen, targets), hidden)
    assert rel_err(grad, want) < 1e-12


def test_second_derivative_is_refused():
    """The backward scales gradients the forward formed: constants to autograd, so a second
    derivative through them would be silently wrong; ``once_differentiable`` makes it an
    error instead (the gradient carries no graph, or a delayed error where it does)."""
    hidden, weight, targets = _inputs()
    loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=8)
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        grad.sum().backward()


def test_tied_embedding_gradients_add_up():
    """A tied head: the weight gets the embedding's gradient plus the head's, as with logits."""
    vocab, dim = 23, 6
    table = torch.randn(vocab, dim, dtype=F64, requires_grad=True)
    ids = torch.randint(0, vocab, (2, 9))
    targets = torch.randint(0, vocab, (2, 9))

    def loss(fn):
        hidden = torch.tanh(F.embedding(ids, table))
        return fn(hidden, table, targets)

    ref = loss(lambda h, w, t: _reference(h.reshape(-1, dim), w, t.reshape(-1)))
    got = loss(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_tokens=4))
    (g_ref,) = torch.autograd.grad(ref, table)
    (g_got,) = torch.autograd.grad(got, table)
    assert rel_err(g_got, g_ref) < 1e-12


def test_float32_logits_stay_float32_and_plain_path_agrees():
    hidden, weight, targets = (
        t.detach().float() if t.is_floating_point() else t for t in _inputs()
    )
    chunked = cross_entropy_sum(hidden, weight, targets, chunk_tokens=5)
    plain = cross_entropy_sum(hidden, weight, targets, chunk_tokens=None)
    assert chunked.dtype == torch.float32
    assert abs(chunked.item() - plain.item()) < 1e-5 * abs(plain.item())


def test_bad_arguments_are_rejected():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(hidden, weight, targets, chunk_tokens=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, targets, chunk_tokens=4, label_smoothing=2.0)


@pytest.mark.parametrize(
    ("backend", "fullgraph"),
    [
        ("aot_eager", False),
        ("aot_eager", True),
        pytest.param("inductor", True, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("loss_op", [False, True])
def test_compiles_and_matches_eager(backend, fullgraph, loss_op):
    """Both compiled paths (the traced Function, the default; the op pair) give eager's values."""
    from hybridkit.kernels.config import kernel_config

    torch._dynamo.reset()
    hidden, weight, targets = (
        t.detach().float().requires_grad_() if t.is_floating_point() else t for t in _inputs()
    )

    def fn(h, w, t):  # with label smoothing: the compiled gradient's branch has its own term
        return linear_cross_entropy(h, w, t, chunk_tokens=16, label_smoothing=0.1)

    eager = fn(hidden, weight, targets)
    g_eager = torch.autograd.grad(eager, (hidden, weight))
    with kernel_config(loss_op=loss_op):
        compiled = torch.compile(fn, fullgraph=fullgraph, backend=backend)(hidden, weight, targets)
        g_comp = torch.autograd.grad(compiled, (hidden, weight))
    torch._dynamo.reset()
    assert abs(compiled.item() - eager.item()) < 1e-5 * abs(eager.item())
    for a, b in zip(g_comp, g_eager, strict=True):
        assert rel_err(a, b) < 1e-5


def _saved_between_passes(fn, *args) -> list[tuple[int, ...]]:
    """Shapes of what the compiled forward saves for the backward (min-cut partitioner, the
    one Inductor uses), from the forward graph's outputs after the result."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    saved: list[tuple[int, ...]] = []

    def forward(gm, _inputs):
        (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
        saved.extend(tuple(o.meta["val"].shape) for o in outputs[1:] if hasattr(o, "meta"))
        return make_boxed_func(gm.forward)

    def backward(gm, _inputs):
        return make_boxed_func(gm.forward)

    backend = aot_autograd(
        fw_compiler=forward,
        bw_compiler=backward,
        partition_fn=min_cut_rematerialization_partition,
    )
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args).backward()
    torch._dynamo.reset()
    return saved


@pytest.mark.parametrize("loss_op", [True, False])
def test_compiled_loss_saves_no_logits_for_the_backward(loss_op):
    """Traced as an autograd.Function (``loss_op=0``, the default) or as the custom op, the
    forward forms both gradients while it has each chunk's logits, so only those two are saved
    between the passes: no (rows x vocab) buffer. (When the backward recomputed the logits, the
    traced Function's recompute merged with the forward's matmul and every chunk's float32
    buffer was saved: the full logits after all.)"""
    from hybridkit.kernels.config import kernel_config

    tokens, vocab, chunk = 64, 100, 16
    hidden = torch.randn(tokens, 16, requires_grad=True)
    weight = torch.randn(vocab, 16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    with kernel_config(loss_op=loss_op):
        saved = _saved_between_passes(
            lambda h, w, t: linear_cross_entropy(h, w, t, chunk_tokens=chunk),
            hidden,
            weight,
            targets,
        )
    assert saved and not [s for s in saved if s == (chunk, vocab)], saved
    assert sum(math.prod(s) for s in saved) <= tokens * 16 + vocab * 16 + 2 * tokens + 1


@pytest.mark.slow
def test_compiled_loss_builds_each_chunk_gradient_in_one_pass():
    """Under Inductor the softmax gradient is one element-wise expression (the one-hot a
    comparison, not the eager path's in-place ``scatter_add_``), fused from the logits to the
    gradient in the matmul dtype: no float32 (chunk x vocab) buffer in the compiled code.
    With the scatter it was written in float32 and read back to cast it, two full passes per
    chunk on the GPU (benchmarks/results/train_kernels_h100.md). Values: test above."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    chunk, vocab = 32, 1000
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(vocab, 32, generator=gen).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (64,), generator=gen)
    step = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_tokens=chunk))

    def run():
        loss = step(hidden, weight, targets)
        loss.backward()
        return loss

    _, codes = run_and_get_code(run)
    torch._dynamo.reset()
    for code in codes:
        fp32_chunks = re.findall(rf"\(\({chunk}, {vocab}\), \({vocab}, 1\)\), torch\.float32", code)
        assert "scatter" not in code and not fp32_chunks, code


def test_custom_ops_pass_opcheck():
    """Schema, fake impl and autograd registration of the compiled path's op, with and without
    the gradients it forms (a frozen head needs only the hidden one)."""
    hidden, weight, targets = (
        t.detach().float().requires_grad_() if t.is_floating_point() else t for t in _inputs()
    )
    for need in ((True, True), (True, False), (False, False)):
        args = (hidden, weight, targets, 16, -100, 0.1, "torch", *need)
        torch.library.opcheck(torch.ops.hybridkit.linear_ce_fwd.default, args)
    total, grad_hidden, grad_weight = torch.ops.hybridkit.linear_ce_fwd(
        hidden, weight, targets, 16, -100, 0.1, "torch", True, True
    )
    assert total.requires_grad and not grad_hidden.requires_grad and not grad_weight.requires_grad
    assert grad_hidden.shape == hidden.shape and grad_weight.shape == weight.shape


def test_model_training_path_matches_logits_then_cross_entropy():
    """``model(ids, targets=...)`` is the summed F.cross_entropy of ``model(ids)``, chunked or not,
    with ignored positions; and it refuses a cache (the loss is a training-only path)."""
    from hybridkit import build_model
    from tests.helpers import tiny_recipe

    model = build_model(tiny_recipe("m a", d_model=16, vocab=64), seed=0).double()
    ids = torch.randint(0, 64, (2, 11))
    targets = torch.randint(0, 64, (2, 11))
    targets[:, :3] = -100
    logits = model(ids)
    ref = F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1), reduction="sum")
    for chunk in (None, 5):
        model.loss_chunk_tokens = chunk
        got = model(ids, targets=targets)
        assert abs(got.item() - ref.item()) < 1e-6 * ref.item()
    with pytest.raises(ValueError, match="targets"):
        model(ids, targets=targets, cache=model.allocate_cache(2, 11))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_with_chunked_loss_compiles_fullgraph(checkpointing):
    from hybridkit import build_model
    from tests.helpers import attn_block, mamba_block, tiny_recipe

    torch._dynamo.reset()
    recipe = tiny_recipe("a a", d_model=16, vocab=64, a=attn_block(), m=mamba_block())
    model = build_model(recipe, seed=0)
    model.loss_chunk_tokens, model.activation_checkpointing = 5, checkpointing
    ids, targets = torch.randint(0, 64, (2, 11)), torch.randint(0, 64, (2, 11))
    targets[0, :4] = -100
    eager = model(ids, targets=targets)
    g_eager = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, targets=targets)
    g_comp = torch.autograd.grad(compiled, list(model.parameters()))
    assert rel_err(compiled, eager) < 1e-5
    for a, b in zip(g_comp, g_eager, strict=True):
        assert rel_err(a, b) < 1e-4


def test_autocast_chunks_run_in_the_autocast_dtype_and_compile():
    """Under bf16 autocast the chunks' logits are bf16 like ``lm_head``'s would be (loss within
    bf16 noise of the float32 one), eager and under ``fullgraph=True`` alike."""
    torch._dynamo.reset()
    hidden = torch.randn(37, 8, requires_grad=True)
    weight = torch.randn(29, 8, requires_grad=True)
    targets = torch.randint(0, 29, (37,))

    def fn(h, w, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(h, w, t, chunk_tokens=16)

    eager = fn(hidden, weight, targets)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(hidden, weight, targets)
    full = _reference(hidden, weight, targets)
    assert eager.dtype == torch.float32 and compiled.item() == eager.item()
    assert abs(eager.item() - full.item()) < 2e-2 * abs(full.item())
    grads = torch.autograd.grad(eager, (hidden, weight))
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]


@pytest.mark.gpu
def test_gpu_chunked_loss_matches_full_logits_at_the_400m_head_and_saves_memory():
    """16384 tokens x 32000 vocabulary x 1024 channels in bf16 autocast: loss and gradients as
    the full-logits path, and far less peak memory (the logits never exist in float32)."""
    tokens, vocab, dim = 16384, 32000, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden0 = torch.randn(tokens, dim, device="cuda", generator=g)
    weight0 = torch.randn(vocab, dim, device="cuda", generator=g) * dim**-0.5
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    results = {}
    for chunk in (None, 4096):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cross_entropy_sum(hidden, weight, targets, chunk_tokens=chunk)
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        results[chunk] = (loss.detach(), hidden.grad, weight.grad, peak)
    (l0, dh0, dw0, peak0), (l1, dh1, dw1, peak1) = results[None], results[4096]
    assert rel_err(l1, l0) < 1e-3
    assert rel_err(dh1, dh0) < 2e-2 and rel_err(dw1, dw0) < 2e-2
    assert peak1 < 0.5 * peak0, (peak1 / 1e9, peak0 / 1e9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compiled_chunked_loss_keeps_the_eager_memory():
    """The 400M head (16,384 tokens x 32,000 x 1,024, bf16 autocast) compiled with the op pair
    (``loss_op=1``): loss and gradients as eager's chunked path, and peak memory no more than
    10 % above it (the traced Function keeps every chunk's float32 gradient, ~2 GB here, between
    the passes)."""
    from hybridkit.kernels.config import kernel_config

    tokens, vocab, dim = 16384, 32000, 1024
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden0 = torch.randn(tokens, dim, device="cuda", generator=g)
    weight0 = torch.randn(vocab, dim, device="cuda", generator=g) * dim**-0.5
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)

    def loss_fn(h, w):
        return cross_entropy_sum(h, w, targets, chunk_tokens=4096)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn)
    results = {}
    for name, fn in (("eager", loss_fn), ("compiled", compiled), ("again", compiled)):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with kernel_config(loss_op=True), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(hidden, weight)
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        results[name] = (loss.detach(), hidden.grad, weight.grad, peak)
    torch._dynamo.reset()
    (l0, dh0, dw0, peak0), (l1, dh1, dw1, peak1) = results["eager"], results["again"]
    assert rel_err(l1, l0) < 1e-4
    assert rel_err(dh1, dh0) < 1e-2 and rel_err(dw1, dw0) < 1e-2
    assert peak1 <= 1.1 * peak0, (peak1 / 1e9, peak0 / 1e9)


def test_scored_rows_cover_every_scored_position_once_padded_with_unscored_ones():
    from hybridkit.kernels.loss import scored_rows

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 50, (8, 64), generator=g)
    targets[torch.rand(8, 64, generator=g) < 0.9] = -100
    n = int((targets != -100).sum())
    rows = scored_rows(targets, multiple=16)
    assert rows is not None and rows.numel() == -(-n // 16) * 16
    assert rows.unique().numel() == rows.numel()  # each position once
    flat = targets.reshape(-1)
    assert set(torch.nonzero(flat != -100).squeeze(1).tolist()) <= set(rows.tolist())
    assert (flat[rows[n:]] == -100).all()  # the padding is unscored
    assert scored_rows(targets, multiple=10**6).numel() == targets.numel()  # capped at all rows
    assert scored_rows(torch.zeros(4, 8, dtype=torch.long)) is None  # language modelling: all
    half = torch.full((2, 8), -100)
    half[:, :4] = 1
    assert scored_rows(half, multiple=1).numel() == 8  # half is still worth gathering
    half[0, 4] = 1
    assert scored_rows(half) is None


@pytest.mark.parametrize("chunk", [None, 16])
def test_model_loss_on_scored_rows_matches_every_row(chunk):
    """The training path with ``scored`` gives the same summed loss and gradients as over every
    position, with the plain and the chunked loss; and it compiles fullgraph."""
    from hybridkit import build_model
    from hybridkit.kernels.loss import scored_rows
    from tests.helpers import tiny_recipe

    model = build_model(tiny_recipe("m a", d_model=16, vocab=64), seed=0).double()
    model.loss_chunk_tokens = chunk
    ids = torch.randint(0, 64, (3, 40))
    targets = torch.randint(0, 64, (3, 40))
    targets[:, ::5] = -100
    targets[:, 1:] = torch.where(torch.rand(3, 39) < 0.8, -100, targets[:, 1:])
    rows = scored_rows(targets, multiple=8)
    assert rows is not None
    full = model(ids, targets=targets)
    g_full = torch.autograd.grad(full, list(model.parameters()))
    part = model(ids, targets=targets, scored=rows)
    g_part = torch.autograd.grad(part, list(model.parameters()))
    assert rel_err(part, full) < 1e-12
    for a, b in zip(g_part, g_full, strict=True):
        assert rel_err(a, b) < 1e-10
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(ids, targets=targets, scored=rows), full) < 1e-12
    torch._dynamo.reset()
