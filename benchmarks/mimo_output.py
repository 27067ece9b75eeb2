"""The MIMO output (per-rank gate, output norm, ``mimo_o`` rank sum) on the GPU: our fused
Triton kernels (``hybridkit/kernels/mamba3/output``) against the torch formula, eager and
compiled by Inductor (what a compiled model ran before the kernels), forward and forward +
backward, bf16, at the 400M MIMO model's shapes (4 x 4,096 tokens, d_inner 2048 = 32 heads x 64).

The work is memory-bound, so the measure is the minimum bytes (forward: read y and z, write the
output; backward: read y, z and the output gradient, write dy and dz) over the time, against the
copy bandwidth measured in the same run. Medians of ``triton.testing.do_bench`` (L2 cleared).

    python benchmarks/mimo_output.py --out benchmarks/results/mimo_output_h200
"""

from __future__ import annotations

import argparse

import torch
from launch_sweep import measure_cases, median_ms, sweep_launches, sweep_lines, write_results

from hybridkit.kernels.mamba3.output import mimo_output
from hybridkit.kernels.mamba3.output import triton_kernels as out_kernels
from hybridkit.train.provenance import run_environment

# (B, L, R, H, P, output norm): the 400M model's MIMO layer, no norm, rank 8 post-gate
CASES = (
    (4, 4096, 4, 32, 64, "pregate"),
    (4, 4096, 4, 32, 64, "none"),
    (4, 4096, 8, 32, 64, "postgate"),
)


#: forward (tile elements, warps) and backward (tile elements, warps, programs per SM) compared
#: at the first shape; on the H100 the forward was best at 2,048 / 2 and the backward at 256 / 2
#: of {256, 512, 1024} x {2, 4, 8} (benchmarks/results/mimo_output_launch_h100.md)
_FWD_SWEEP = tuple((e, w) for e in (1024, 2048, 4096) for w in (1, 2, 4))
_BWD_SWEEP = (
    (256, 1, 6), (256, 2, 6), (256, 4, 6), (512, 2, 6), (512, 4, 6),
    (256, 1, 12), (256, 2, 12), (256, 1, 24), (256, 2, 24),
)  # fmt: skip


def _measure(
    B: int, L: int, R: int, H: int, P: int, mode: str, *, bw: float, compare_tiles: bool = False
) -> dict:
    """One case: every variant's forward and forward + backward medians, and the floors."""
    dev, bf16, HP = torch.device("cuda"), torch.bfloat16, H * P
    y = torch.randn(B, L, R, H, P, device=dev, dtype=bf16, requires_grad=True)
    proj = torch.randn(B, L, 3 * HP, device=dev, dtype=bf16, requires_grad=True)
    mz = (1 + 0.1 * torch.randn(H, R, P, device=dev)).requires_grad_()
    mo = (torch.randn(H, R, P, device=dev) / R).requires_grad_()
    w = (1 + 0.1 * torch.randn(HP, device=dev)).requires_grad_()
    leaves = (y, proj, mz, mo, w) if mode != "none" else (y, proj, mz, mo)
    dout = torch.randn(B, L, HP, device=dev, dtype=bf16)

    def run(backend: str) -> torch.Tensor:
        z = proj[..., :HP].reshape(B, L, H, P)  # a slice of in_proj's output, as in the layer
        out = mimo_output(y, z, mz, mo, w, group_size=P, eps=1e-5, mode=mode, backend=backend)
        return out.to(bf16)

    variants = {
        "torch": lambda: run("torch"),
        "inductor": torch.compile(lambda: run("torch")),
        "ours": lambda: run("triton"),
    }
    torch.testing.assert_close(run("triton").float(), run("torch").float(), rtol=2e-2, atol=2e-2)
    rec: dict = dict(B=B, L=L, R=R, H=H, P=P, mode=mode)
    for name, fn in variants.items():
        rec[f"{name}_fwd_ms"] = median_ms(fn)
        rec[f"{name}_fb_ms"] = median_ms(lambda fn=fn: torch.autograd.grad(fn(), leaves, dout))
    if compare_tiles:  # the forward kernel without the dispatch / autograd wrapper
        z2 = proj.detach()[..., :HP].reshape(B * L, HP)
        mz2 = mz.detach().transpose(0, 1).reshape(R, HP).contiguous()
        mo2 = mo.detach().transpose(0, 1).reshape(R, HP).contiguous()
        y3, o = y.detach().reshape(B * L, R, HP), torch.empty(B * L, HP, device=dev, dtype=bf16)
        wk = w.detach() if mode != "none" else None
        rec["ours_kernel_fwd_ms"] = median_ms(
            lambda: out_kernels.mimo_output_forward(y3, z2, mz2, mo2, wk, o, P, 1e-5, mode)
        )
        # then the launches
        ours = variants["ours"]
        ref_grads = torch.autograd.grad(run("torch"), leaves, dout)
        sweep_launches(
            rec, out_kernels, ours, (run("torch"),),
            lambda: torch.autograd.grad(ours(), leaves, dout), ref_grads, _FWD_SWEEP, _BWD_SWEEP,
        )  # fmt: skip
    T, el = B * L, 2
    fwd_bytes = T * HP * el * (R + 2)  # y, z read; out written
    fb_bytes = fwd_bytes + T * HP * el * (2 * R + 3)  # + y, z, dout read; dy, dz written
    rec.update(fwd_floor_ms=fwd_bytes / bw * 1e3, fb_floor_ms=fb_bytes / bw * 1e3)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument(
        "--cases", type=int, default=len(CASES), help="time only the first N shapes (a short call)"
    )
    args = ap.parse_args()
    dev, bw, records = measure_cases(
        CASES[: args.cases], lambda i, case, bw_: _measure(*case, bw=bw_, compare_tiles=i == 0)
    )
    lines = [
        "# MIMO output (gate + output norm + rank sum), bf16: fused Triton vs the torch formula",
        "",
        f"Copy bandwidth measured in the same run: {bw / 1e9:,.0f} GB/s; floor = the minimum "
        "bytes / that bandwidth. do_bench medians (ms), L2 cleared. `inductor` is the torch "
        "formula under `torch.compile` (default mode); forward + backward columns include the "
        "forward.",
        "",
        "| B, L, R, H, P | norm | torch fwd | inductor fwd | ours fwd | floor fwd | torch f+b "
        "| inductor f+b | ours f+b | floor f+b | inductor / ours f+b |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['B']}, {r['L']}, {r['R']}, {r['H']}, {r['P']} | {r['mode']} | "
            f"{r['torch_fwd_ms']:.3f} | {r['inductor_fwd_ms']:.3f} | {r['ours_fwd_ms']:.3f} | "
            f"{r['fwd_floor_ms']:.3f} | {r['torch_fb_ms']:.3f} | {r['inductor_fb_ms']:.3f} | "
            f"{r['ours_fb_ms']:.3f} | {r['fb_floor_ms']:.3f} | "
            f"{r['inductor_fb_ms'] / r['ours_fb_ms']:.2f}x |"
        )
    lines += sweep_lines(records[0])
    k = records[0].get("ours_kernel_fwd_ms")
    if k is not None:
        lines += ["", f"The forward kernel alone at the first shape (no wrapper): {k:.3f} ms."]
    write_results(args.out, lines, run_environment(dev), bw, records)


if __name__ == "__main__":
    main()
