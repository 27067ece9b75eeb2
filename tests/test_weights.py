"""Loading safetensors weights into a model (``hybridkit.weights.load_weights``): a file that
does not fit is a CheckpointError naming the tensor, never a silent cast or overwrite."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hybridkit import build_model
from hybridkit.errors import CheckpointError
from hybridkit.weights import load_weights, save_weights
from tests.helpers import tiny_recipe


def _model():
    model = build_model(tiny_recipe("m a"), seed=0)
    assert model.spec.tie_embeddings
    return model


def test_weights_round_trip_and_foreign_files_are_named(tmp_path):
    model = _model()
    path = tmp_path / "model.safetensors"
    save_weights(model, path)
    other = build_model(tiny_recipe("m a"), seed=1)
    load_weights(other, path)
    pairs = zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    # an integer tensor was cast to float without a word
    bad = dict(state, **{"embedding.weight": state["embedding.weight"].long()})
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match="embedding.weight: file dtype torch.int64"):
        load_weights(other, path)
    # a head of its own in the file of a tied model overwrote the embedding
    head = dict(state, **{"lm_head.weight": torch.randn_like(state["embedding.weight"])})
    save_file(head, str(path))
    with pytest.raises(CheckpointError, match="ties it to the embedding"):
        load_weights(other, path)
    # the same head stored twice (tied) is fine
    save_file(dict(state, **{"lm_head.weight": state["embedding.weight"].clone()}), str(path))
    load_weights(other, path)
