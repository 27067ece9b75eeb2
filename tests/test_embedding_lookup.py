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
from tests.helpers import needs_torch_2_6_compile

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


def _inductor_code(fn, deterministic: bool) -> str:
    """The code Inductor generates for forward + backward of ``fn(ids, w).sum()`` (CPU), with
    ids that are mostly one filler id."""
    from torch._inductor.utils import run_and_get_code

    gen = torch.Generator().manual_seed(2)
    ids = _filler_ids(gen)
    weight = torch.randn(37, 8, generator=gen, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(fn)

    def step():
        compiled(ids, weight).sum().backward()

    with deterministic_mode(deterministic):
        _, code = run_and_get_code(step)
    torch._dynamo.reset()
    return "\n".join(code)


@needs_torch_2_6_compile
def test_compiled_deterministic_backward_is_the_eager_kernel():
    """What Inductor really emits: in deterministic mode plain F.embedding's backward becomes
    the ``aten.index_put_`` fallback (the serial kernel on a GPU; if a torch release drops that
    fallback, this control says so), and embedding_lookup's becomes our op, with no index_put_.
    Outside the mode embedding_lookup compiles to the same code as F.embedding."""
    plain = _inductor_code(F.embedding, True)
    assert "aten.index_put_" in plain and "hybridkit.embedding_bwd" not in plain
    ours = _inductor_code(embedding_lookup, True)
    assert "hybridkit.embedding_bwd" in ours and "index_put_" not in ours
    assert "hybridkit.embedding" not in _inductor_code(embedding_lookup, False)


def test_switching_the_mode_recompiles_and_each_graph_is_right():
    """Dynamo guards on the deterministic flag: on, off, on gives two graphs (the third call
    reuses the first), the mode's with our op and the other without; gradients equal eager's."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs: list[list[str]] = []

    def record(gm, _inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return make_boxed_func(gm.forward)

    def backward(gm, _inputs):
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=record, bw_compiler=backward)
    gen = torch.Generator().manual_seed(4)
    ids = _filler_ids(gen)
    weight = torch.randn(37, 8, generator=gen)
    dout = torch.randn(3, 40, 8, generator=gen)
    _, want = _grads(F.embedding, ids, weight, dout)
    torch._dynamo.reset()
    compiled = torch.compile(embedding_lookup, backend=backend, fullgraph=True)
    for deterministic in (True, False, True):
        with deterministic_mode(deterministic):
            _, got = _grads(compiled, ids, weight, dout)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
    assert len(graphs) == 2, graphs
    assert any("hybridkit.embedding_fwd" in op for op in graphs[0]), graphs[0]
    assert not any("hybridkit" in op for op in graphs[1]), graphs[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_compiled_deterministic_gradient_matches_eager():
    """On the GPU, the compiled deterministic lookup (Inductor) against eager autograd, float32,
    MQAR-like ids (32K positions, 91 % one id); twice, bitwise equal (deterministic); the
    profiler shows no ``indexing_backward_kernel`` (index_put's serial sum) ran."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 8192, (128, 256), generator=gen)
    ids = torch.where(torch.rand(128, 256, generator=gen) < 0.91, torch.zeros_like(ids), ids)
    ids = ids.cuda()
    weight = torch.randn(8192, 128, generator=gen).cuda()
    dout = torch.randn(128, 256, 128, generator=gen).cuda()
    _, want = _grads(F.embedding, ids, weight, dout)
    torch._dynamo.reset()
    compiled = torch.compile(embedding_lookup)
    with deterministic_mode(True):
        _, first = _grads(compiled, ids, weight, dout)
        _, second = _grads(compiled, ids, weight, dout)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-4)
    # and the kernel that ran is the embedding backward's, not index_put's serial one
    from torch.profiler import ProfilerActivity, profile

    with deterministic_mode(True), profile(activities=[ProfilerActivity.CUDA]) as prof:
        _grads(compiled, ids, weight, dout)
        torch.cuda.synchronize()
    names = " ".join(e.key for e in prof.key_averages())
    assert "indexing_backward_kernel" not in names, names
    torch._dynamo.reset()
