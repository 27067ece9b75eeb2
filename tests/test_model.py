"""Model compiler and inference: decode == forward, generation, packing, parameter counts."""

from __future__ import annotations

import pytest
import torch

from hybridkit import build_model
from hybridkit.check import consistency_check
from tests.helpers import attn_block, mamba_block, slow_params, tiny_recipe

LAYOUTS = {
    "siso": ("m m", {"m": mamba_block()}),
    "mimo": ("m m", {"m": mamba_block(mimo_rank=2, chunk_size=4)}),
    "attention": ("a a", {"a": attn_block(position="rope")}),
    "gqa_window": (
        "a",
        {"a": attn_block(n_heads=4, n_kv_heads=2, head_dim=4, window=5, qk_norm=True)},
    ),
    "mixed": ("m a m", {"m": mamba_block(outproj_norm="grouped_pregate"), "a": attn_block()}),
    "mixed_mimo_norm": (
        "m a",
        {
            "m": mamba_block(mimo_rank=2, chunk_size=4, outproj_norm="grouped_pregate"),
            "a": attn_block(),
        },
    ),
    "ablations": (
        "m n",
        {"m": mamba_block(rope=False), "n": mamba_block(trapezoid=False, ngroups=2)},
    ),
    "norm_variants": (
        "p q r",
        {
            "p": mamba_block(outproj_norm="pregate"),
            "q": mamba_block(outproj_norm="postgate"),
            "r": mamba_block(outproj_norm="grouped_postgate", a_activation="softplus"),
        },
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_decode_equals_forward(name):
    layout, blocks = LAYOUTS[name]
    recipe = tiny_recipe(layout, **blocks)
    report = consistency_check(recipe.model, batch=2, steps=5, seed=1)
    assert report.ok, [(e.index, e.rel) for e in report.layers]
    assert report.logits_rel < 1e-10


def test_forward_shapes_and_param_counts():
    recipe = tiny_recipe("m a m")
    model = build_model(recipe, seed=0)
    ids = torch.randint(0, 64, (3, 11))
    assert model(ids).shape == (3, 11, 64)
    counts = model.param_counts()
    assert sum(counts.values()) == model.num_params()
    assert counts["head"] == 0  # tied
    assert set(counts) >= {"mamba3", "attention", "mlp", "embedding"}


def test_block_param_counts_add_up_and_match_the_show_table():
    from hybridkit.summary import summarize

    model = build_model(tiny_recipe("m a m"), seed=0)
    counts = model.param_counts()
    blocks = sum(b.num_params() for b in model.blocks)
    assert blocks + counts["embedding"] + counts["head"] + counts["final_norm"] == (
        model.num_params()
    )
    rows = summarize(model, seq_len=16).rows
    assert [r.params for r in rows] == [b.num_params() for b in model.blocks]


def test_build_seed_reproducible():
    recipe = tiny_recipe()
    a, b = build_model(recipe, seed=3), build_model(recipe, seed=3)
    c = build_model(recipe, seed=4)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_generate_deterministic_with_seed():
    model = build_model(tiny_recipe(), seed=0)
    ids = torch.randint(0, 64, (2, 5))
    g1 = model.generate(ids, 8, temperature=1.0, top_k=10, seed=7)
    g2 = model.generate(ids, 8, temperature=1.0, top_k=10, seed=7)
    g3 = model.generate(ids, 8, temperature=1.0, top_k=10, seed=8)
    assert g1.shape == (2, 13) and torch.equal(g1[:, :5], ids)
    assert torch.equal(g1, g2)
    assert not torch.equal(g1, g3)


@pytest.mark.parametrize("seed", [None, 7])
def test_generate_leaves_the_global_rng_alone(seed):
    model = build_model(tiny_recipe(), seed=0)
    ids = torch.randint(0, 64, (2, 5))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model.generate(ids, 4, temperature=1.0, seed=seed)
    assert torch.equal(torch.get_rng_state(), before)


def test_generate_without_seed_differs_between_calls():
    model = build_model(tiny_recipe(), seed=0)
    ids = torch.randint(0, 64, (2, 5))
    draws = {tuple(model.generate(ids, 12, temperature=1.0).flatten().tolist()) for _ in range(3)}
    assert len(draws) > 1  # fresh entropy per call; 3 equal draws of 24 tokens are ~impossible


def test_greedy_generate_matches_full_forward_argmax():
    model = build_model(tiny_recipe(), seed=0, dtype=torch.float64)
    ids = torch.randint(0, 64, (2, 6))
    out = model.generate(ids, 6, temperature=0)
    logits = model(out[:, :-1])
    assert torch.equal(logits[:, 5:].argmax(-1), out[:, 6:])


def test_packed_sequences_equal_separate():
    model = build_model(
        tiny_recipe("m a m", m=mamba_block(), a=attn_block(position="rope")), seed=0
    )
    model = model.double()
    lengths = [5, 11, 3]
    seqs = [torch.randint(0, 64, (1, n)) for n in lengths]
    packed = torch.cat(seqs, dim=1)
    cu = torch.tensor([0, 5, 16, 19])
    out = model(packed, cu_seqlens=cu)
    ref = torch.cat([model(s) for s in seqs], dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_residual_output_init_is_scaled():
    model = build_model(tiny_recipe("m a m a"), seed=0)
    # 4 mixers + 4 MLPs = 8 residual branches: bound of kaiming-uniform(a=sqrt 5) / sqrt(8)
    w = model.blocks[0].mixer.out_proj.weight
    bound = 1 / w.shape[1] ** 0.5 / 8**0.5
    assert w.abs().max() <= bound + 1e-6
    assert w.abs().max() > 0.5 * bound


def test_ids_must_be_2d():
    model = build_model(tiny_recipe(), seed=0)
    with pytest.raises(ValueError, match="batch, seqlen"):
        model(torch.zeros(4, dtype=torch.long))


def test_kv_cache_overflow_is_clear():
    model = build_model(tiny_recipe("a"), seed=0)
    cache = model.allocate_cache(1, 4)
    with pytest.raises(ValueError, match="max_seqlen"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_custom_layer_example():
    import examples.custom_layer as ex

    result = ex.main()
    assert result["check_ok"]
    assert result["counts"]["shortconv"] > 0


@pytest.mark.parametrize("name", ["siso", "mimo", "mixed"])
def test_gradients_have_the_parameters_strides(name: str):
    """DDP copies gradients into bucket views laid out like the parameters; a gradient with
    other strides (even only in a size-1 dimension) costs a copy and a warning every step."""
    layout, blocks = LAYOUTS[name]
    model = build_model(tiny_recipe(layout, **blocks).model, seed=0)
    ids = torch.randint(0, model.spec.vocab_size, (2, 11))
    model(ids).float().square().mean().backward()
    bad = {
        n: (tuple(p.grad.stride()), tuple(p.stride()))
        for n, p in model.named_parameters()
        if p.grad is not None and p.grad.stride() != p.stride()
    }
    assert not bad, bad


@pytest.mark.parametrize("backend", slow_params(["chunked", "triton"], {"triton"}))
def test_activation_checkpointing_gives_the_same_gradients(backend):
    """Recomputing each block in the backward changes memory, not results (the Triton scan runs
    in the interpreter on the CPU); decoding with a cache is untouched by the flag."""
    blocks = {
        "m": mamba_block(backend=backend, d_state=16, headdim=8, chunk_size=16),
        "a": attn_block(),
    }
    model = build_model(tiny_recipe("m a", d_model=16, **blocks), seed=0)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        model(ids).float().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        out = model.generate(ids[:, :4], max_new_tokens=3, seed=0)
    assert out.shape == (2, 7)
