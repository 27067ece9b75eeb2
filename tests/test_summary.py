"""``hybridkit show``'s numbers come from the layers and the dispatch points (no re-implemented
dispatch): the MIMO report, per-layer backends when layers differ, custom layers' states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybridkit import build_model, load_recipe
from hybridkit.layers.base import cache_bytes
from hybridkit.summary import summarize
from tests.helpers import attn_block, mamba_block, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.triton
def test_mimo_recipe_reports_the_triton_path_on_cuda():
    """MIMO prefill runs the Triton scan for ranks 2 / 4 / 8; decode the fused step (any R)."""
    recipe = load_recipe(ROOT / "hybridkit/recipes/mamba3_mimo_s.yaml")
    backends = summarize(build_model(recipe, seed=0), seq_len=2048, device="cuda").backends
    assert backends["mamba3 scan (prefill)"] == "triton"
    recipe.model.blocks["m"].mixer.mimo_rank = 3  # no kernel for rank 3: chunked, with why
    backends = summarize(build_model(recipe, seed=0), seq_len=2048, device="cuda").backends
    assert backends["mamba3 scan (prefill)"].startswith("chunked (rank 3")
    # the fused step, split over step_split programs per head (default 4) and a finish launch
    assert backends["mamba3 step (decode)"].startswith("triton (step_split=4")
    cpu = summarize(build_model(recipe, seed=0), seq_len=2048, device="cpu").backends
    assert cpu["mamba3 step (decode)"] == "reference"


@pytest.mark.triton
def test_backends_listed_per_layer_when_layers_differ():
    blocks = {
        "m": mamba_block(d_state=32, headdim=32, chunk_size=64),
        "w": mamba_block(d_state=32, headdim=32, chunk_size=256),  # no Triton kernel for it
        "a": attn_block(),
    }
    model = build_model(tiny_recipe("m w a", d_model=32, **blocks), seed=0)
    s = summarize(model, seq_len=128, device="cuda", act_dtype="bfloat16")
    prefill = s.backends["mamba3 scan (prefill)"]
    assert prefill.startswith("triton: layers 0; chunked (chunk_size 256"), prefill
    assert prefill.endswith("layers 1")


def test_state_and_kv_bytes_come_from_each_layers_cache():
    model = build_model(tiny_recipe("m a", d_model=16), seed=0)
    s = summarize(model, seq_len=64, device="cpu", act_dtype="bfloat16")
    mamba, attn = model.blocks[0].mixer, model.blocks[1].mixer
    expected_state = sum(
        t.numel() * t.element_size()
        for t in mamba.allocate_cache(1, 0, torch.bfloat16, torch.device("meta"))
    )
    assert s.state_bytes_per_seq == expected_state
    assert s.kv_bytes_per_token == 2 * attn.n_kv_heads * attn.head_dim * 2
    assert s.kv_bytes_at[1024] == 1024 * s.kv_bytes_per_token


def test_custom_layer_state_is_counted():
    import examples.custom_layer as module  # registers the "shortconv" layer kind

    model = build_model(load_recipe(module.RECIPE), seed=0)
    s = summarize(model, seq_len=64, device="cpu", act_dtype="float32")
    convs = [b.mixer for b in model.blocks if b.mixer.spec.kind == "shortconv"]
    conv_bytes = sum(cache_bytes(c, 0, torch.float32) for c in convs)
    assert conv_bytes == len(convs) * (4 - 1) * 32 * 4  # (width - 1) inputs of d_model fp32
    mamba_bytes = sum(
        cache_bytes(b.mixer, 0, torch.float32)
        for b in model.blocks
        if b.mixer.spec.kind == "mamba3"
    )
    assert s.state_bytes_per_seq == conv_bytes + mamba_bytes
