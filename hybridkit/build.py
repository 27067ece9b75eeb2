"""Compile a spec into a model: ``build_model(spec) -> HybridLM``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

import hybridkit.layers  # noqa: F401  (registers the built-in layer kinds)
from hybridkit.model import HybridLM
from hybridkit.spec import ModelSpec

if TYPE_CHECKING:  # recipe.py sits above build.py (it reads task and train sections too)
    from hybridkit.recipe import RecipeSpec


def build_model(
    spec: ModelSpec | RecipeSpec,
    *,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> HybridLM:
    """Build a randomly initialised :class:`HybridLM`.

    ``spec`` may be a whole recipe (its ``model`` section is used). With ``seed`` the initial
    weights are reproducible and the global RNG state is restored afterwards. ``device="meta"``
    builds the model without allocating or initialising any weight: the structure, parameter
    counts and cache sizes of a model of any size, in milliseconds (``hybridkit show``).
    """
    model_spec = spec if isinstance(spec, ModelSpec) else spec.model
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            model = HybridLM(model_spec)
        return model if dtype is None else model.to(dtype=dtype)
    if seed is None:
        model = HybridLM(model_spec)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = HybridLM(model_spec)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model
