"""hybridkit: compose, train and study hybrid Mamba-3 / attention language models.

Typical use::

    from hybridkit import load_recipe, build_model
    recipe = load_recipe("hybridkit/recipes/tiny_hybrid.yaml", overrides=["model.d_model=64"])
    model = build_model(recipe, seed=0)
    logits = model(ids)
"""

from hybridkit.build import build_model
from hybridkit.cache import InferenceCache
from hybridkit.errors import CheckpointError, HybridkitError, RecipeError
from hybridkit.model import HybridLM
from hybridkit.plugins import load_plugins
from hybridkit.recipe import RecipeSpec, dump_recipe, load_recipe
from hybridkit.registry import register_layer, register_task
from hybridkit.spec import BlockSpec, ModelSpec

__version__ = "0.1.0"

__all__ = [
    "BlockSpec",
    "CheckpointError",
    "HybridLM",
    "HybridkitError",
    "InferenceCache",
    "ModelSpec",
    "RecipeError",
    "RecipeSpec",
    "build_model",
    "dump_recipe",
    "load_plugins",
    "load_recipe",
    "register_layer",
    "register_task",
]
