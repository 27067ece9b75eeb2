"""Benchmark: Mamba-3 decoding, one layer's step and the ~400M hybrid's generation (GPU).

1. The fused step kernel alone and the whole layer step (``in_proj`` -> kernel -> gate ->
   ``out_proj``) at d_model 2048, H 64, P 64, N 128, SISO, bf16 weights, fp32 and bf16 state,
   batch 1 / 16 / 128. Each is captured ``--per-graph`` times back to back in one CUDA graph
   (as it runs inside the whole-model graph, where launch gaps are gone); the graph is replayed
   and the median replay divided by the calls per graph is reported, next to its byte floor at
   the copy bandwidth measured in the same run: the kernel moves its state (read + write) and the
   token's projections, the layer also reads its two weight matrices.
2. ``hybridkit bench decode`` on ``benchmarks/recipes/hybrid_400m.yaml`` (the model of issue
   #16): tokens/s per batch with fp32 and bf16 Mamba-3 states, and the bf16 state's drift over
   ``--drift-tokens`` greedy tokens.

    source .gpu/base/env.sh && python benchmarks/decode.py --out $OUT/decode

Writes ``<out>.json`` and ``<out>.md`` after every measurement (a cut-off run keeps its part).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from launch_sweep import set_launches

from hybridkit.decode_bench import (
    bench_decode,
    copy_bandwidth,
    device_name,
    layer_step_row,
    time_per_call,
    versions,
)
from hybridkit.decode_bench import markdown as model_markdown
from hybridkit.kernels.config import changed_settings
from hybridkit.kernels.mamba3.ops import cute_unavailable
from hybridkit.kernels.mamba3.step import StepInputs
from hybridkit.kernels.mamba3.step.triton_step import mamba3_step_triton
from hybridkit.layers.mamba3 import Mamba3, Mamba3Spec

ROOT = Path(__file__).resolve().parents[1]
TARGET_LAYER_US = {1: 25.0, 16: 45.0, 128: 160.0}  # issue #16
OFFICIAL_LAYER_US = {1: 54.0, 16: 85.0, 128: 228.0}  # official step() in a CUDA graph, H200
OFFICIAL_KERNEL_US = {1: 3.0, 16: 13.5, 128: 137.0}


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(layer: Mamba3, batch: int, ssm_dtype: torch.dtype, bandwidth: float, per_graph: int):
    """One row: the kernel alone and the layer step at this batch and state dtype."""
    device = layer.in_proj.weight.device
    state = layer.allocate_cache(batch, 1, torch.bfloat16, device)
    state = state._replace(ssm=torch.randn_like(state.ssm).to(ssm_dtype))
    u = torch.randn(batch, 1, layer.in_proj.in_features, device=device, dtype=torch.bfloat16)
    proj = layer.in_proj(u)[:, 0]
    z, x, bk, cq, dd_dt, dd_a, trap, ang = proj.split(layer.split_sizes, dim=-1)
    h, p, n = layer.nheads, layer.headdim, layer.d_state
    inputs = StepInputs(
        x.view(batch, h, p), z.view(batch, h, p), bk.view(batch, 1, 1, n),
        cq.view(batch, 1, 1, n), dd_dt, dd_a, trap, ang,
    )  # fmt: skip
    w = layer.step_weights()
    out = torch.empty(batch, h, p, dtype=torch.bfloat16, device=device)
    kernel_us = time_per_call(
        lambda: mamba3_step_triton(inputs, state, w, out=out), device, per_graph=per_graph
    )
    cute_us = cute_kernel_us(state, per_graph)
    kernel_floor = (2 * nbytes(*state) + nbytes(proj) + nbytes(out)) / bandwidth * 1e6
    step = layer_step_row(
        layer, batch, bandwidth=bandwidth, ssm_dtype=ssm_dtype, per_graph=per_graph
    )
    return dict(
        batch=batch,
        ssm_dtype=str(ssm_dtype).removeprefix("torch."),
        kernel_us=kernel_us,
        kernel_floor_us=kernel_floor,
        kernel_x_floor=kernel_us / kernel_floor,
        cute_kernel_us=cute_us,
        layer_us=step.us_per_step,
        layer_floor_us=step.floor_us,
        layer_x_floor=step.ratio_to_floor,
        target_layer_us=TARGET_LAYER_US[batch],
        official_layer_us=OFFICIAL_LAYER_US[batch],
        official_kernel_us=OFFICIAL_KERNEL_US[batch],
    )


def cute_kernel_us(state, per_graph: int) -> float | None:
    """The CuTe DSL state-update kernel of the ``cute`` backend alone (its fp32 operands made
    here: the gates and rotation it leaves to torch are not in this time), or None when the
    CuTe DSL is not importable on this machine."""
    if cute_unavailable() is not None:
        return None
    from hybridkit.kernels.mamba3.step.cute_kernel import compiled_update

    batch, h, p, n = state.ssm.shape
    f32 = dict(device=state.ssm.device, dtype=torch.float32)
    alpha = torch.rand(batch, h, **f32)
    xg, vb, dx, y = (torch.randn(batch, h, p, **f32) for _ in range(4))
    kn, kp, q = (torch.randn(batch, h, n, **f32) for _ in range(3))
    ssm = state.ssm.clone()
    update = compiled_update(p, n, str(ssm.dtype).removeprefix("torch."))
    return time_per_call(
        lambda: update(ssm, alpha, xg, vb, dx, kn, kp, q, y), ssm.device, per_graph=per_graph
    )


@torch.no_grad()
def layer_rows(bandwidth: float, per_graph: int) -> Iterator[list[dict]]:
    """Rows at the issue's shape for every state dtype and batch (yields the list so far)."""
    torch.manual_seed(0)
    layer = Mamba3(Mamba3Spec(), d_model=2048, layer_idx=0).cuda().to(torch.bfloat16).eval()
    rows: list[dict] = []
    for ssm_dtype in (torch.float32, torch.bfloat16):
        for batch in (1, 16, 128):
            rows.append(measure(layer, batch, ssm_dtype, bandwidth, per_graph))
            yield rows


@torch.no_grad()
def mimo_layer_rows(bandwidth: float, per_graph: int) -> list[dict]:
    """The whole layer step of a MIMO (rank 4) layer at the same shape, fp32 state: the fused
    step runs MIMO too (no target in the issue; measured so its cost next to SISO is known)."""
    torch.manual_seed(0)
    spec = Mamba3Spec(mimo_rank=4)
    layer = Mamba3(spec, d_model=2048, layer_idx=0).cuda().to(torch.bfloat16).eval()
    rows = []
    for batch in (1, 16, 128):
        step = layer_step_row(layer, batch, bandwidth=bandwidth, per_graph=per_graph)
        rows.append(dict(batch=batch, layer_us=step.us_per_step, layer_floor_us=step.floor_us,
                         layer_x_floor=step.ratio_to_floor))  # fmt: skip
    return rows


def mimo_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "## One MIMO (R 4) Mamba-3 layer step (d_model 2048, H 64, P 64, N 128, fp32 state)",
        "",
        "| batch | layer us | layer floor us | x floor |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['layer_us']:.1f} | {r['layer_floor_us']:.1f} | "
            f"{r['layer_x_floor']:.2f} |"
        )
    return lines


def layer_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "## One Mamba-3 layer step (d_model 2048, H 64, P 64, N 128, SISO, bf16 weights)",
        "",
        "| state | batch | kernel us | kernel floor us | x floor | CuTe kernel us "
        "| official kernel us | layer us | layer floor us | x floor | target us "
        "| official layer us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ssm_dtype']} | {r['batch']} | {r['kernel_us']:.1f} | "
            f"{r['kernel_floor_us']:.1f} | {r['kernel_x_floor']:.2f} | "
            f"{'n/a' if r['cute_kernel_us'] is None else format(r['cute_kernel_us'], '.1f')} | "
            f"{r['official_kernel_us']} | "
            f"{r['layer_us']:.1f} | {r['layer_floor_us']:.1f} | {r['layer_x_floor']:.2f} | "
            f"{r['target_layer_us']} | {r['official_layer_us']} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output prefix (writes OUT.json and OUT.md)")
    ap.add_argument("--per-graph", type=int, default=10, help="calls per captured graph")
    ap.add_argument("--recipe", default=str(ROOT / "benchmarks/recipes/hybrid_400m.yaml"))
    ap.add_argument("--batch", default="1,16,128")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--drift-tokens", type=int, default=1000)
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the model part only")
    ap.add_argument("--compile", action="store_true", help="also measure with a compiled step")
    ap.add_argument(
        "--states", default="fp32,bf16", help="Mamba-3 state dtypes of the model runs (fp32,bf16)"
    )
    ap.add_argument(
        "--launch",
        action="append",
        default=[],
        metavar="MODULE:NAME=VALUE,...",
        help="set kernel launch constants first (launch_sweep.set_launches), e.g. "
        "linear:GEMV_BLOCK_N=8,WARPS=4 to time a former default; repeatable",
    )
    args = ap.parse_args()
    launches = set_launches(args.launch)
    states = args.states.split(",")
    if set(states) - {"fp32", "bf16"}:
        ap.error(f"--states {args.states!r}: allowed fp32, bf16 or fp32,bf16")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    report: dict = {
        "device": device_name(device),
        "versions": versions(),
        "kernels": changed_settings(),
        "launches": launches,
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "layer": [],
        "model": {},
    }

    def write() -> None:
        md = [
            f"# Decoding benchmarks ({report['device']})",
            "",
            f"Versions {report['versions']}; kernel settings {report['kernels']}; launch "
            f"constants {report['launches'] or 'the defaults'}; copy "
            f"bandwidth {report['copy_bandwidth_gbs']:,.0f} GB/s (measured in this run).",
            "",
        ]
        if report["layer"]:
            md += [*layer_markdown(report["layer"]), ""]
        if report.get("layer_mimo"):
            md += [*mimo_markdown(report["layer_mimo"]), ""]
        for name, result in report["model"].items():
            md += [f"## Whole model, {name}", "", model_markdown(result).split("\n", 1)[1]]
        models = {name: result.to_dict() for name, result in report["model"].items()}
        out.with_suffix(".json").write_text(json.dumps({**report, "model": models}, indent=1))
        out.with_suffix(".md").write_text("\n".join(md) + "\n")

    if not args.skip_layer:
        for rows in layer_rows(bandwidth, args.per_graph):
            report["layer"] = list(rows)
            write()
        report["layer_mimo"] = mimo_layer_rows(bandwidth, args.per_graph)
        write()
    if not args.skip_model:
        from hybridkit.build import build_model
        from hybridkit.recipe import load_recipe

        model = build_model(load_recipe(args.recipe), seed=0, dtype=torch.bfloat16, device=device)
        batches = [int(b) for b in args.batch.split(",")]
        runs = [("fp32 state", None, 0, False)] if "fp32" in states else []
        if "bf16" in states:
            runs.append(("bf16 state", torch.bfloat16, args.drift_tokens, False))
        if args.compile:
            runs.append(("fp32 state, compiled step", None, 0, True))
        for name, ssm_dtype, drift, compiled in runs:

            def partial(result, name=name) -> None:
                report["model"][name] = result
                write()

            result = bench_decode(
                model, batches=batches, prompt=args.prompt, new=args.new, ssm_dtype=ssm_dtype,
                drift_tokens=drift, compile_step=compiled, on_row=partial,
            )  # fmt: skip
            partial(result)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
