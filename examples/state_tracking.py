"""State tracking with and without Mamba-3's data-dependent rotation (Table 5b, small scale).

Trains one Mamba-3 layer on parity with a length curriculum, once with the rotation ("complex"
SSM) and once with ``rope: false`` (a real-valued SSM whose eigenvalues are positive reals and
so cannot count modulo 2), then evaluates beyond the training lengths. Scaled accuracy: 0 =
chance, 100 = perfect.

    python examples/state_tracking.py [--steps N] [--recipe hybridkit/recipes/parity_gpu.yaml]

The recipe's own step count (1,200 for ``parity_tiny``) covers its three curriculum stages; a
run of fewer steps stops in an earlier stage, at shorter strings than it is evaluated on, and
says so (the trainer warns), so its scores do not show the comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hybridkit import load_recipe
from hybridkit.eval.lengthgen import evaluate_lengths
from hybridkit.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent / "hybridkit" / "recipes"


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "parity_tiny.yaml"))
    parser.add_argument("--out", default="runs/state_tracking")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    args = parser.parse_args(argv)
    arms = {  # name -> (run folder, overrides)
        "mamba3 (rotation)": ("rope_on", []),
        "mamba3, rope off": ("rope_off", ["model.blocks.m.mixer.rope=false"]),
    }
    results = {}
    for name, (folder, overrides) in arms.items():
        if args.steps:
            overrides = [*overrides, f"train.steps={args.steps}"]
        recipe = load_recipe(args.recipe, overrides)
        run_dir = Path(args.out) / folder
        trainer = Trainer(recipe, run_dir, resume="auto", progress=True)
        trainer.fit()
        results[name] = evaluate_lengths(
            trainer.model, trainer.task, trainer.task.eval_lengths, decode_examples=0
        )
    for name, res in results.items():
        cells = ", ".join(f"{r['length']}: {100 * r['scaled_acc']:.1f}" for r in res)
        print(f"{name:>20}: scaled accuracy by length -> {cells}")
    return results


if __name__ == "__main__":
    main()
