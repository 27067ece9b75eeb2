"""hybridkit: compose, train and study hybrid Mamba-3 / attention language models.

The Python API (README "Python API")::

    from hybridkit import Trainer, evaluate_run, load_recipe, load_run
    recipe = load_recipe("hybridkit/recipes/induction_tiny.yaml", overrides=["train.steps=100"])
    Trainer(recipe, "runs/demo").fit()              # checkpoints, metrics.jsonl, final eval
    payload = evaluate_run("runs/demo", lengths=[32, 64])  # eval.json / eval.md / eval.png
    recipe, model = load_run("runs/demo")             # the trained model
    model.generate(ids, max_new_tokens=8)

The training and evaluation entry points are imported on first use (``hybridkit.Trainer``), so
that ``import hybridkit`` for building a model does not also load the trainer, the evaluator
and matplotlib.
"""

from typing import Any

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
    "Trainer",
    "build_model",
    "dump_recipe",
    "evaluate_lengths",
    "evaluate_run",
    "load_plugins",
    "load_recipe",
    "load_run",
    "register_layer",
    "register_task",
    "run_study",
]


def __getattr__(name: str) -> Any:
    """The training, evaluation and study entry points, imported when first asked for."""
    if name == "Trainer":
        from hybridkit.train.trainer import Trainer

        return Trainer
    if name == "evaluate_run":
        from hybridkit.eval.report import evaluate_run

        return evaluate_run
    if name == "evaluate_lengths":
        from hybridkit.eval.lengthgen import evaluate_lengths

        return evaluate_lengths
    if name == "load_run":
        from hybridkit.rundir import load_run

        return load_run
    if name == "run_study":
        from hybridkit.study import run_study

        return run_study
    raise AttributeError(f"module 'hybridkit' has no attribute {name!r}")
