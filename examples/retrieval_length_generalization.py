"""Length generalisation of retrieval, through the Python API (the `hybridkit study` equivalent).

Trains four small architectures on single associative recall ("induction heads") at 32 tokens
and evaluates them at 32-256 tokens: attention-only (RoPE), Mamba-3-only, and two Mamba-3 + NoPE
attention hybrids, without and with the grouped pre-gate RMSNorm that the Mamba-3 paper found
crucial for extrapolation. Writes runs, a Markdown table and a plot under ``--out``.

    python examples/retrieval_length_generalization.py --out runs/retrieval --steps 300
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hybridkit import load_recipe
from hybridkit.eval.lengthgen import evaluate_lengths
from hybridkit.eval.plots import plot_lengthgen
from hybridkit.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parent.parent / "hybridkit" / "recipes" / "induction_tiny.yaml"

ARMS = {  # name -> (run folder, overrides of the base recipe)
    "attention (RoPE)": ("attention", ["model.layout=a a", "model.blocks.a.mixer.position=rope"]),
    "mamba3": ("mamba3", ["model.layout=m m", "model.blocks.m.mixer.outproj_norm=none"]),
    "hybrid, no norm": ("hybrid_no_norm", ["model.blocks.m.mixer.outproj_norm=none"]),
    "hybrid, grouped pre-gate norm": (
        "hybrid_grouped_norm",
        ["model.blocks.m.mixer.outproj_norm=grouped_pregate"],
    ),
}


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/retrieval_lengthgen")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lengths", default="32,64,128,256")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    out = Path(args.out)
    results: dict[str, list[dict]] = {}
    for name, (folder, overrides) in ARMS.items():
        recipe = load_recipe(RECIPE, [*overrides, f"train.steps={args.steps}"])
        run_dir = out / folder
        trainer = Trainer(recipe, run_dir, resume="auto", progress=True)
        trainer.fit()
        results[name] = evaluate_lengths(trainer.model, trainer.task, lengths, decode_examples=4)
    lines = ["| arm | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---:|" * len(lengths)]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['ex_match']:.1f}" for r in res) + " |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    plot_lengthgen(
        {name: [(r["length"], r["ex_match"]) for r in res] for name, res in results.items()},
        out / "lengthgen.png",
        train_length=lengths[0],
        title="induction heads: ex_match vs length",
    )
    print(table)
    print(f"plot: {out / 'lengthgen.png'}")
    return results


if __name__ == "__main__":
    main()
