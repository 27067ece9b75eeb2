"""Open what a command is pointed at: a recipe file, or a run directory with its weights.

``show``, ``generate`` and ``check`` accept either; ``eval`` and studies need a trained run. One
loader serves them all, so "is this a run directory?" and "which weights does it hold?" have one
answer and one error message (the layout itself is described in :mod:`hybridkit.weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hybridkit.build import build_model
from hybridkit.errors import HybridkitError
from hybridkit.model import HybridLM
from hybridkit.recipe import RecipeSpec, load_recipe
from hybridkit.weights import find_weights, load_weights

__all__ = ["load_run", "load_source"]


def load_source(
    source: str | Path,
    overrides: Sequence[str] = (),
    *,
    run_only: bool = False,
    plugins: Sequence[str] = (),
) -> tuple[RecipeSpec, Path | None]:
    """A recipe file or a run directory -> ``(recipe, weights path or None)``.

    With ``run_only`` a recipe file is refused: the caller needs trained weights. ``plugins``
    are imported before the recipe is validated (a run directory's recipe names its own).
    """
    path = Path(source)
    recipe_path = path / "recipe.yaml"
    try:
        is_run = path.is_dir() or run_only
        has_recipe = is_run and recipe_path.is_file()
        exists = path.exists()
    except OSError as exc:  # a name too long for the file system, ...: not a traceback
        raise HybridkitError(f"cannot open {source}: {exc.strerror or exc}") from None
    if is_run:
        if not has_recipe:
            hint = "" if run_only else "; pass a recipe file or a run directory"
            raise HybridkitError(f"{path} is not a run directory (no recipe.yaml){hint}")
        return load_recipe(recipe_path, overrides, plugins=plugins), find_weights(path)
    if not exists:
        raise HybridkitError(f"no such recipe file or run directory: {source}")
    return load_recipe(path, overrides, plugins=plugins), None


def load_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[RecipeSpec, HybridLM]:
    """The recipe and trained model of a run directory (weights of its newest checkpoint)."""
    recipe, model, _weights = load_run_weights(run_dir, overrides)
    return recipe, model


def load_run_weights(
    run_dir: str | Path, overrides: Sequence[str] = ()
) -> tuple[RecipeSpec, HybridLM, Path]:
    """:func:`load_run` and the weights file it loaded (``model.safetensors`` of the run, or of
    its newest checkpoint when the run has not written its own)."""
    recipe, weights = load_source(run_dir, overrides, run_only=True)
    model = build_model(recipe, seed=recipe.seed)
    load_weights(model, weights)
    return recipe, model, weights
