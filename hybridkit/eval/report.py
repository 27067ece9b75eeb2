"""Evaluate a finished (or in-progress) run directory and write eval.json / eval.md / PNGs, and
the two uncertainty numbers every accuracy we report carries (docs/tasks.md section 0).

An accuracy measured on n examples moves by about ``sqrt(p (1 - p) / n)`` from one draw of the
test set to the next, even for a fixed model: :func:`binomial_stderr`. A second training run with
another seed moves it too, often more: :func:`spread` summarises the values over seeds. A table
that shows neither invites reading noise as a result.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hybridkit.errors import HybridkitError
from hybridkit.eval.lengthgen import evaluate_lengths
from hybridkit.eval.plots import plot_depth_heatmap, plot_lengthgen
from hybridkit.footprint import check_recipe_eval
from hybridkit.rundir import load_run_weights
from hybridkit.runtime import resolve_device
from hybridkit.tasks.base import check_model_vocab


def binomial_stderr(p: float, n: float) -> float:
    """Standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` measured on ``n`` answers.

    ``n`` is the number of answers (examples, or answer groups where one example holds several),
    also for token accuracy: the tokens of one answer are not independent draws, so counting
    answers is the honest (larger) error. NaN when nothing was evaluated."""
    if not n or math.isnan(p):
        return float("nan")
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / n)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max of per-seed values."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("spread of no values")
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
    }


def markdown_table(results: Sequence[dict], train_length: int | None) -> str:
    """One row per length; ``±`` is the binomial standard error of ex_match (n = answers)."""
    lines = [
        "| length | tokens | answers | ex_match | tok_acc | scaled_acc | decode ex_match (n) "
        "| decode = forward |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mark = " (train)" if r["length"] == train_length else ""
        dec = r.get("decode")
        dec_s = f"{100 * dec['ex_match']:.1f} ({int(dec['examples'])})" if dec else "-"
        agree = f"{100 * dec['agree_with_forward']:.1f}%" if dec else "-"
        se = binomial_stderr(r["ex_match"], r["examples"])
        lines.append(
            f"| {r['length']}{mark} | {r['tokens']} | {int(r['examples'])} "
            f"| {100 * r['ex_match']:.1f} ± {100 * se:.1f} | {100 * r['tok_acc']:.1f} "
            f"| {100 * r['scaled_acc']:.1f} | {dec_s} | {agree} |"
        )
    lines += [
        "",
        "ex_match: answers exactly right (± the binomial standard error); scaled_acc: 0 = chance, "
        "100 = perfect; decode ex_match (n): the first n examples decoded token by token (a "
        "subset, so noisier); decode = forward: how often decoding gave the forward's answer.",
    ]
    return "\n".join(lines) + "\n"


def evaluate_run(
    run_dir: str | Path,
    *,
    lengths: Sequence[int] | None = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    out_dir: str | Path | None = None,
    on_length: Callable[[dict], None] | None = None,
) -> dict:
    """Evaluate a run at ``lengths`` (default: eval.lengths, else the task's eval_lengths)."""
    run_dir = Path(run_dir)
    recipe, model, weights = load_run_weights(run_dir, overrides)
    # an unfinished run (no model.safetensors yet) is scored at its newest checkpoint: say so,
    # and record which weights the numbers belong to
    step = None  # None: the finished run's weights
    if weights.parent != run_dir:
        number = weights.parent.name.removeprefix("step_")
        step = int(number) if number.isascii() and number.isdigit() else -1
        print(
            f"note: {run_dir} has no model.safetensors; evaluating its newest checkpoint, "
            f"{weights.parent.name}",
            file=sys.stderr,
        )
    if recipe.task is None:
        raise HybridkitError(f"{run_dir}/recipe.yaml has no task section to evaluate on")
    ev = recipe.eval
    task_spec = recipe.task
    if ev.examples is not None:
        task_spec = task_spec.model_copy(update={"eval_examples": ev.examples})
    task = task_spec.build()
    check_model_vocab(task, recipe.model.vocab_size, task_spec.kind, f"{run_dir}/recipe.yaml")
    given = lengths
    lengths = list(lengths or ev.lengths or task.eval_lengths)
    for n in lengths:
        problem = task_spec.length_problem(n)
        if problem is not None:
            raise HybridkitError(f"--lengths {n}: {problem}")
    target = resolve_device(device)
    check_recipe_eval(recipe, given, target, given_key="--lengths")
    model = model.to(target)
    results = evaluate_lengths(
        model,
        task,
        lengths,
        batch_size=ev.batch_size,
        precision=recipe.train.precision,
        decode_examples=ev.decode_examples,
        decode_max_length=ev.decode_max_length,
        on_length=on_length,
    )
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    train_length = task_spec.seq_len
    payload = {
        # Relative to the folder holding eval.json, so results stay valid when the folder is
        # copied off the machine that produced it (GPU runs come back as archives).
        "run": os.path.relpath(run_dir, out),
        "weights": os.path.relpath(weights, out),
        "checkpoint_step": step,
        # ``--set`` changes (an ablation: another window, another eval size); recipe.yaml in the
        # run folder does not have them
        "overrides": list(overrides),
        "task": task_spec.kind,
        "train_length": train_length,
        "chance": task.chance,
        "results": results,
    }
    (out / "eval.json").write_text(json.dumps(payload, indent=1))
    (out / "eval.md").write_text(
        f"# {recipe.name or run_dir.name}: {task_spec.kind}, trained at "
        f"{task_spec.train_lengths_text()}\n\n"
        + (
            f"Weights of the checkpoint {weights.parent.name} (no model.safetensors in the "
            "run folder).\n\n"
            if step is not None
            else ""
        )
        + (
            "With the recipe overrides "
            + ", ".join(f"`{o}`" for o in overrides)
            + " (not in the run's recipe.yaml).\n\n"
            if overrides
            else ""
        )
        + markdown_table(results, train_length)
    )
    name = recipe.name or run_dir.name
    plot_lengthgen(
        {name: [(r["length"], r["ex_match"]) for r in results]},
        out / "eval.png",
        errors={name: [binomial_stderr(r["ex_match"], r["examples"]) for r in results]},
        train_length=train_length,
        title=f"{task_spec.kind}: accuracy vs length",
    )
    if all("depth_ex_match" in r for r in results):
        plot_depth_heatmap(
            [r["length"] for r in results],
            [r["depth_ex_match"] for r in results],
            out / "niah_heatmap.png",
            title="NIAH ex_match by depth",
        )
    return payload
