"""The norms on the GPU: our fused Triton kernels (``hybridkit/kernels/norm``) against the torch
formula, eager (what an eager model ran before the kernels) and compiled by Inductor (what a
compiled model runs: the dispatch leaves compiled norms to Inductor), forward and forward +
backward, bf16, at the 400M SISO hybrid's shapes (4 x 4,096 tokens): the grouped pre-gate
output norm over d_inner 2048 in groups of 64 (float32 out, as the layer uses it), the
post-gate one, and the blocks' RMSNorm over d_model 1024. Memory-bound work, so each time is
set against its minimum bytes at the copy bandwidth measured in the same run. With ``--sweep``
the first shape's launches (tile elements, warps, the backward's programs per SM) are timed
too, each checked against the formula first (``launch_sweep.py``).
    python benchmarks/norm.py --out benchmarks/results/norm_h200 [--sweep] [--cases N]
"""

from __future__ import annotations

import argparse

import torch
from launch_sweep import (
    cell,
    measure_cases,
    sweep_launches,
    sweep_lines,
    timed_if_right,
    write_results,
)

from hybridkit.kernels.norm import gated_rms_norm, rms_norm
from hybridkit.kernels.norm import triton_kernels as norm_kernels
from hybridkit.train.provenance import run_environment

# (tokens, channels, group (0: RMSNorm over all channels), pre-gate)
CASES = (
    (16384, 2048, 64, True),
    (16384, 2048, 64, False),
    (16384, 1024, 0, False),
)
#: forward (tile elements, warps) and backward (tile elements, warps, programs per SM)
_FWD_SWEEP = tuple((e, w) for e in (1024, 2048, 4096) for w in (1, 2, 4, 8))
_BWD_SWEEP = (
    (2048, 8, 4), (2048, 4, 4), (2048, 2, 4), (1024, 2, 4), (512, 2, 4),
    (1024, 2, 8), (512, 2, 16), (512, 1, 16), (1024, 4, 8),
)  # fmt: skip


def _label(tokens: int, d: int, group: int, pre_gate: bool) -> str:
    if not group:
        return f"RMSNorm, {tokens} x {d}"
    return f"gated {'pre' if pre_gate else 'post'}-gate, {tokens} x {d}, group {group}"


def _measure(
    tokens: int, d: int, group: int, pre_gate: bool, *, bw: float, sweep: bool, dev: str = "cuda"
) -> dict:
    """One case: every variant's forward and forward + backward medians, and the floors."""
    bf16 = torch.bfloat16
    x = torch.randn(tokens, d, device=dev, dtype=bf16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(d, device=dev, dtype=bf16)).requires_grad_()
    z = torch.randn(tokens, d, device=dev, dtype=bf16, requires_grad=True) if group else None
    leaves = (x, w) if z is None else (x, z, w)
    out_bytes = 4 if group else 2  # the gated norm returns float32, RMSNorm the input's dtype
    dout = torch.randn(tokens, d, device=dev, dtype=torch.float32 if group else bf16)

    def run(backend: str) -> torch.Tensor:
        if z is None:
            return rms_norm(x, w, 1e-5, backend=backend)
        return gated_rms_norm(
            x, z, w, group_size=group, eps=1e-5, norm_before_gate=pre_gate, backend=backend
        )

    variants = {
        "torch": lambda: run("torch"),
        "inductor": torch.compile(lambda: run("torch")),
        "ours": lambda: run("triton"),
    }
    rec: dict = dict(case=_label(tokens, d, group, pre_gate))
    ref_out = (run("torch"),)
    ref_grads = torch.autograd.grad(run("torch"), leaves, dout)
    for name, fn in variants.items():

        def fb(fn=fn):
            return torch.autograd.grad(fn(), leaves, dout)

        rec[f"{name}_fwd_ms"] = timed_if_right(lambda fn=fn: (fn(),), ref_out, fn)
        rec[f"{name}_fb_ms"] = timed_if_right(fb, ref_grads, fb)
    if sweep:
        ours = variants["ours"]
        sweep_launches(
            rec, norm_kernels, ours, ref_out,
            lambda: torch.autograd.grad(ours(), leaves, dout), ref_grads, _FWD_SWEEP, _BWD_SWEEP,
        )  # fmt: skip
    inputs = tokens * d * 2 * (1 if z is None else 2)  # x (and z), bf16
    fwd_bytes = inputs + tokens * d * out_bytes
    fb_bytes = fwd_bytes + inputs + tokens * d * out_bytes + inputs  # + x, z, dout; dx, dz
    rec.update(fwd_floor_ms=fwd_bytes / bw * 1e3, fb_floor_ms=fb_bytes / bw * 1e3)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--sweep", action="store_true", help="time the first shape's launches too")
    ap.add_argument("--cases", type=int, default=len(CASES), help="only the first N shapes")
    args = ap.parse_args()
    dev, bw, records = measure_cases(
        CASES[: args.cases],
        lambda i, case, bw_: _measure(*case, bw=bw_, sweep=args.sweep and i == 0),
    )
    lines = [
        "# Norms, bf16: fused Triton kernels vs the torch formula (eager and Inductor)",
        "",
        f"Copy bandwidth measured in the same run: {bw / 1e9:,.0f} GB/s; floor = the minimum "
        "bytes / that bandwidth. do_bench medians (ms), L2 cleared, each variant checked "
        "against the formula first; forward + backward columns include the forward.",
        "",
        "| case | torch fwd | inductor fwd | ours fwd | floor fwd | torch f+b | inductor f+b "
        "| ours f+b | floor f+b |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        cols = ("torch_fwd_ms", "inductor_fwd_ms", "ours_fwd_ms", "fwd_floor_ms", "torch_fb_ms")
        cols += ("inductor_fb_ms", "ours_fb_ms", "fb_floor_ms")
        lines.append(f"| {r['case']} | " + " | ".join(cell(r[c]) for c in cols) + " |")
    if args.sweep and records:
        lines += sweep_lines(records[0])
    write_results(args.out, lines, run_environment(dev), bw, records)


if __name__ == "__main__":
    main()
