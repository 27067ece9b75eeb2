"""Helpers shared by the tests: ``slow`` parameters and small recipe builders."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from hybridkit.recipe import load_recipe


def slow_params(values: Iterable[str], slow: set[str]) -> list:
    """``values`` for ``parametrize``, those in ``slow`` marked ``slow``."""
    values = list(values)
    assert slow <= set(values), f"no such parameters: {sorted(slow - set(values))}"
    return [pytest.param(v, marks=pytest.mark.slow) if v in slow else v for v in values]


def mamba_block(**mixer: Any) -> dict:
    base = {"kind": "mamba3", "d_state": 8, "headdim": 8, "chunk_size": 8}
    base.update(mixer)
    return {"mixer": base, "mlp": {"kind": "mlp", "d_ff": 32}}


def attn_block(**mixer: Any) -> dict:
    base = {"kind": "attention", "n_heads": 2, "head_dim": 8, "position": "nope"}
    base.update(mixer)
    return {"mixer": base, "mlp": {"kind": "mlp", "d_ff": 32}}


def tiny_recipe(layout: str = "m a", *, d_model: int = 16, vocab: int = 64, **blocks: dict):
    blocks = blocks or {"m": mamba_block(), "a": attn_block()}
    return load_recipe(
        {"model": {"d_model": d_model, "vocab_size": vocab, "blocks": blocks, "layout": layout}}
    )
