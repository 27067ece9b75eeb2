"""The model's Mamba-3 layers (SISO and MIMO) on a GPU go through the Triton kernels, and train
and prefill correctly there: gradients of a whole hybrid model against the chunked path,
prefill handed on to decode, and a short bf16 training run. (The kernels themselves are checked
against the float64 reference in ``test_triton_siso.py`` and ``test_triton_mimo.py``.)"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from hybridkit import build_model
from hybridkit.recipe import load_recipe
from hybridkit.train.metrics import read_metrics
from hybridkit.train.trainer import Trainer
from tests.helpers import (
    assert_same_loss_and_grads,
    attn_block,
    mamba_block,
    prefill_then_steps,
    rel_err,
    spy_triton_scan,
    tiny_model,
    tiny_recipe,
)

pytestmark = pytest.mark.gpu


def _blocks(backend: str, rank: int = 1) -> dict:
    # two Mamba-3 layers (one grouped, one with the grouped pre-gate norm) around NoPE attention;
    # H = 2 * 128 / 32 = 8 heads, N 64, chunk 64 (SISO) or 64 / R (MIMO)
    m = dict(d_state=64, headdim=32, chunk_size=64 // rank, backend=backend, mimo_rank=rank)
    return {
        "m": mamba_block(**m, outproj_norm="grouped_pregate"),
        "g": mamba_block(**m, ngroups=2),
        "a": attn_block(n_heads=4, head_dim=32),
    }


def _model_recipe(backend: str, rank: int = 1):
    return tiny_recipe("m a g", d_model=128, vocab=97, **_blocks(backend, rank))


@pytest.fixture
def triton_calls(monkeypatch) -> Iterator[list[bool]]:
    """Records ``return_state`` of every call into the Triton scan."""
    yield spy_triton_scan(monkeypatch)


@pytest.mark.parametrize("rank", [1, 4])
def test_model_gradients_match_chunked_path(triton_calls, rank: int):
    ids = torch.randint(0, 97, (2, 300), device="cuda")  # 300: not a multiple of the chunk
    model = {
        b: build_model(_model_recipe(b, rank).model, seed=3).cuda() for b in ("auto", "chunked")
    }
    assert_same_loss_and_grads(model["auto"], model["chunked"], ids, 1e-5, 1e-4)
    assert triton_calls == [False, False], "auto on CUDA must run both layers in Triton"


@pytest.mark.parametrize("rank", [1, 4])
def test_prefill_hands_over_to_decode(triton_calls, rank: int):
    """Full forward == prefill (Triton, final state out) + continued prefill (Triton, initial
    state in) + single-token steps (the recurrence), in fp32."""
    model = build_model(_model_recipe("auto", rank).model, seed=4).cuda().eval()
    first, second, steps = 150, 37, 5
    ids = torch.randint(0, 97, (2, first + second + steps), device="cuda")
    with torch.no_grad():
        full = model(ids)
    parts = prefill_then_steps(model, ids, first, second)
    assert triton_calls == [False, False, True, True, True, True]
    assert rel_err(parts, full) < 1e-4


def _mqar_recipe(name: str, **train):
    """A 3-block GPU hybrid (two SISO Mamba-3, one NoPE attention) on MQAR at 64 tokens."""
    return load_recipe(
        {
            "name": name,
            "seed": 0,
            "model": tiny_model("m a g", d_model=128, vocab=97, **_blocks("auto")),
            "task": {"kind": "mqar", "vocab_size": 97, "seq_len": 64, "num_kv_pairs": 8},
            "train": {
                "batch_size": 32,
                "lr": 3e-3,
                "device": "cuda",
                "tensorboard": False,
                **train,
            },
            "eval": {"decode_examples": 2, "lengths": [64]},
        }
    )


def test_bf16_training_run_learns(tmp_path, triton_calls):
    """The trainer (bf16 autocast on GPU) through the Triton kernels: finite, falling loss."""
    recipe = _mqar_recipe("gpu-smoke", steps=60, log_every=1, checkpoint_every=0)
    Trainer(recipe, tmp_path / "run", resume=None, progress=False).fit()
    assert triton_calls and not any(triton_calls[:2]), "training must run the SISO layers in Triton"
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:5]) / 5, losses


def test_cuda_graph_compile_mode_trains_like_default_compile(tmp_path):
    """train.compile_mode reduce-overhead replays Inductor's kernels through CUDA graphs: the
    loss curve of a default-mode compiled run, to bf16 noise (both through the Triton SISO scan)."""
    curves = {}
    for mode in ("default", "reduce-overhead"):
        train = dict(steps=12, log_every=3, checkpoint_every=6, compile=True, compile_mode=mode)
        recipe = _mqar_recipe(f"gpu-{mode}", **train)
        Trainer(recipe, tmp_path / mode, resume=None, progress=False).fit()
        curves[mode] = [r["loss"] for r in read_metrics(tmp_path / mode) if "loss" in r]
    assert len(curves["default"]) == len(curves["reduce-overhead"]) == 4
    for a, b in zip(curves["default"], curves["reduce-overhead"]):
        assert math.isclose(a, b, rel_tol=2e-2), curves
