"""Why a parity model stops at its training length: read its rotation angles.

A one-layer Mamba-3 on parity (hybridkit/recipes/parity_gpu.yaml) sees each bit through the
embedding alone, so every angle column j of every head h turns by a fixed amount per token type:
``omega = pi * tanh(a_j) * dt_h`` (docs/mamba3.md section 1.5). A column encodes parity exactly
when ONE turns it by an odd multiple of pi and ZERO by an even one; a column that is off by
``e1 * pi`` (ONE) and ``e0 * pi`` (ZERO) drifts by ``(e1 + e0) / 2 * pi`` per random bit, so a
read-out of that column alone would flip after about ``1 / |e1 + e0|`` bits (the model's read-out
mixes columns and heads, so this only bounds it). This script prints, for each run directory
given, the columns closest to encoding parity, their turns, that drift and bound, and the decay
``exp(A dt)`` of their head per bit.

    python benchmarks/parity_angles.py RUN [RUN ...]

Runs on the CPU from the run's weights (no kernels involved). ``--precision bf16`` (the
default: the GPU studies train under bf16 autocast) computes ``in_proj`` as autocast does, so the
raw angles are rounded to bfloat16 before the float32 gates; ``fp32`` does not round them. The
difference matters: a model can learn angles that are exact only after that rounding
(benchmarks/results/state_tracking/parity_extrapolation.md).
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch

from hybridkit.rundir import load_run
from hybridkit.tasks.parity import BOS, EQ, ONE, ZERO


def parity_columns(run: str, top: int, precision: str = "bf16") -> list[dict]:
    """The ``top`` angle columns closest to encoding parity, best first."""
    _recipe, model = load_run(run)
    model = model.float().eval()
    mixer = model.blocks[0].mixer
    if not mixer.n_angles:
        return []
    captured: dict[str, torch.Tensor] = {}
    hook = mixer.in_proj.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("proj", out.detach())
    )
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    with torch.no_grad(), autocast:
        model(torch.tensor([[BOS, ZERO, ONE, EQ]]))
    hook.remove()
    proj = captured["proj"].double()  # bf16 values (when rounded) are exact in float64
    _z, _x, _b, _c, dd_dt, dd_a, _trap, ang = proj.split(mixer.split_sizes, dim=-1)
    with torch.no_grad():
        dt, adt = mixer.gates(dd_dt.float(), dd_a.float())  # (1, L, H), float32 as in the model
    turns = torch.tanh(ang.float())[0, :, None, :] * dt[0, :, :, None]  # (L, H, S) units of pi
    turns = turns.double()
    zero, one = turns[1], turns[2]
    n_zero, n_one = torch.round(zero), torch.round(one)
    encodes = (n_one.remainder(2) == 1) & (n_zero.remainder(2) == 0)
    e0, e1 = zero - n_zero, one - n_one
    # only columns close to exact for each token type (a column turning ~pi/2 for both rounds
    # to odd / even too, but encodes nothing)
    encodes &= (e0.abs() < 0.1) & (e1.abs() < 0.1)
    drift = (e0 + e1).abs()
    drift = torch.where(encodes, drift, torch.full_like(drift, math.inf))
    rows = []
    for flat in drift.flatten().argsort()[:top].tolist():
        h, j = divmod(flat, drift.shape[1])
        if not math.isfinite(float(drift[h, j])):
            break
        rows.append(
            {
                "head": h,
                "column": j,
                "one_turn": float(one[h, j]),
                "zero_turn": float(zero[h, j]),
                "drift_per_bit": float(drift[h, j]) / 2,
                "predicted_bits": 1.0 / float(drift[h, j]),
                "decay_one": float(torch.exp(adt[0, 2, h])),
                "decay_zero": float(torch.exp(adt[0, 1, h])),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories of one-layer parity models")
    parser.add_argument("--top", type=int, default=3, help="columns to list per run")
    parser.add_argument(
        "--precision", choices=("bf16", "fp32"), default="bf16", help="in_proj as in training"
    )
    args = parser.parse_args()
    print(
        "| run | head | column | ONE turns (pi) | ZERO turns (pi) | drift per bit (pi) | "
        "one-column bound (bits) | decay per bit ONE / ZERO |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        rows = parity_columns(run, args.top, args.precision)
        if not rows:
            print(f"| {run} | - | - | - | - | - | no column encodes parity | - |")
        for r in rows:
            print(
                f"| {run} | {r['head']} | {r['column']} | {r['one_turn']:+.4f} | "
                f"{r['zero_turn']:+.4f} | {r['drift_per_bit']:.4f} | {r['predicted_bits']:.0f} | "
                f"{r['decay_one']:.3f} / {r['decay_zero']:.3f} |"
            )


if __name__ == "__main__":
    main()
