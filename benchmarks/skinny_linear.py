"""Few-row linears on the GPU: our Triton kernel (``hybridkit/kernels/linear``) against
``F.linear`` (cuBLAS) at the decode step's shapes, bf16, 1 and 16 rows.

Every product reads its weight once, so the measure is the weight's bytes over the time, against
the copy bandwidth measured in the same run. Medians of ``triton.testing.do_bench`` (L2 cleared
before every call, so the weight comes from HBM as in a decode step that reads 770 MB of
weights per token). Shapes: the 400M hybrid's projections (``benchmarks/recipes/hybrid_400m.yaml``:
Mamba-3 in / out, MLP in / out, attention qkv / out, the head) and the one-layer decode
benchmark's Mamba-3 projections (d_model 2048).

With ``--sweep`` the kernels' launches (``hybridkit/kernels/linear/triton_kernels.py``'s module
constants) are timed too, one row on the one-row kernel and 16 on the other, each launch checked
against ``F.linear`` at every shape before it is timed (``launch_sweep.py``); a launch's score is
the 400M decode step's matmul time it implies (each projection's time times its count per
token), since the step, not one shape, is what a default must serve.

    python benchmarks/skinny_linear.py --out benchmarks/results/skinny_linear_h200 [--sweep]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from launch_sweep import launch, median_ms, timed_if_right
from triton.testing import do_bench

from hybridkit.decode_bench import copy_bandwidth
from hybridkit.kernels.linear import triton_kernels as linear_kernels
from hybridkit.kernels.linear.triton_kernels import skinny_linear
from hybridkit.kernels.swiglu import swiglu
from hybridkit.train.provenance import run_environment

# (name, K, N) = (in_features, out_features)
SHAPES = (
    ("400M mamba3 in_proj", 1024, 4480),
    ("400M mamba3 out_proj", 2048, 1024),
    ("400M mlp fc1", 1024, 5632),
    ("400M mlp fc2", 2816, 1024),
    ("400M attention qkv", 1024, 1536),
    ("400M attention out", 1024, 1024),
    ("400M head", 1024, 32000),
    ("layer bench in_proj (d_model 2048)", 2048, 8672),
    ("layer bench out_proj (d_model 2048)", 4096, 2048),
)
#: per token of the 400M hybrid (20 Mamba-3 layers, 4 attention layers, 24 MLPs, the head): how
#: often each projection runs; fc1 runs with its SwiGLU (``glu``), as the model does
STEP_COUNTS = {
    "400M mamba3 in_proj": 20,
    "400M mamba3 out_proj": 20,
    "400M mlp fc1 + SwiGLU": 24,
    "400M mlp fc2": 24,
    "400M attention qkv": 4,
    "400M attention out": 4,
    "400M head": 1,
}
#: launches the sweep times, as the module constants they set (the first of each: the defaults,
#: the H100's best of 2026-12-06; the former ones 8 / 512 / 4 / 4 and 256 / 4 / 4); one row:
#: (output columns, K per step, warps, stages) of ``_gemv_kernel``; 16 rows: (K per step, warps,
#: stages, columns for narrow / wide outputs) of ``_skinny_linear_kernel``
GEMV_SWEEP = tuple(
    dict(GEMV_BLOCK_N=bn, GEMV_BLOCK_K=bk, GEMV_WARPS=w, GEMV_STAGES=st)
    for bn, bk, w, st in (
        (4, 512, 4, 4), (8, 512, 2, 4), (8, 512, 8, 4), (8, 256, 2, 4), (8, 256, 4, 4),
        (8, 1024, 4, 4), (8, 1024, 8, 4), (4, 512, 2, 4), (8, 512, 4, 4), (4, 1024, 4, 4),
        (16, 512, 4, 4), (16, 512, 8, 4), (8, 512, 4, 2), (8, 512, 4, 8), (16, 256, 4, 4),
    )
)  # fmt: skip
ROWS_SWEEP = tuple(
    dict(BLOCK_K=bk, WARPS=w, STAGES=st, NARROW_BLOCK_N=nb, WIDE_BLOCK_N=wb)
    for bk, w, st, nb, wb in (
        (256, 2, 4, 16, 32), (256, 4, 4, 16, 32), (256, 8, 4, 16, 32), (128, 4, 4, 16, 32),
        (128, 2, 4, 16, 32), (512, 4, 4, 16, 32), (512, 8, 4, 16, 32), (256, 4, 2, 16, 32),
        (256, 4, 6, 16, 32), (256, 4, 4, 32, 32), (256, 4, 4, 16, 64), (128, 4, 8, 16, 32),
    )
)  # fmt: skip


def _label(settings: dict) -> str:
    return " / ".join(str(v) for v in settings.values())


def _sweep(cases: list, rows: int, launches: tuple[dict, ...], dev) -> list[dict]:
    """One record per launch: each shape's time in us (or why it is wrong) and the 400M step's
    matmul time it implies. Inputs and references are made once per shape, shared by the
    launches."""
    inputs = []
    for name, k, n, glu in cases:
        gen = torch.Generator(device=dev).manual_seed(k * 7 + n)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) / k**0.5
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16, generator=gen)
        want = F.linear(x, w)
        inputs.append((name, x, w, glu, swiglu(want, backend="torch") if glu else want))
    out = []
    for settings in launches:
        rec: dict = dict(rows=rows, launch=_label(settings), settings=settings, us={})
        with launch(linear_kernels, **settings):
            for name, x, w, glu, want in inputs:

                def ours(x=x, w=w, glu=glu):
                    return skinny_linear(x, w, None, glu=glu)

                t = timed_if_right(lambda ours=ours: (ours(),), (want,), ours, timer=median_ms)
                rec["us"][name] = t * 1e3 if isinstance(t, float) else t
        times = [rec["us"].get(name) for name in STEP_COUNTS]
        if all(isinstance(t, float) for t in times):
            rec["step_us"] = sum(c * t for c, t in zip(STEP_COUNTS.values(), times, strict=True))
        out.append(rec)
        print(json.dumps(rec), flush=True)
    return out


def _sweep_lines(sweeps: list[dict]) -> list[str]:
    lines = []
    heads = {
        1: "one row: columns / K step / warps / stages",
        16: "16 rows: K step / warps / stages / narrow / wide columns",
    }
    for rows, head in heads.items():
        recs = [r for r in sweeps if r["rows"] == rows]
        if not recs:
            continue
        names = list(recs[0]["us"])
        lines += [
            "",
            f"### Launch sweep, {head} (the first line is the default)",
            "",
            "| launch | 400M step matmuls us | " + " | ".join(names) + " |",
            "|---" * (len(names) + 2) + "|",
        ]
        for r in recs:
            cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in r["us"].values()]
            step = f"{r['step_us']:.1f}" if "step_us" in r else "-"
            lines.append(f"| {r['launch']} | {step} | " + " | ".join(cells) + " |")
    return lines


def _median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--sweep", action="store_true", help="time the kernels' launches too")
    ap.add_argument("--sweep-rows", default="1,16", help="the row counts --sweep times")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)  # bytes / s
    rows_list = [int(r) for r in args.rows.split(",")]
    records = []
    cases = [(name, k, n, False) for name, k, n in SHAPES]
    # the MLP's first projection with its activation: one launch of ours against F.linear
    # followed by the Triton SwiGLU kernel (what the model runs without skinny_linear)
    cases.append(("400M mlp fc1 + SwiGLU", 1024, 5632, True))
    for name, k, n, glu in cases:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        for rows in rows_list:
            x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)

            def ref(x=x, w=w, glu=glu):
                return swiglu(F.linear(x, w), backend="triton") if glu else F.linear(x, w)

            def ours(x=x, w=w, glu=glu):
                return skinny_linear(x, w, None, glu=glu)

            torch.testing.assert_close(ours().float(), ref().float(), rtol=2e-2, atol=2e-2)
            t_ref, t_ours = _median_ms(ref), _median_ms(ours)
            nbytes = w.numel() * w.element_size()
            rec = dict(shape=name, rows=rows, K=k, N=n, weight_mb=nbytes / 1e6,
                       floor_us=nbytes / bw * 1e6, cublas_us=t_ref * 1e3,
                       ours_us=t_ours * 1e3)  # fmt: skip
            records.append(rec)
            print(json.dumps(rec))
    sweeps: list[dict] = []
    if args.sweep:
        sweep_rows = [int(r) for r in args.sweep_rows.split(",")]
        if 1 in sweep_rows:
            sweeps += _sweep(cases, 1, GEMV_SWEEP, dev)
        if 16 in sweep_rows:
            sweeps += _sweep(cases, 16, ROWS_SWEEP, dev)
    lines = [
        "# Few-row linears, bf16: our Triton kernel vs F.linear (cuBLAS)",
        "",
        "The `fc1 + SwiGLU` rows compare one launch of ours (`glu=True`) with F.linear followed "
        "by the Triton SwiGLU kernel.",
        "",
        f"Copy bandwidth measured in the same run: {bw / 1e9:,.0f} GB/s. do_bench medians, L2 "
        "cleared before each call. Floor = weight bytes / copy bandwidth.",
        "",
        "| shape | rows | K x N | weight MB | floor us | cuBLAS us | ours us | ours / cuBLAS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['shape']} | {r['rows']} | {r['K']} x {r['N']} | {r['weight_mb']:.1f} | "
            f"{r['floor_us']:.1f} | {r['cublas_us']:.1f} | {r['ours_us']:.1f} | "
            f"{r['ours_us'] / r['cublas_us']:.2f} |"
        )
    lines += _sweep_lines(sweeps)
    env = run_environment(dev)
    lines += [
        "",
        f"Measured {env.get('date')}, torch {env.get('torch')}, Triton {env.get('triton')}, "
        f"commit {env.get('git_commit')}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(
                {"bandwidth_bytes_per_s": bw, "environment": env, "rows": records, "sweep": sweeps},
                f,
                indent=1,  # fmt: skip
            )
        with open(args.out + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
