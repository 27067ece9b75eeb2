"""Benchmark: the Triton Mamba-3 scan at MIMO rank R against our SISO kernels, same run.

For each shape (B, L, H, P, N): forward (no saved states) and forward + backward medians with
``triton.testing.do_bench`` (L2 cleared between repetitions, warm-up first so compilation and
launch tuning stay out of the timed region), for MIMO rank R (chunk ROWS / R, at least 16,
"halves" pairing, per-rank x scaling) and for SISO (chunk ROWS) on inputs of the same
(B, L, H, P, N); bf16 inputs, G = 1, S = N / 4. Also achieved TFLOP/s (dense C R x C R
tiles; the backward counted as twice the forward) and GB/s (the fewest bytes: each input,
output and gradient once per pass), each as a share of the matmul rate and copy bandwidth
measured in the same run (``mamba3_siso.flops_bytes``). MIMO's roofline is the tensor core: it
does R times SISO's chunk FLOPs for about the same bytes.

    python benchmarks/mamba3_mimo.py --out OUT [--rank 4] [--shapes 0,1,2] [--chunk-rows 64]
        [--siso-rows ROWS]

``--chunk-rows`` (ROWS, default 64, the dispatch point's width at N 128): (token, rank) rows per
chunk, to time other chunk widths than the layers' default; the SISO reference runs at
``--siso-rows`` (default: ROWS too), e.g. 64 to compare a wider MIMO chunk with SISO's default.
The scan narrows chunks whose register tiles pass its rule (C x max(N, P) <= 8,192 in bf16:
64 rows at N 128); ``--force-rows`` runs ROWS anyway, to time what the rule excludes (the
table says so), after checking the forced chunk's outputs and gradients against the default's.

Writes ``OUT.json`` and ``OUT.md`` incrementally (one shape at a time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess

import torch
import triton
from mamba3_siso import copy_bandwidth, flops_bytes, make_inputs
from triton.testing import do_bench

from hybridkit.kernels.mamba3.chunkscan import mamba3_scan_triton
from hybridkit.kernels.mamba3.chunkscan import scan as scan_module

SHAPES = [(8, 4096, 32, 64, 128), (1, 16384, 32, 64, 128), (8, 2048, 32, 64, 128)]
# the targets at R = 4 (ms): forward, forward + backward
TARGET = {
    (8, 4096, 32, 64, 128): (1.3, 5.0),
    (1, 16384, 32, 64, 128): (2.2, 8.0),
    (8, 2048, 32, 64, 128): (0.65, 2.6),
}
# the official TileLang MIMO kernels, R 4, chunk 16, measured on an H100 (the issue), ms
OFFICIAL_H100 = {
    (8, 4096, 32, 64, 128): (2.13, 16.8),
    (1, 16384, 32, 64, 128): (7.45, 37.1),
    (8, 2048, 32, 64, 128): (1.08, 8.61),
}


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ a, warmup=20, rep=100, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def time_scan(shape, R: int, reps: int, rows: int = 64) -> dict:
    B, L, H, P, N = shape
    C = max(rows // R, 16)
    pairing = "halves" if R > 1 else "interleaved"
    sets = [make_inputs(B, L, H, P, N, seed=s, R=R) for s in range(2)]
    for inp in sets:
        for t in inp.values():
            t.requires_grad_(True)
    dys = [torch.randn(B, L, R, H, P, device="cuda", dtype=torch.bfloat16) for _ in sets]
    it = {"i": 0}

    def nxt():
        it["i"] ^= 1
        return sets[it["i"]], dys[it["i"]]

    def call(inp):
        return mamba3_scan_triton(**inp, pairing=pairing, chunk_size=C, return_state=False)[0]

    def fwd():
        inp, _ = nxt()
        with torch.no_grad():
            call(inp)

    def fwdbwd():
        inp, dy = nxt()
        torch.autograd.backward(call(inp), dy)

    for _ in range(3):
        fwd()
        fwdbwd()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    leaves = [t for inp in sets for t in inp.values()]
    res = {"rank": R, "chunk": C}
    res["fwd_ms"] = do_bench(fwd, warmup=50, rep=reps, return_mode="median")
    res["fwdbwd_ms"] = do_bench(
        fwdbwd, warmup=50, rep=reps, grad_to_none=leaves, return_mode="median"
    )
    res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    res.update(rates(flops_bytes(B, L, H, P, N, C=C, R=R), res["fwd_ms"], res["fwdbwd_ms"]))
    return res


def rates(counts: tuple[int, int, int, int], fwd_ms: float, fwdbwd_ms: float) -> dict:
    """Achieved TFLOP/s and GB/s of the forward and of forward + backward, from
    ``flops_bytes``'s (fwd FLOPs, fwd bytes, f+b FLOPs, f+b bytes)."""
    ff, fb, bf, bb = counts
    return {
        "fwd_tflops": ff / (fwd_ms * 1e-3) / 1e12,
        "fwd_gbps": fb / (fwd_ms * 1e-3) / 1e9,
        "fwdbwd_tflops": bf / (fwdbwd_ms * 1e-3) / 1e12,
        "fwdbwd_gbps": bb / (fwdbwd_ms * 1e-3) / 1e9,
    }


def _past_the_tile_rule(chunk: int, rank: int, *_sizes) -> int:
    """``scan.kernel_chunk`` with no narrowing: the kernels run the chunk asked for."""
    return max(chunk, 1)


def check_forced(R: int, rows: int, shape=(2, 1000, 8, 64, 128), device="cuda") -> None:
    """The forced chunk's output and every gradient against the default chunk's (bf16): both
    are the same scan, so they agree to bf16 rounding, or the run stops before timing
    anything."""
    B, L, H, P, N = shape
    inp = make_inputs(B, L, H, P, N, seed=5, R=R, device=device)
    dy = torch.randn(B, L, R, H, P, device=device, dtype=torch.bfloat16)
    pairing = "halves" if R > 1 else "interleaved"
    results = []
    for forced in (False, True):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
        saved = scan_module.kernel_chunk
        if forced:
            scan_module.kernel_chunk = _past_the_tile_rule
        try:
            y = mamba3_scan_triton(
                **leaves, pairing=pairing, chunk_size=max(rows // R, 1) if forced else 64 // R,
                return_state=False,
            )[0]  # fmt: skip
            (y.float() * dy.float()).sum().backward()
        finally:
            scan_module.kernel_chunk = saved
        results.append([y.detach(), *(leaves[k].grad for k in sorted(leaves))])
    names = ["y", *(f"d{k}" for k in sorted(inp))]
    for name, a, b in zip(names, *results, strict=True):
        err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
        print(f"forced {rows} rows vs default: {name} relative error {err:.1e}", flush=True)
        if not err <= 3e-2:
            raise SystemExit(f"forced {rows}-row chunk disagrees with the default on {name}")


def markdown(meta: dict, rows: list[dict]) -> str:
    siso = meta.get("siso_rows", meta.get("chunk_rows", 64))
    forced = ", forced past the tile rule" if meta.get("forced") else ""
    out = [
        f"# Mamba-3 MIMO scan (Triton), {meta['device']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, Triton {meta['triton']}, commit {meta['commit']}; bf16 inputs, "
        f"G 1, S = N/4, halves pairing, SISO chunk {siso} (MIMO's in the table"
        f"{forced}); do_bench medians (L2 cleared). Copy bandwidth "
        f"{meta['copy_gbps']:.0f} GB/s, bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s "
        "measured in this run.",
        "",
        "| B, L, H, P, N | R (chunk) | fwd ms | f+b ms | SISO fwd / f+b ms | MIMO/SISO f+b | "
        "target fwd / f+b | official H100 | fwd / f+b TFLOP/s (% matmul) | "
        "fwd / f+b GB/s (% copy) | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mm, bw = meta["matmul_tflops"], meta["copy_gbps"]
    for r in rows:
        m, s = r["mimo"], r["siso"]
        shape = tuple(r["shape"])
        tgt = TARGET.get(shape, ("-", "-")) if m["rank"] == 4 else ("-", "-")
        off = OFFICIAL_H100.get(shape, ("-", "-")) if m["rank"] == 4 else ("-", "-")
        out.append(
            f"| {', '.join(map(str, shape))} | {m['rank']} ({m['chunk']}) | {m['fwd_ms']:.3f} | "
            f"{m['fwdbwd_ms']:.3f} | {s['fwd_ms']:.3f} / {s['fwdbwd_ms']:.3f} | "
            f"{m['fwdbwd_ms'] / s['fwdbwd_ms']:.2f}x | {tgt[0]} / {tgt[1]} | {off[0]} / {off[1]} "
            f"| {m['fwd_tflops']:.0f} / {m['fwdbwd_tflops']:.0f} "
            f"({m['fwd_tflops'] / mm:.0%} / {m['fwdbwd_tflops'] / mm:.0%}) "
            f"| {m['fwd_gbps']:.0f} / {m['fwdbwd_gbps']:.0f} "
            f"({m['fwd_gbps'] / bw:.0%} / {m['fwdbwd_gbps'] / bw:.0%}) | {m['peak_gb']:.1f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--shapes", default=",".join(str(i) for i in range(len(SHAPES))))
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--chunk-rows", type=int, default=64, choices=(32, 64, 128))
    ap.add_argument("--siso-rows", type=int, default=None, choices=(32, 64, 128))
    ap.add_argument("--force-rows", action="store_true", help="run ROWS past the tile rule")
    args = ap.parse_args()
    siso_rows = args.siso_rows or args.chunk_rows
    if args.force_rows:
        check_forced(args.rank, args.chunk_rows)
        scan_module.kernel_chunk = _past_the_tile_rule
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    meta = dict(
        device=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        commit=commit or "unknown",
        copy_gbps=copy_bandwidth() / 1e9,
        matmul_tflops=matmul_tflops(),
        chunk_rows=args.chunk_rows,
        siso_rows=siso_rows,
        forced=args.force_rows,
    )
    rows = []
    for i in (int(s) for s in args.shapes.split(",")):
        shape = SHAPES[i]
        row = {"shape": shape}
        row["mimo"] = time_scan(shape, args.rank, args.reps, args.chunk_rows)
        row["siso"] = time_scan(shape, 1, args.reps, siso_rows)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(f"{args.out}.json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(f"{args.out}.md", "w") as f:
            f.write(markdown(meta, rows))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
