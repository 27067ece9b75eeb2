"""The embedding dispatch point (``hybridkit/kernels/embedding.py``): the same values and
gradients as ``F.embedding`` on every path; under ``torch.compile`` in deterministic mode the
backward is ATen's ``embedding_dense_backward`` (not Inductor's ``index_put_`` fallback, which
sums a repeated id serially on a GPU); outside that mode the compiled graph is unchanged. Ids
repeat heavily on purpose (most positions hold one filler id, as in MQAR)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridkit.kernels.embedding import embedding_lookup
from hybridkit.train.determinism import CUBLAS_WORKSPACE, deterministic_mode

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cublas_env(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def _filler_ids(gen: torch.Generator, vocab: int = 37) -> torch.Tensor:
    """(3, 40) ids, about four in five of them the filler id 0."""
    ids = torch.randint(1, vocab, (3, 40), generator=gen)
    return torch.where(torch.rand(3, 40, generator=gen) < 0.8, torch.zeros_like(ids), ids)


def _grads(fn, ids, weight, dout):
    w = weight.clone().requires_grad_(True)
    out = fn(ids, w)
    out.backward(dout)
    return out.detach(), w.grad


def test_op_matches_f_embedding_forward_and_backward_in_float64():
    """The custom op pair against ``F.embedding``'s autograd, float64, fresh random inputs (the
    backward allocates its own output, so there is no buffer to poison)."""
    gen = torch.Generator().manual_seed(0)
    ids = _filler_ids(gen)
    weight = torch.randn(37, 6, generator=gen, dtype=torch.float64)
    dout = torch.randn(3, 40, 6, generator=gen, dtype=torch.float64)
    ref_out, ref_grad = _grads(F.embedding, ids, weight, dout)
    out, grad = _grads(torch.ops.hybridkit.embedding_fwd, ids, weight, dout)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    # the filler row's gradient is the sum over its ~96 positions
    expected = (dout * (ids == 0)[..., None]).sum((0, 1))
    torch.testing.assert_close(grad[0], expected, rtol=1e-12, atol=1e-12)
    # the backward op called on its own
    torch.testing.assert_close(
        torch.ops.hybridkit.embedding_bwd(dout, ids, 37), ref_grad, rtol=1e-12, atol=1e-12
    )


def test_ops_pass_opcheck():
    """Schemas, fake impls (shapes for the compiler) and the autograd registration."""
    gen = torch.Generator().manual_seed(1)
    ids = _filler_ids(gen)
    weight = torch.randn(37, 5, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.hybridkit.embedding_fwd.default, (ids, weight))
    dout = torch.randn(3, 40, 5, generator=gen)
    torch.library.opcheck(torch.ops.hybridkit.embedding_bwd.default, (dout, ids, 37))


def _compiled_backward_ops(deterministic: bool) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Compile ``embedding_lookup(...) * scale`` with a backend that records the ops of the
    backward graph; returns them with the compiled and the eager gradient."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    seen: list[str] = []

    def record(gm, _inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return make_boxed_func(gm.forward)

    def forward(gm, _inputs):
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward, bw_compiler=record)
    gen = torch.Generator().manual_seed(2)
    ids = _filler_ids(gen)
    weight = torch.randn(37, 8, generator=gen)
    scale = torch.randn(8, generator=gen)

    def fn(ids, w):
        return embedding_lookup(ids, w) * scale

    torch._dynamo.reset()
    with deterministic_mode(deterministic):
        _, got = _grads(
            torch.compile(fn, backend=backend, fullgraph=True), ids, weight, torch.ones(3, 40, 8)
        )
    _, want = _grads(fn, ids, weight, torch.ones(3, 40, 8))
    torch._dynamo.reset()
    return seen, got, want


def test_compiled_deterministic_backward_is_the_eager_kernel():
    """In the mode the traced backward calls our op (which runs embedding_dense_backward), with
    no index_put / scatter left for Inductor to lower; fullgraph holds; gradients match."""
    ops, got, want = _compiled_backward_ops(True)
    assert any("hybridkit.embedding_bwd" in op for op in ops), ops
    assert not any("index_put" in op or "scatter" in op for op in ops), ops
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_compiled_plain_backward_is_unchanged():
    """Outside the mode the lookup is the plain F.embedding (Inductor keeps its own lowering)."""
    ops, got, want = _compiled_backward_ops(False)
    assert not any("hybridkit.embedding" in op for op in ops), ops
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_compiled_deterministic_gradient_matches_eager():
    """On the GPU, the compiled deterministic lookup (Inductor) against eager autograd, float32,
    MQAR-like ids (32K positions, 84 % one id); twice, bitwise equal (deterministic)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 8192, (128, 256), generator=gen)
    ids = torch.where(torch.rand(128, 256, generator=gen) < 0.84, torch.zeros_like(ids), ids)
    ids = ids.cuda()
    weight = torch.randn(8192, 128, generator=gen).cuda()
    dout = torch.randn(128, 256, 128, generator=gen).cuda()
    _, want = _grads(F.embedding, ids, weight, dout)
    torch._dynamo.reset()
    compiled = torch.compile(embedding_lookup)
    with deterministic_mode(True):
        _, first = _grads(compiled, ids, weight, dout)
        _, second = _grads(compiled, ids, weight, dout)
    torch._dynamo.reset()
    assert torch.equal(first, second)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-4)
