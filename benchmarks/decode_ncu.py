"""Nsight Compute profile of one decode step of the 400M hybrid: every kernel of the step once.

Why: with the decode settings on, a batch-1 step is 176 kernels and 0.654 ms against a 0.194 ms
byte floor, the 97 matmuls alone 0.415 ms for 0.183 ms of weights (H200, 2026-12-05,
``benchmarks/results/decode_profile_h200.md``), and programmatic dependent launch did not
shorten it. Whether each few-microsecond kernel is latency-bound (DRAM throughput low, warps
waiting on loads) or limited by something else is what the hardware counters say.

Under ``ncu`` (profiling only the marked region) one static decode step runs eagerly (the
kernels the CUDA graph replays, launched one by one) after a prefill and a warm-up step::

    ncu --clock-control none --profile-from-start off \\
        --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section SchedulerStats --csv --page raw \\
        python benchmarks/decode_ncu.py --batch 1 > ncu.csv
    python benchmarks/decode_ncu.py --summarize ncu.csv

The summary groups launches by kernel name and grid (one row per distinct projection shape):
launches, mean duration, DRAM throughput and the largest warp stall reasons. ncu replays each
kernel with caches flushed, so a weight read starts from DRAM, as in decoding.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from siso_ncu import _TO_MS, COLUMNS, _number, _stall_name, read_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def profile(recipe: str, batch: int, prompt: int, device: str = "cuda") -> None:
    """Prefill, one warm-up step, then one profiled step (``device`` cpu: a smoke run in
    float32 with no profiler, to check the script)."""
    import torch

    from hybridkit.build import build_model
    from hybridkit.generation import DecodeRunner, Sampling
    from hybridkit.recipe import load_recipe

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(load_recipe(recipe), seed=0, dtype=dtype, device=device).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.spec.vocab_size, (batch, prompt), generator=gen).to(device)
    runner = DecodeRunner(model, batch, prompt + 4, 4, Sampling(temperature=0), use_graph=False)
    runner.prefill(ids)
    runner.decode(1)  # compiles every kernel of the step outside the profile
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
    runner.decode(1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled one decode step: batch {batch}, prompt {prompt}, {device}", file=sys.stderr)


def summarize(path: str) -> str:
    """One markdown row per (kernel, grid) of an ncu ``--csv --page raw`` export: launches,
    mean of each column of ``siso_ncu.COLUMNS`` and the mean top warp stalls."""
    units, launches, stall_cols = read_table(path)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in launches:
        name = r["Kernel Name"].split("(")[0]
        groups[(name, r.get("launch__grid_size", "?"))].append(r)
    names = ["us per launch" if c == "ms" else c for _, c in COLUMNS]
    head = ["launches", "total us", *names, "top stalls (warps per issue)"]
    out = ["| kernel | grid | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    rows = []
    for (name, grid), runs in groups.items():
        means = []
        for metric, _ in COLUMNS:
            vals = [v for v in (_number(r.get(metric, "")) for r in runs) if v is not None]
            v = sum(vals) / len(vals) if vals else None
            if v is not None and metric == "gpu__time_duration.sum":
                v *= 1e3 * _TO_MS.get(units.get(metric, ""), 1.0)  # us per launch
            means.append(v)
        stalls: dict[str, float] = defaultdict(float)
        for r in runs:
            for c in stall_cols:
                stalls[_stall_name(c)] += (_number(r[c]) or 0.0) / len(runs)
        stalls.pop("selected", None)
        top = sorted(((v, k) for k, v in stalls.items() if v), reverse=True)[:3]
        total = (means[0] or 0.0) * len(runs)
        cells = [str(len(runs)), f"{total:.1f}"]
        cells += ["-" if v is None else f"{v:.3g}" for v in means]
        cells.append(", ".join(f"{k} {v:.2g}" for v, k in top) or "-")
        rows.append((total, f"| {name} | {grid} | " + " | ".join(cells) + " |"))
    out += [line for _, line in sorted(rows, reverse=True)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "benchmarks/recipes/hybrid_400m.yaml"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run without the profiler")
    ap.add_argument("--summarize", metavar="CSV", help="print a table of an ncu CSV export")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
    else:
        profile(args.recipe, args.batch, args.prompt, args.device)


if __name__ == "__main__":
    main()
