"""Nsight Compute profile of the Triton chunk kernels (SISO, or MIMO with ``--rank``) at a
benchmark shape.

Two modes. Under ``ncu`` (profiling only the marked region), run one forward+backward after a
warm-up call (compilation and the launch tuner stay outside the profile)::

    ncu --clock-control none --profile-from-start off \\
        --kernel-name regex:'_(fwd|bwd)_[a-z]+_kernel' \\
        --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section SchedulerStats --csv --page raw \\
        python benchmarks/siso_ncu.py --shape 0 > ncu.csv

(``--rank 4``: MIMO at chunk 64 / R, "halves" pairing), then summarise the CSV (one row per kernel:
duration, throughputs, occupancy, registers, issue rate and the largest warp stall reasons)::

    python benchmarks/siso_ncu.py --summarize ncu.csv

``--clock-control none`` leaves the clocks as the benchmark sees them; durations under ncu are
per kernel with caches flushed between replays, so compare them with each other, not with the
benchmark's medians.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

# (raw metric, short column name); durations are converted to ms
COLUMNS = [
    ("gpu__time_duration.sum", "ms"),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "SM %"),
    ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", "mem %"),
    ("dram__cycles_active.avg.pct_of_peak_sustained_elapsed", "DRAM %"),
    ("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed", "tensor pipe %"),
    ("launch__registers_per_thread", "regs"),
    ("sm__maximum_warps_per_active_cycle_pct", "occ. theor. %"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "occ. achieved %"),
    ("smsp__issue_active.avg.pct_of_peak_sustained_active", "issue active %"),
]
_TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
_TO_MS.update(nsecond=1e-6, usecond=1e-3, msecond=1.0, second=1e3)


def profile(shape: int, rank: int = 1) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from mamba3_siso import SHAPES, make_inputs

    from hybridkit.kernels.mamba3.chunkscan import mamba3_scan_triton

    B, L, H, P, N = SHAPES[shape]
    inp = make_inputs(B, L, H, P, N, seed=1, R=rank)
    for t in inp.values():
        t.requires_grad_(True)
    dy = torch.randn(B, L, rank, H, P, device="cuda", dtype=torch.bfloat16)
    pairing = "halves" if rank > 1 else "interleaved"

    def step() -> None:
        y, _ = mamba3_scan_triton(**inp, chunk_size=64 // rank, pairing=pairing, return_state=False)
        torch.autograd.backward(y, dy)

    step()  # compile + tune
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _stall_name(metric: str) -> str:
    """``smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio`` ->
    ``long_scoreboard``."""
    tail = metric.split("issue_stalled_", 1)[1]
    return tail.split("_per_", 1)[0].split(".", 1)[0]


def read_table(path: str) -> tuple[dict, list[dict], list[str]]:
    """An ncu ``--csv --page raw`` export (ncu's own lines first, then a header, a units row
    and one row per kernel launch): (units, launches, the warp-stall ratio columns)."""
    lines = Path(path).read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f"{path}: no ncu CSV table (did ncu profile any kernel?)")
    reader = csv.DictReader(lines[start:])
    units = next(reader)
    stall_cols = [
        c for c in reader.fieldnames or [] if "issue_stalled" in c and c.endswith(".ratio")
    ]
    return units, list(reader), stall_cols


def summarize(path: str) -> str:
    """A markdown table of the kernels in an ncu ``--csv --page raw`` export (one row per
    kernel launch)."""
    units, launches, stall_cols = read_table(path)
    head = [c for _, c in COLUMNS] + ["top stalls (warps per issued instruction)"]
    out = ["| kernel | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    rows = []
    for r in launches:
        cells = []
        for metric, _ in COLUMNS:
            v = _number(r.get(metric, ""))
            if v is not None and metric == "gpu__time_duration.sum":
                v *= _TO_MS.get(units.get(metric, ""), 1.0)
            cells.append("-" if v is None else f"{v:.3g}")
        # "selected" is the issuing warp itself, not a stall
        stalls = {_stall_name(c): _number(r[c]) for c in stall_cols}
        stalls.pop("selected", None)
        top = sorted(((v, k) for k, v in stalls.items() if v), reverse=True)[:3]
        cells.append(", ".join(f"{k} {v:.2g}" for v, k in top) or "-")
        dur = _number(r.get("gpu__time_duration.sum", "")) or 0.0
        rows.append((dur, f"| {r['Kernel Name'].split('(')[0]} | " + " | ".join(cells) + " |"))
    out += [line for _, line in sorted(rows, reverse=True)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, default=0, help="index into the benchmark's SHAPES")
    ap.add_argument("--rank", type=int, default=1, help="MIMO rank (1: SISO)")
    ap.add_argument("--summarize", metavar="CSV", help="print a table of an ncu CSV export")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
    else:
        profile(args.shape, args.rank)


if __name__ == "__main__":
    main()
