"""Packed batches (``cu_seqlens``) under ``torch.compile``: graph breaks counted, fullgraph where
the backends allow it.

The attention side (sdpa's block-diagonal mask from ``searchsorted``, FA4's varlen op) and the
Triton Mamba-3 scan (its chunk tables are built inside the custom op) need no host value, so a
packed model whose scans run on Triton compiles with ``fullgraph=True`` (GPU test). The torch
chunked scan (the CPU path) still splits the packed call per sequence from
``cu_seqlens.tolist()`` in ``kernels/mamba3/reference.py``; the test below pins that this is
the *only* source of graph breaks, so that a new host sync anywhere
else in the model fails here.
"""

from __future__ import annotations

import pytest
import torch

from hybridkit import build_model
from tests.helpers import attn_block, mamba_block, needs_torch_2_6_compile, rel_err, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _packed(vocab: int, device: str = "cpu"):
    ids = torch.randint(0, vocab, (1, 20), device=device)
    cu = torch.tensor([0, 7, 16, 20], device=device, dtype=torch.int32)
    return ids, cu


@needs_torch_2_6_compile
def test_packed_attention_model_compiles_fullgraph_without_breaks():
    torch._dynamo.reset()
    recipe = tiny_recipe(
        "a a", d_model=16, vocab=32, a=attn_block(position="rope"), m=mamba_block()
    )
    model = build_model(recipe, seed=0)
    ids, cu = _packed(32)
    explained = torch._dynamo.explain(model)(ids, cu_seqlens=cu, targets=ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    eager = model(ids, cu_seqlens=cu, targets=ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(ids, cu_seqlens=cu, targets=ids)
    assert rel_err(got, eager) < 1e-5
    got.backward()
    assert all(p.grad is not None for p in model.parameters())


@needs_torch_2_6_compile
def test_packed_hybrid_breaks_only_at_the_chunked_scans_sequence_split():
    torch._dynamo.reset()
    recipe = tiny_recipe("m a m", d_model=16, vocab=32, m=mamba_block(), a=attn_block())
    model = build_model(recipe, seed=0)
    ids, cu = _packed(32)
    explained = torch._dynamo.explain(model)(ids, cu_seqlens=cu, targets=ids)
    sites = {b.user_stack[-1].name for b in explained.break_reasons if b.user_stack}
    assert sites == {"_sequence_bounds"}, [b.reason for b in explained.break_reasons]
    # each break resumes in a new frame that breaks again on the same line: 4 per layer here
    assert explained.graph_break_count >= 2


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpu_packed_hybrid_compiles_fullgraph(checkpointing):
    torch._dynamo.reset()
    m = mamba_block(outproj_norm="grouped_pregate", d_state=32, headdim=32, chunk_size=64)
    recipe = tiny_recipe("m a m", d_model=64, vocab=128, m=m, a=attn_block(head_dim=32))
    model = build_model(recipe, seed=0).cuda()
    model.activation_checkpointing = checkpointing
    model.loss_chunk_tokens = 128
    plan = model.blocks[0].mixer.backends("cuda", torch.bfloat16, 1000)["mamba3 scan"]
    assert plan.startswith("triton"), plan  # the chunked path would break on cu_seqlens
    ids = torch.randint(0, 128, (1, 1000), device="cuda")
    cu = torch.tensor([0, 300, 301, 777, 1000], device="cuda", dtype=torch.int32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(ids, cu_seqlens=cu, targets=ids)
        compiled = torch.compile(model, fullgraph=True)(ids, cu_seqlens=cu, targets=ids)
    assert rel_err(compiled, eager) < 1e-2
    compiled.backward()
