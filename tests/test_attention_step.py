"""The fused attention decode step (``hybridkit/kernels/attention/step_kernel.py``, kernel
setting ``attention_step``).

CPU, through the Triton interpreter (the dispatch is forced: it otherwise needs a CUDA tensor):
a model with every attention variant (RoPE and NoPE, MHA / GQA / MQA, qk norm, a sliding window
whose ring wraps) decodes statically through the kernel to the full forward's logits in float64,
and to the torch static step's in float32; the ring holds what the torch path writes. The
dispatch rules. GPU (``-m gpu``): bf16 tokens through the CUDA graph with the kernel equal the
eager kernel step's, and its logits stay near the forward's.
"""

from __future__ import annotations

import pytest
import torch

from hybridkit import build_model
from hybridkit.check import _perturb_constant_params
from hybridkit.kernels import attention as attn_ops
from hybridkit.kernels import config
from tests.helpers import attn_block, mamba_block, rel_err, tiny_recipe

KINDS = dict(
    s=mamba_block(),
    a=attn_block(position="rope", n_kv_heads=1),  # MQA
    w=attn_block(window=3, n_heads=4, n_kv_heads=2, position="rope"),  # GQA, ring wraps
    n=attn_block(position="nope", qk_norm=True),  # MHA, no rotation, qk norm
    q=attn_block(position="rope", qk_norm=True, n_heads=4, n_kv_heads=2, window=5),
)


def _model(dtype, device="cpu"):
    model = build_model(tiny_recipe("s a w n q", **KINDS), seed=0, dtype=dtype, device=device)
    _perturb_constant_params(model, torch.Generator(device="cpu").manual_seed(1))
    return model.eval()


def _static_logits(model, ids, prefill, device="cpu"):
    with torch.no_grad():
        cache = model.allocate_cache(ids.shape[0], ids.shape[1])
        got = [model(ids[:, :prefill], cache=cache)]
        cache.make_static(torch.zeros(1, dtype=torch.long, device=device))
        got += [model.step(ids[:, t], cache)[:, None] for t in range(prefill, ids.shape[1])]
    return torch.cat(got, dim=1), cache


@pytest.fixture
def forced(monkeypatch):
    """Every static attention step through the kernel (interpreter), counting the calls."""
    calls = []

    def kernel(device, dtype, head_dim):
        calls.append(head_dim)
        return True

    monkeypatch.setattr(attn_ops, "static_step_kernel", kernel)
    return calls


@pytest.mark.triton
@pytest.mark.parametrize("prefill", [1, 4])
def test_kernel_step_equals_forward_float64(prefill, forced, one_thread):
    model = _model(torch.float64)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        want = model(ids)
    got, _ = _static_logits(model, ids, prefill)
    assert len(forced) == 4 * (ids.shape[1] - prefill)  # four attention layers per step
    assert rel_err(got, want) < 1e-10


@pytest.mark.triton
def test_kernel_step_equals_torch_step_float32_and_writes_the_ring(forced, monkeypatch):
    """fp32 (full-precision products): logits and every ring within fp32 rounding of the torch
    static step's, over enough steps that both windowed rings wrap."""
    model = _model(torch.float32)
    ids = torch.randint(0, 64, (3, 14))
    got, cache = _static_logits(model, ids, 2)
    monkeypatch.setattr(attn_ops, "static_step_kernel", lambda *args: False)
    want, ref = _static_logits(model, ids, 2)
    assert rel_err(got, want) < 1e-5
    for idx, kv in ref.layers.items():
        if hasattr(kv, "ring_size"):
            ring = kv.ring_size()
            torch.testing.assert_close(cache.layers[idx].k[:, :ring], kv.k[:, :ring])
            torch.testing.assert_close(cache.layers[idx].v[:, :ring], kv.v[:, :ring])


@pytest.mark.triton
def test_dispatch_needs_the_setting_cuda_a_dtype_and_an_even_head_dim(monkeypatch):
    """On by default; it needs CUDA, bf16 / fp16 / fp32 and an even head_dim <= 256, and
    ``hybridkit show`` names it as the decode step's attention."""
    from hybridkit.summary import summarize

    monkeypatch.delenv(config.ENV_VAR, raising=False)
    bf16 = torch.bfloat16
    assert attn_ops.static_step_kernel("cuda", bf16, 64)
    with config.kernel_config(attention_step=False):
        assert not attn_ops.static_step_kernel("cuda", bf16, 64)
    with config.kernel_config(attention_step=True):
        assert attn_ops.static_step_kernel("cuda", bf16, 64)
        assert not attn_ops.static_step_kernel("cpu", bf16, 64)
        assert not attn_ops.static_step_kernel("cuda", torch.float64, 64)
        assert not attn_ops.static_step_kernel("cuda", bf16, 7)
        model = _model(torch.float32)
        shown = summarize(model, seq_len=64, device="cuda").backends["attention (decode)"]
        assert "triton step kernel" in shown
    assert "attention_step=0" in config.changed_settings(config.parse_env("attention_step=0"))


def test_kernel_refuses_mismatched_shapes():
    from hybridkit.kernels.attention.step_kernel import attention_step

    ring = torch.zeros(1, 4, 2, 8)
    pos = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="does not hold"):
        attention_step(torch.zeros(1, 40), ring, ring, 4, pos, n_heads=4, n_kv_heads=2,
                       scale=1.0, rope_theta=None)  # fmt: skip


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_graph_tokens_equal_eager_and_logits_near_forward():
    """bf16 with ``attention_step``: 256 greedy tokens through the CUDA graph equal the eager
    kernel step's; each static step's logits stay within bf16 tolerance of the forward."""
    from hybridkit.generation import Sampling, generate

    model = _model(torch.bfloat16, device="cuda")
    ids = torch.randint(0, 64, (4, 16), device="cuda")
    with config.kernel_config(attention_step=True):
        graph = generate(model, ids, 256, sampling=Sampling(temperature=0), use_graph=True)
        eager = generate(model, ids, 256, sampling=Sampling(temperature=0), use_graph=False)
        with torch.no_grad():
            want = model(graph[:, :64]).float()
        got, _ = _static_logits(model, graph[:, :64], 16, device="cuda")
    assert torch.equal(graph, eager)
    assert rel_err(got.float(), want) < 3e-2
