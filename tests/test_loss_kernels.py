"""The fused cross-entropy's Triton chunk kernels (``hybridkit.kernels.loss.triton_kernels``)
against ``F.cross_entropy`` of the full logits in float64.

CPU CI runs the unmarked tests under ``TRITON_INTERPRET=1`` at tiny shapes with vocabulary tiles
narrower than the vocabulary (so a row takes several tiles and the last is partial) and
NaN-poisoned forward outputs; ``pytest -m gpu`` checks the 400M model's head in bf16 against the
torch path and the full logits.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # a fallback: torch >= 2.13 imports Triton with torch
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hybridkit.kernels.loss import linear_cross_entropy, resolve_backend  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernels(monkeypatch):
    """16-wide vocabulary tiles, and forward outputs that hold NaN until the kernel writes."""
    from hybridkit.kernels.loss import triton_kernels as tk

    monkeypatch.setattr(tk, "FWD_BLOCK", 16)
    monkeypatch.setattr(tk, "BWD_BLOCK", 16)
    real = tk.ce_forward

    def poisoned(logits, targets, loss, lse, ignore_index, smoothing):
        real(logits, targets, loss.fill_(float("nan")), lse.fill_(float("nan")), ignore_index,
             smoothing)  # fmt: skip

    monkeypatch.setattr(tk, "ce_forward", poisoned)


def _inputs(tokens, dim, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, dtype=F64, generator=g)
    weight = torch.randn(vocab, dim, dtype=F64, generator=g)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[::5] = -100
    return hidden, weight, targets


@pytest.mark.triton
@pytest.mark.parametrize(("tokens", "vocab", "chunk"), [(37, 29, 8), (9, 16, 4), (5, 3, 64)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_kernels_match_full_logits(tokens, vocab, chunk, smoothing, kernels):
    hidden64, weight64, targets = _inputs(tokens, 8, vocab)
    hidden64.requires_grad_()
    weight64.requires_grad_()
    ref = F.cross_entropy(
        hidden64 @ weight64.t(), targets, reduction="sum", label_smoothing=smoothing
    )
    g_ref = torch.autograd.grad(ref * 0.7, (hidden64, weight64))
    hidden = hidden64.detach().float().to(DEVICE).requires_grad_()
    weight = weight64.detach().float().to(DEVICE).requires_grad_()
    got = linear_cross_entropy(
        hidden, weight, targets.to(DEVICE), chunk_tokens=chunk, label_smoothing=smoothing,
        backend="triton",
    )  # fmt: skip
    g_got = torch.autograd.grad(got * 0.7, (hidden, weight))
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item())
    for a, b in zip(g_got, g_ref, strict=True):
        assert torch.isfinite(a).all() and rel_err(a.double().cpu(), b) < 1e-5
    assert torch.all(g_got[0][targets.to(DEVICE) == -100] == 0)  # ignored rows


@pytest.mark.triton
def test_kernels_agree_with_the_torch_path_in_bf16(kernels):
    """bf16 logits: the kernels and the ATen chunk path give the same loss and gradients up to
    the last bits of bf16 (the online log-sum-exp sums in another order)."""
    hidden64, weight64, targets = _inputs(24, 16, 40, seed=3)
    results = {}
    for backend in ("torch", "triton"):
        hidden = hidden64.to(torch.bfloat16).to(DEVICE).requires_grad_()
        weight = weight64.to(torch.bfloat16).to(DEVICE).requires_grad_()
        loss = linear_cross_entropy(
            hidden, weight, targets.to(DEVICE), chunk_tokens=16, label_smoothing=0.05,
            backend=backend,
        )  # fmt: skip
        loss.backward()
        results[backend] = (loss.detach(), hidden.grad, weight.grad)
    (l0, dh0, dw0), (l1, dh1, dw1) = results["torch"], results["triton"]
    assert rel_err(l1, l0) < 1e-5
    assert rel_err(dh1.float(), dh0.float()) < 1e-2 and rel_err(dw1.float(), dw0.float()) < 1e-2


@pytest.mark.triton
def test_target_outside_the_vocabulary_gives_nan_not_garbage(kernels):
    hidden, weight, targets = _inputs(6, 4, 10)
    targets[2] = 10
    loss = linear_cross_entropy(
        hidden.float().to(DEVICE), weight.float().to(DEVICE), targets.to(DEVICE),
        chunk_tokens=4, backend="triton",
    )  # fmt: skip
    assert torch.isnan(loss)


def test_backend_resolution_and_bad_backends():
    cpu = torch.zeros(2, 3)
    assert resolve_backend("auto", cpu, torch.float32) == "torch"  # CPU: the torch path
    assert resolve_backend("torch", cpu, torch.bfloat16) == "torch"
    with pytest.raises(ValueError, match="allowed: auto, torch, triton"):
        resolve_backend("cuda", cpu, torch.float32)
    with pytest.raises(ValueError, match="float64"):
        resolve_backend("triton", cpu, torch.float64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernels_at_the_400m_head_match_torch_and_full_logits():
    """16,384 tokens x 32,000 x 1,024 in bf16 autocast, label smoothing 0.1, a few ignored rows:
    the kernels against the ATen chunk path (the same numbers up to bf16 rounding) and the full
    float32 logits."""
    from hybridkit.kernels.loss import cross_entropy_sum

    tokens, vocab, dim = 16384, 32000, 1024
    g = torch.Generator(device="cuda").manual_seed(2)
    hidden0 = torch.randn(tokens, dim, device="cuda", generator=g)
    weight0 = torch.randn(vocab, dim, device="cuda", generator=g) * dim**-0.5
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    targets[::97] = -100
    results = {}
    for name in ("full", "torch", "triton"):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if name == "full":
                loss = cross_entropy_sum(
                    hidden, weight, targets, chunk_tokens=None, label_smoothing=0.1
                )
            else:
                loss = linear_cross_entropy(
                    hidden, weight, targets, chunk_tokens=4096, label_smoothing=0.1, backend=name
                )
        loss.backward()
        results[name] = (loss.detach(), hidden.grad, weight.grad)
    (l0, dh0, dw0), (l1, dh1, dw1), (l2, dh2, dw2) = (
        results[k] for k in ("full", "torch", "triton")
    )
    assert rel_err(l2, l1) < 1e-5 and rel_err(l2, l0) < 1e-3
    assert rel_err(dh2, dh1) < 1e-2 and rel_err(dw2, dw1) < 1e-2
    assert rel_err(dh2, dh0) < 2e-2 and rel_err(dw2, dw0) < 2e-2
