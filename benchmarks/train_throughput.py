"""Training throughput of the 400M hybrid against Transformers of its width, in one process (#17).

Cases (``--cases``, default all, in this order):

* ``hybrid_eager``: ``recipes/hybrid_400m.yaml`` at 4 x 4096, eager (norms and SwiGLU through
  the fused Triton kernels, the dispatch points' eager choice);
* ``hybrid_eager_torch_elementwise``: the same with norms and SwiGLU in plain torch (what the
  fused kernels bring in eager mode);
* ``hybrid_compiled``: 4 x 4096, ``torch.compile`` (norms left to Inductor, SwiGLU through our
  kernels: the dispatch points' compiled choices);
* ``hybrid_compiled_triton_elementwise``: compiled, norms and SwiGLU forced through our
  kernels (custom ops), the A/B of the dispatch points' choice under compile;
* ``hybrid_compiled_torch_swiglu``: compiled, only the SwiGLU activations left to Inductor
  (the torch formula), the A/B of that dispatch point's compiled choice, our kernels since
  2026-12-07 (``results/train_fold_swiglu_h100.md``);
* ``hybrid_16k_ckpt``: 1 x 16384 with per-block activation checkpointing, compiled;
* ``transformer_compiled``: ``recipes/transformer_400m.yaml`` at 4 x 4096, compiled: 24
  attention layers of the hybrid's width and MLP (its depth; 303.4M parameters);
* ``transformer_matched_compiled``: ``recipes/transformer_400m_matched.yaml``, the same layers
  31 deep (the hybrid's parameter count, 382.3M against 384.8M), compiled.

Both ratios are reported (``ratio_hybrid_vs_transformer``, ``..._vs_matched_transformer``):
at equal depth the Transformer is 21 % smaller, since a Mamba-3 block holds more parameters than
an attention block.

Each case is :func:`hybridkit.train.bench.bench_train` (real AdamW steps after warm-up, median
step time, tokens/s, MFU against the datasheet peak and the matmul rate measured in the run,
peak memory, a per-kernel breakdown) on a freshly built model. After every case the results so
far are written to ``OUT/train_throughput.{json,md}`` (the environment, every case, the
hybrid / Transformer tokens/s ratio and the #17 targets), so a timeout loses only the running
case. A case that fails (e.g. out of memory) is recorded with its error and the run goes on.

``--loss-curve``: 300 steps (``--steps``) of ``hybridkit/recipes/niah_s.yaml`` through the
Trainer, eager and compiled, same seed; writes both curves, their max abs difference and a
plot to ``OUT/loss_curve.{json,md,png}``.

    source .gpu/base/env.sh
    python benchmarks/train_throughput.py --out $OUT/tt --cases hybrid_eager,hybrid_compiled
    python benchmarks/train_throughput.py --out $OUT/lc --loss-curve
    python benchmarks/train_throughput.py --merge run1/train_throughput.json \\
        run2/train_throughput.json --out benchmarks/results   # one report from split runs
    python benchmarks/train_throughput.py --out $OUT/former --cases hybrid_eager \\
        --launch norm:BWD_TILE_ELEMENTS=2048,BWD_WARPS=8,BWD_PROGRAMS_PER_SM=4  # a former launch
    python benchmarks/train_throughput.py --loss-curve --merge lc/loss_curve.json --out DIR
        # the curve report again from its JSON (no GPU needed)
    python benchmarks/train_throughput.py --compare on/train_throughput.json \
        off/train_throughput.json --out DIR   # the same cases under several kernel settings
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from hybridkit import profiling
from hybridkit.build import build_model
from hybridkit.kernels.config import changed_settings
from hybridkit.layers.mlp import SwiGLU
from hybridkit.layers.norm import GatedRMSNorm, RMSNorm
from hybridkit.recipe import load_recipe
from hybridkit.train.bench import bench_train
from hybridkit.train.optim import build_optimizer
from hybridkit.train.provenance import run_environment

ROOT = Path(__file__).resolve().parents[1]
HYBRID = ROOT / "benchmarks/recipes/hybrid_400m.yaml"
TRANSFORMER = ROOT / "benchmarks/recipes/transformer_400m.yaml"
TRANSFORMER_MATCHED = ROOT / "benchmarks/recipes/transformer_400m_matched.yaml"
HYBRID_MIMO = ROOT / "benchmarks/recipes/hybrid_400m_mimo.yaml"
NIAH = ROOT / "hybridkit/recipes/niah_s.yaml"

#: the targets of issue #17 (H200)
TARGET_MFU_COMPILED, TARGET_MFU_EAGER, TARGET_MEMORY_GB, TARGET_RATIO = 0.45, 0.35, 35.0, 0.9


@dataclass(frozen=True)
class Case:
    name: str
    recipe: Path
    batch: int
    seq_len: int
    compiled: bool
    checkpointing: bool = False
    elementwise: str | None = None  # norms' and SwiGLU's backend; None: the dispatch points' auto
    swiglu_only: bool = False  # ``elementwise`` for the SwiGLU activations only


CASES = (
    Case("hybrid_eager", HYBRID, 4, 4096, compiled=False),
    Case("hybrid_eager_torch_elementwise", HYBRID, 4, 4096, compiled=False, elementwise="torch"),
    Case("hybrid_compiled", HYBRID, 4, 4096, compiled=True),
    Case(
        "hybrid_compiled_triton_elementwise", HYBRID, 4, 4096, compiled=True, elementwise="triton"
    ),
    Case(
        "hybrid_compiled_torch_swiglu",
        HYBRID,
        4,
        4096,
        compiled=True,
        elementwise="torch",
        swiglu_only=True,
    ),
    Case("hybrid_16k_ckpt", HYBRID, 1, 16384, compiled=True, checkpointing=True),
    Case("transformer_compiled", TRANSFORMER, 4, 4096, compiled=True),
    Case("transformer_matched_compiled", TRANSFORMER_MATCHED, 4, 4096, compiled=True),
    # issue #15: the same hybrid with MIMO rank 4 layers (Triton MIMO scan), against SISO
    Case("hybrid_mimo_compiled", HYBRID_MIMO, 4, 4096, compiled=True),
)


def run_case(case: Case, args: argparse.Namespace) -> dict:
    """Build the case's model on the GPU and measure it (see the module docstring)."""
    recipe = load_recipe(case.recipe, overrides=list(args.set or []))
    device = torch.device(args.device)
    model = build_model(recipe, seed=0).to(device)
    model.activation_checkpointing = case.checkpointing
    model.loss_chunk_tokens = recipe.train.resolved_loss_chunk(device.type)
    if case.elementwise is not None:
        for module in model.modules():
            if isinstance(module, (RMSNorm, GatedRMSNorm)) and not case.swiglu_only:
                module.backend = case.elementwise
            elif isinstance(module, SwiGLU):
                module.act_backend = case.elementwise
    batch, seq_len = (1, 128) if args.smoke else (case.batch, case.seq_len)
    result = bench_train(
        model,
        build_optimizer(model, recipe.train),
        batch=batch,
        seq_len=seq_len,
        steps=args.steps,
        warmup=args.warmup,
        precision=recipe.train.precision,
        compile_model=case.compiled,
        compile_mode=args.compile_mode,
        profile=not args.no_profile,
    )
    return {"case": case.name, "recipe": str(case.recipe.relative_to(ROOT)), **result.to_dict()}


def _release() -> None:
    """Free the previous case's model, optimizer, compiled graphs and cached blocks."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summary(results: list[dict]) -> dict:
    """The hybrid / Transformer ratio (compiled, 4 x 4096) and each #17 target met or not."""
    by_name = {r["case"]: r for r in results if "error" not in r}
    out: dict = {}
    hybrid, transformer = by_name.get("hybrid_compiled"), by_name.get("transformer_compiled")
    # the ratio only means something when both were measured in the same process (merged
    # results carry the index of the run they came from)
    if hybrid and transformer and hybrid.get("run") == transformer.get("run"):
        out["ratio_hybrid_vs_transformer"] = hybrid["tokens_per_s"] / transformer["tokens_per_s"]
        out["target_ratio_met"] = out["ratio_hybrid_vs_transformer"] >= TARGET_RATIO
    matched = by_name.get("transformer_matched_compiled")  # the hybrid's parameter count
    if hybrid and matched and hybrid.get("run") == matched.get("run"):
        ratio = hybrid["tokens_per_s"] / matched["tokens_per_s"]
        out["ratio_hybrid_vs_matched_transformer"] = ratio
        out["target_ratio_met_matched_transformer"] = ratio >= TARGET_RATIO
    mimo = by_name.get("hybrid_mimo_compiled")
    if hybrid and mimo and hybrid.get("run") == mimo.get("run"):  # #15: >= 0.6
        out["ratio_mimo_vs_siso"] = mimo["tokens_per_s"] / hybrid["tokens_per_s"]
    for name, target in (
        ("hybrid_compiled", TARGET_MFU_COMPILED),
        ("hybrid_eager", TARGET_MFU_EAGER),
    ):
        mfu = by_name.get(name, {}).get("mfu_datasheet")
        if mfu is not None:
            out[f"target_mfu_{name}_met"] = mfu >= target
    mem = by_name.get("hybrid_compiled", {}).get("peak_memory_gb")
    if mem is not None:
        out["target_memory_met"] = mem <= TARGET_MEMORY_GB
    return out


def _median_host_ms(case: dict) -> float | None:
    """A result's median host time to issue a step; None where none was recorded (a CPU, or a
    file from before 2026-12-08)."""
    return statistics.median(case["host_ms_all"]) if case.get("host_ms_all") else None


def _host_ms(row: dict) -> str:
    """A table cell for the median host time (a result's ``host_ms_all`` or a compare row's
    ``host_ms``)."""
    ms = row["host_ms"] if "host_ms" in row else _median_host_ms(row)
    return "n/a" if ms is None else f"{ms:.1f}"


def markdown(env: dict, results: list[dict], verdict: dict) -> str:
    """One table over the cases, the ratio and the targets, and where the numbers came from."""
    lines = [
        f"# Training throughput ({env['device']}, {env['date']})",
        "",
        f"torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, commit "
        f"{str(env['git_commit'])[:12]}{' (dirty)' if env.get('git_dirty') else ''}. "
        "Command: `python benchmarks/train_throughput.py` (module docstring)."
        + (f" Launch constants set: {env['launches']}." if env.get("launches") else "")
        + f" Kernel settings: {env.get('kernels', 'defaults')}.",
        "",
        "| case | batch x len | step ms (median) | host ms (median) | tokens/s | TFLOP/s | "
        "MFU (datasheet) | MFU (measured matmul) | peak memory | loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | | failed: {r['error'][:120]} | | | | | | | |")
            continue
        mfu = f"{r['mfu_datasheet']:.1%}" if r["mfu_datasheet"] is not None else "n/a"
        mem = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else "n/a"
        loss = f"chunked {r['loss_chunk_tokens']}" if r["loss_chunk_tokens"] else "full logits"
        mode = f" ({r['compile_mode']})" if r.get("compile_mode") else ""
        lines.append(
            f"| {r['case']}{mode} | {r['batch']} x {r['seq_len']} | {r['step_ms']:.1f} | "
            f"{_host_ms(r)} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | "
            f"{r['mfu_measured']:.1%} | {mem} | {loss} |"
        )
    if verdict:
        lines += ["", "| check | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in verdict.items()]  # fmt: skip
    for r in results:
        if r.get("breakdown_ms"):
            total = sum(r["breakdown_ms"].values())
            lines += ["", f"### {r['case']}: one profiled step", "", "| kind | ms | share |"]
            lines += ["|---|---|---|"]
            lines += [f"| {k} | {v:.2f} | {v / total:.0%} |" for k, v in r["breakdown_ms"].items()]
            if r.get("top_kernels"):
                lines += ["", "Its longest kernels:", ""]
                lines += profiling.top_kernels_table(r["top_kernels"], total)
    if results and "flops" in results[0]:
        lines += ["", f"FLOPs per token: {results[0]['flops']['formula']}."]
    return "\n".join(lines) + "\n"


def write(out: Path, stem: str, payload: dict, text: str) -> None:
    """Write ``stem.json`` and ``stem.md`` (called after every case: partial results survive)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / f"{stem}.md").write_text(text)


def throughput(args: argparse.Namespace) -> None:
    wanted = args.cases.split(",") if args.cases else [c.name for c in CASES]
    unknown = sorted(set(wanted) - {c.name for c in CASES})
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; allowed: {[c.name for c in CASES]}")
    env = run_environment(torch.device(args.device))
    env["launches"] = args.launches
    env["kernels"] = changed_settings()  # HYBRIDKIT_KERNELS, as the cases record it too
    results: list[dict] = []
    for case in (c for c in CASES if c.name in wanted):
        print(f"== {case.name}", flush=True)
        try:
            results.append(run_case(case, args))
        except Exception as exc:  # record and go on: later cases still run
            traceback.print_exc()
            results.append({"case": case.name, "error": f"{type(exc).__name__}: {exc}"})
        _release()
        verdict = summary(results)
        payload = {"environment": env, "cases": results, "summary": verdict}
        write(Path(args.out), "train_throughput", payload, markdown(env, results, verdict))
        print(markdown(env, results[-1:], {}), flush=True)


def merge(args: argparse.Namespace) -> None:
    """One report from the results of several runs (``--merge A.json B.json``): a later file's
    case replaces an earlier one of the same name; each case keeps the index of its run."""
    runs = [json.loads(Path(f).read_text()) for f in args.merge]
    by_name: dict[str, dict] = {}
    for index, run in enumerate(runs):
        for case in run["cases"]:
            by_name[case["case"]] = {**case, "run": index}
    order = [c.name for c in CASES]
    results = sorted(by_name.values(), key=lambda r: order.index(r["case"]))
    verdict = summary(results)
    env = runs[0]["environment"]
    text = markdown(env, results, verdict)
    text += "\nRuns merged (the `run` of each case):\n\n" + "".join(
        f"- run {i}: `{f}`, {r['environment']['date']}, commit "
        f"{str(r['environment']['git_commit'])[:12]}\n"
        for i, (f, r) in enumerate(zip(args.merge, runs, strict=True))
    )
    environments = [r["environment"] for r in runs]
    payload = {"environment": env, "runs": environments, "cases": results, "summary": verdict}
    write(Path(args.out), "train_throughput", payload, text)
    print(text)


def compare(args: argparse.Namespace) -> None:
    """One table from the same cases run under several kernel settings (``--compare A.json
    B.json ...``, each a run's train_throughput.json, e.g. one process per setting of
    ``benchmarks/gpu_pending.sh``): per case and run, the settings it ran with, the step's
    median and spread, tokens/s, MFU, peak memory, and the step time against the first run of
    the same case. -> ``OUT/train_compare.{json,md}``."""
    rows, first = [], {}
    for path in args.compare:
        run = json.loads(Path(path).read_text())
        for case in run["cases"]:
            row = {"file": str(path), "case": case["case"]}
            if "error" in case:
                rows.append({**row, "error": case["error"]})
                continue
            times = case.get("step_ms_all") or [case["step_ms"]]
            row.update(
                kernels=case.get("kernels", "unrecorded"),  # files before 2026-12-07
                step_ms=case["step_ms"],
                step_ms_min=min(times),
                step_ms_max=max(times),
                host_ms=_median_host_ms(case),
                tokens_per_s=case["tokens_per_s"],
                mfu_datasheet=case.get("mfu_datasheet"),
                peak_memory_gb=case.get("peak_memory_gb"),
                commit=str(case.get("environment", run["environment"]).get("git_commit"))[:12],
            )
            base = first.setdefault(row["case"], row)
            row["vs_first"] = row["step_ms"] / base["step_ms"]
            rows.append(row)
    env = json.loads(Path(args.compare[0]).read_text())["environment"]
    lines = [
        f"# Training step by kernel settings ({env['device']}, {env['date']})",
        "",
        "Each row one process (`python benchmarks/train_throughput.py --compare ...`); "
        "`vs first`: the step against the first row of the same case.",
        "",
        "| case | settings | step ms (median) | min / max | host ms | tokens/s | MFU (datasheet) | "
        "peak GB | vs first | run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['case']} | | failed: {r['error'][:100]} | | | | | | | {r['file']} |"
            )
            continue
        mfu = "n/a" if r["mfu_datasheet"] is None else f"{r['mfu_datasheet']:.1%}"
        mem = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        lines.append(
            f"| {r['case']} | {r['kernels']} | {r['step_ms']:.1f} | {r['step_ms_min']:.1f} / "
            f"{r['step_ms_max']:.1f} | {_host_ms(r)} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} | "
            f"{r['vs_first']:.3f}x | {r['file']} (commit {r['commit']}) |"
        )
    text = "\n".join(lines) + "\n"
    write(Path(args.out), "train_compare", {"environment": env, "rows": rows}, text)
    print(text)


def loss_curve(args: argparse.Namespace) -> None:
    """Eager vs compiled Trainer runs of niah_s, same seed: curves, max abs difference, plot."""
    from hybridkit.train.trainer import Trainer

    out = Path(args.out)
    env = run_environment(torch.device(args.device))
    curves: dict[str, list[float]] = {}
    for mode in ("eager", "compiled"):
        overrides = [f"train.compile={mode == 'compiled'}", "train.tensorboard=false"]
        overrides.append(f"train.device={args.device}")
        recipe = load_recipe(NIAH, overrides=overrides + list(args.set or []))
        trainer = Trainer(recipe, out / mode, resume=None, progress=False)
        curves[mode] = [trainer.train_step()["loss"] for _ in range(args.steps)]
        del trainer
        _release()
        payload = {"environment": env, "recipe": str(NIAH.relative_to(ROOT)), "curves": curves}
        write(out, "loss_curve", payload, f"# Loss curves\n\nrunning: {list(curves)}\n")
    write_loss_curve_report(out, payload)


def _windows(steps: int) -> list[tuple[int, int]]:
    """Step windows (1-based, inclusive) the agreement is judged on: the fast first descent,
    then the noisy plateau, and its last 100 steps."""
    first = min(50, steps)
    return [(1, first), (first + 1, steps), (max(1, steps - 99), steps)]


def write_loss_curve_report(out: Path, payload: dict) -> None:
    """The report of an eager vs compiled curve pair (JSON, Markdown, PNG) from its payload.

    Agreement "within bf16 noise" is read off per-window means next to the step-to-step spread
    (the batch noise): the single largest step difference is one noisy batch, not a drift."""
    import statistics

    curves, env = payload["curves"], payload["environment"]
    eager, comp = curves["eager"], curves["compiled"]
    diffs = [abs(a - b) for a, b in zip(eager, comp, strict=True)]
    payload["max_abs_diff"] = max(diffs)
    payload["max_abs_diff_last_50"] = max(diffs[-50:])
    rows, payload["windows"] = [], []
    for lo, hi in _windows(len(eager)):
        e, c = eager[lo - 1 : hi], comp[lo - 1 : hi]
        if len(e) < 2:
            continue
        w = {
            "steps": [lo, hi],
            "mean_eager": statistics.fmean(e),
            "mean_compiled": statistics.fmean(c),
            "std_eager": statistics.stdev(e),
            "std_compiled": statistics.stdev(c),
            "max_abs_diff": max(abs(a - b) for a, b in zip(e, c, strict=True)),
        }
        payload["windows"].append(w)
        rows.append(
            f"| {lo}-{hi} | {w['mean_eager']:.4f} ± {w['std_eager']:.3f} | "
            f"{w['mean_compiled']:.4f} ± {w['std_compiled']:.3f} | "
            f"{w['mean_compiled'] - w['mean_eager']:+.4f} | {w['max_abs_diff']:.3g} |"
        )
    text = (
        f"# Loss curves, eager vs compiled ({env['device']}, {env['date']})\n\n"
        f"`{payload['recipe']}`, {len(eager)} steps, same seed; commit "
        f"{str(env['git_commit'])[:12]}, torch {env['torch']}.\n\n"
        "Per step window: the mean training loss ± its step-to-step standard deviation (the batch "
        "noise), the difference of the means, and the largest single-step difference.\n\n"
        "| steps | eager | compiled | compiled - eager | max step difference |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Final loss: eager {eager[-1]:.4f}, compiled {comp[-1]:.4f}.\n\n"
        "![loss curves](loss_curve.png)\n"
    )
    write(out, "loss_curve", payload, text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=mode, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss", title="niah_s: eager vs torch.compile")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the results (written as we go)")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (10) / curve steps (300)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled breakdown step")
    p.add_argument("--loss-curve", action="store_true", help="eager vs compiled niah_s curves")
    p.add_argument("--set", action="append", help="recipe override a.b=c (repeatable)")
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the compiled cases (e.g. max-autotune-no-cudagraphs)",
    )
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="every case at 1 x 128 tokens: checks the script end to end in a minute, no numbers",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="write one report from several runs' train_throughput.json (no GPU needed)",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="JSON",
        help="one table of the same cases under several kernel settings, from each run's "
        "train_throughput.json (no GPU needed) -> OUT/train_compare.{json,md}",
    )
    p.add_argument(
        "--launch",
        action="append",
        default=[],
        metavar="MODULE:NAME=VALUE,...",
        help="set kernel launch constants first (launch_sweep.set_launches), e.g. "
        "norm:BWD_TILE_ELEMENTS=2048,BWD_WARPS=8,BWD_PROGRAMS_PER_SM=4; repeatable",
    )
    args = p.parse_args()
    from launch_sweep import set_launches  # beside this script (run as one, not imported)

    args.launches = set_launches(args.launch)
    if args.merge and args.loss_curve:  # rewrite a curve pair's report from its JSON
        write_loss_curve_report(Path(args.out), json.loads(Path(args.merge[0]).read_text()))
        return
    if args.merge:
        merge(args)
        return
    if args.compare:
        compare(args)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: pass --device cpu --smoke to check the script")
    if args.loss_curve:
        args.steps = args.steps or 300
        loss_curve(args)
    else:
        args.steps = args.steps or 10
        throughput(args)


if __name__ == "__main__":
    main()
