"""``benchmarks/decode_ncu.py --summarize``: launches of one kernel and grid fold into one row
(count, total, means), sorted by total time, stalls averaged, units honoured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"


def _csv(path: Path) -> None:
    stalls = [STALL.format(s) for s in ("long_scoreboard", "wait", "selected")]
    cols = ["ID", "Kernel Name", "launch__grid_size", "gpu__time_duration.sum",
            "dram__cycles_active.avg.pct_of_peak_sustained_elapsed", *stalls]  # fmt: skip
    rows = [
        ["", "", "", "usecond", "%", "ratio", "ratio", "ratio"],
        ["0", "_gemv_kernel(float*)", "128", "4", "30", "3", "1", "9"],
        ["1", "_gemv_kernel(float*)", "128", "6", "50", "5", "1", "9"],
        ["2", "_gemv_kernel(float*)", "560", "3", "70", "1", "2", "9"],
        ["3", "mamba3_step_kernel(float*)", "32", "20", "10", "0.5", "4", "9"],
    ]
    lines = ["==PROF== noise before the table"]
    lines += [",".join(f'"{c}"' for c in row) for row in [cols, *rows]]
    path.write_text("\n".join(lines) + "\n")


def test_summary_groups_launches_by_kernel_and_grid(tmp_path):
    _csv(tmp_path / "ncu.csv")
    run = subprocess.run(
        [sys.executable, str(BENCH / "decode_ncu.py"), "--summarize", str(tmp_path / "ncu.csv")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| _") or "step" in line]
    assert len(rows) == 3
    # sorted by total: the step (20 us), then gemv at grid 128 (2 launches, 10 us), then 560
    assert rows[0].startswith("| mamba3_step_kernel | 32 | 1 | 20.0 | 20 |")
    assert rows[1].startswith("| _gemv_kernel | 128 | 2 | 10.0 | 5 |")
    assert "long_scoreboard 4" in rows[1] and "selected" not in rows[1]
    assert rows[2].startswith("| _gemv_kernel | 560 | 1 | 3.0 | 3 |")
    assert "us per launch" in run.stdout


def test_profile_runs_a_decode_step_on_the_cpu():
    """The profiled part (prefill, a warm-up step, one step) as a CPU smoke run of a tiny
    recipe: the GPU call must not be the first to find a broken script."""
    recipe = Path(__file__).resolve().parents[1] / "hybridkit/recipes/tiny_hybrid.yaml"
    run = subprocess.run(
        [sys.executable, str(BENCH / "decode_ncu.py"), "--recipe", str(recipe), "--device", "cpu",
         "--batch", "2", "--prompt", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "profiled one decode step: batch 2, prompt 8, cpu" in run.stderr
