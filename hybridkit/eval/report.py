"""Evaluate a finished (or in-progress) run directory and write eval.json / eval.md / PNGs."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from hybridkit.errors import HybridkitError
from hybridkit.eval.lengthgen import evaluate_lengths
from hybridkit.eval.plots import plot_depth_heatmap, plot_lengthgen
from hybridkit.rundir import load_run
from hybridkit.runtime import resolve_device


def markdown_table(results: Sequence[dict], train_length: int | None) -> str:
    lines = [
        "| length | tokens | ex_match | tok_acc | scaled_acc | decode ex_match (n) "
        "| decode = forward |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mark = " (train)" if r["length"] == train_length else ""
        dec = r.get("decode")
        dec_s = f"{100 * dec['ex_match']:.1f} ({int(dec['examples'])})" if dec else "-"
        agree = f"{100 * dec['agree_with_forward']:.1f}%" if dec else "-"
        lines.append(
            f"| {r['length']}{mark} | {r['tokens']} | {100 * r['ex_match']:.1f} "
            f"| {100 * r['tok_acc']:.1f} "
            f"| {100 * r['scaled_acc']:.1f} | {dec_s} | {agree} |"
        )
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
    recipe, model = load_run(run_dir, overrides)
    if recipe.task is None:
        raise HybridkitError(f"{run_dir}/recipe.yaml has no task section to evaluate on")
    ev = recipe.eval
    task_spec = recipe.task
    if ev.examples is not None:
        task_spec = task_spec.model_copy(update={"eval_examples": ev.examples})
    task = task_spec.build()
    lengths = list(lengths or ev.lengths or task.eval_lengths)
    for n in lengths:
        problem = task_spec.length_problem(n)
        if problem is not None:
            raise HybridkitError(f"--lengths {n}: {problem}")
    model = model.to(resolve_device(device))
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
        "run": str(run_dir),
        "task": task_spec.kind,
        "train_length": train_length,
        "chance": task.chance,
        "results": results,
    }
    (out / "eval.json").write_text(json.dumps(payload, indent=1))
    (out / "eval.md").write_text(
        f"# {recipe.name or run_dir.name}: {task_spec.kind}, trained at {train_length}\n\n"
        + markdown_table(results, train_length)
    )
    plot_lengthgen(
        {recipe.name or run_dir.name: [(r["length"], r["ex_match"]) for r in results]},
        out / "eval.png",
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
