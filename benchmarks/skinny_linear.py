"""Few-row linears on the GPU: our Triton kernel (``hybridkit/kernels/linear``) against
``F.linear`` (cuBLAS) at the decode step's shapes, bf16, 1 and 16 rows.

Every product reads its weight once, so the measure is the weight's bytes over the time, against
the copy bandwidth measured in the same run. Medians of ``triton.testing.do_bench`` (L2 cleared
before every call, so the weight comes from HBM as in a decode step that reads 770 MB of
weights per token). Shapes: the 400M hybrid's projections (``benchmarks/recipes/hybrid_400m.yaml``:
Mamba-3 in / out, MLP in / out, attention qkv / out, the head) and the one-layer decode
benchmark's Mamba-3 projections (d_model 2048).

    python benchmarks/skinny_linear.py --out benchmarks/results/skinny_linear_h200
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from hybridkit.decode_bench import copy_bandwidth
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


def _median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
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
    env = run_environment(dev)
    lines += [
        "",
        f"Measured {env.get('date')}, torch {env.get('torch')}, Triton {env.get('triton')}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(
                {"bandwidth_bytes_per_s": bw, "environment": env, "rows": records}, f, indent=1
            )
        with open(args.out + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
