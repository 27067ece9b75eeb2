"""Benchmark: Mamba-3 SISO chunked scan, Triton kernels vs the torch chunked path and the roofline.

Times forward (inference: no saved states) and forward + backward with ``triton.testing.do_bench``
medians after warm-up (autotuning happens in the warm-up, never in the timed region; do_bench
clears L2 between repetitions). bf16 q/k/v/trap/angles, fp32 adt/dt/biases/D, chunk 64, G = 1,
angles expanded over heads as the layer passes them (stride 0), S = N / 4 rotary pairs.

    python benchmarks/mamba3_siso.py --out OUT [--profile] [--no-chunked] [--shapes 0,2]

Writes ``<out>.json`` and ``<out>.md`` (device, versions, shapes, medians, TFLOP/s, GB/s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch
import triton
from triton.testing import do_bench

from hybridkit.kernels.mamba3.chunked import mamba3_scan_chunked
from hybridkit.kernels.mamba3.chunkscan import mamba3_scan_triton

SHAPES = [(8, 4096, 32, 64, 128), (1, 16384, 32, 64, 128), (8, 4096, 32, 64, 64)]
OFFICIAL = {  # official Mamba-3 SISO Triton kernel on our H100 (docs/kernels.md), ms
    (8, 4096, 32, 64, 128): (1.48, 4.33),
    (1, 16384, 32, 64, 128): (3.42, 7.29),
}
TARGET = {(8, 4096, 32, 64, 128): (1.0, 3.3), (1, 16384, 32, 64, 128): (1.2, 3.6)}


def make_inputs(B, L, H, P, N, C=64, G=1, seed=0, device="cuda", R=1):
    """Scan inputs as a layer passes them; ``R > 1``: MIMO (per-rank q / k / biases, mimo_x)."""
    g = torch.Generator(device=device).manual_seed(seed)
    S = N // 4
    bf = torch.bfloat16

    def rn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    def unit(t):
        return (t / t.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).to(bf)

    dt = torch.exp(torch.empty(B, H, L, device=device).uniform_(-6.9, -0.7, generator=g))
    ang = rn(B, L, 1, S, dtype=bf).expand(B, L, H, S)
    return dict(
        q=unit(rn(B, L, R, G, N)),
        k=unit(rn(B, L, R, G, N)),
        v=rn(B, L, H, P, dtype=bf),
        adt=-torch.empty(B, H, L, device=device).uniform_(0.5, 4.0, generator=g) * dt,
        dt=dt,
        trap=rn(B, H, L, dtype=bf),
        q_bias=rn(H, R, N),
        k_bias=rn(H, R, N),
        angles=ang,
        D=rn(H),
        **({"mimo_x": 1.0 + 0.1 * rn(H, R, P)} if R > 1 else {}),
    )


def flops_bytes(B, L, H, P, N, C=64, G=1, R=1):
    """Forward FLOPs (dense C R x C R tiles; docs/kernels.md, "Rooflines"), the fewest bytes the
    forward moves, and the same two for forward + backward (the backward counted as twice the
    forward's FLOPs). MIMO rank R: R rows of q / k / y / dy per token (``R * C`` rows a chunk);
    R = 1 is SISO."""
    S = N // 4
    rows = C * R
    fwd_flops = B * L * R * H * (2 * rows * (N + P) + 4 * N * P)
    # q, k, v, adt, dt, trap, angles
    tok_in = B * L * (2 * R * G * N * 2 + H * P * 2 + H * (4 + 4 + 2) + S * 2)
    y = B * L * R * H * P * 2
    fwd_bytes = tok_in + y
    # backward: reads inputs + dy (+ saved bf16 chunk states), writes every gradient once
    grads = tok_in + B * L * H * S * 2 - B * L * S * 2  # dangles are per head
    bwd_bytes = tok_in + y + grads
    return fwd_flops, fwd_bytes, 3 * fwd_flops, fwd_bytes + bwd_bytes


def copy_bandwidth() -> float:
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3)


def bench_shape(shape, reps: int, chunked: bool, profile: bool):
    B, L, H, P, N = shape
    sets = [make_inputs(B, L, H, P, N, seed=s) for s in range(2)]
    for inp in sets:
        for name in ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D"):
            inp[name].requires_grad_(True)
    dys = [torch.randn(B, L, 1, H, P, device="cuda", dtype=torch.bfloat16) for _ in sets]
    it = {"i": 0}

    def nxt():
        it["i"] ^= 1
        return sets[it["i"]], dys[it["i"]]

    def extra(fn):
        # as a training layer calls it: no final state (its absolute-frame conversion is
        # ~20 small torch ops of host time); the torch path has no such switch
        return {"return_state": False} if fn is mamba3_scan_triton else {}

    def fwd(fn=mamba3_scan_triton):
        inp, _ = nxt()
        with torch.no_grad():
            return fn(**inp, chunk_size=64, **extra(fn))

    def fwdbwd(fn=mamba3_scan_triton):
        inp, dy = nxt()
        y, _ = fn(**inp, chunk_size=64, **extra(fn))
        torch.autograd.backward(y, dy.to(y.dtype))

    res = {}
    for _ in range(3):  # warm-up incl. autotuning of every kernel variant
        fwd()
        fwdbwd()
    torch.cuda.synchronize()
    res["fwd_ms"] = do_bench(fwd, warmup=100, rep=reps, return_mode="median")
    # gradients reset before every repetition: accumulating into .grad is not the op's work
    leaves = [t for inp in sets for t in inp.values()]
    res["fwdbwd_ms"] = do_bench(
        fwdbwd, warmup=100, rep=reps, grad_to_none=leaves, return_mode="median"
    )
    if chunked:
        try:
            fc = lambda: fwd(mamba3_scan_chunked)  # noqa: E731
            fbc = lambda: fwdbwd(mamba3_scan_chunked)  # noqa: E731
            fc()
            fbc()
            res["torch_chunked_fwd_ms"] = do_bench(fc, warmup=1, rep=200, return_mode="median")
            res["torch_chunked_fwdbwd_ms"] = do_bench(
                fbc, warmup=1, rep=200, grad_to_none=leaves, return_mode="median"
            )
        except torch.OutOfMemoryError:
            res["torch_chunked_fwd_ms"] = res["torch_chunked_fwdbwd_ms"] = None
        torch.cuda.empty_cache()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(5):
                    # as in the timed runs: without it the 2nd..5th backward add into .grad
                    # (element-wise kernels that are not the op's work: ~0.17 ms at batch 8)
                    for t in leaves:
                        t.grad = None
                    fn()
                torch.cuda.synchronize()
            rows = []
            for e in p.key_averages():
                t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
                if t > 0:
                    rows.append((e.key[:60], e.count // 5, t / 5 / 1000))
            rows.sort(key=lambda r: -r[2])
            res[f"profile_{name}"] = rows[:12]
            # GPU busy time per call: above it, the measured median is host time
            res[f"kernels_{name}_ms"] = sum(r[2] for r in rows)
    return res


def sanity(B=2, L=1000, H=8, P=64, N=128) -> dict[str, float]:
    """After timing (autotuned configurations in place): Triton bf16 forward and gradients vs
    the torch chunked path in fp32 on the same inputs; relative norm errors."""
    inp = make_inputs(B, L, H, P, N, seed=5)
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inp.items()}
    ref = {k: v.detach().float().clone().requires_grad_() for k, v in inp.items()}
    dy = torch.randn(B, L, 1, H, P, device="cuda")
    y, _ = mamba3_scan_triton(**leaves, chunk_size=64)
    torch.autograd.backward(y, dy.to(y.dtype))
    yr, _ = mamba3_scan_chunked(**ref, chunk_size=64)
    torch.autograd.backward(yr, dy)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    out = {"y": rel(y, yr)}
    out.update({f"d{k}": rel(leaves[k].grad, ref[k].grad) for k in leaves})
    return out


def host_overhead(calls: int = 50, batches: int = 7) -> dict[str, float]:
    """Host (CPU) time per call at a tiny shape where the GPU work is negligible: median of
    ``batches`` runs of ``calls`` calls, timed without synchronizing. Where a shape's GPU time
    is below this, its benchmark median is host time (batch 1 at L 16384 is close). The
    backward is timed with autograd's default per-device worker thread and on the calling
    thread (``torch.autograd.set_multithreading_enabled(False)``)."""
    import time

    inp = make_inputs(1, 256, 4, 64, 128, seed=9)
    for t in inp.values():
        t.requires_grad_(True)
    dy = torch.randn(1, 256, 1, 4, 64, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            mamba3_scan_triton(**inp, chunk_size=64, return_state=False)

    def fwdbwd():
        for t in inp.values():
            t.grad = None
        y, _ = mamba3_scan_triton(**inp, chunk_size=64, return_state=False)
        torch.autograd.backward(y, dy)

    def per_call(fn) -> float:
        times = []
        for _ in range(batches):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) / calls * 1e3)
        torch.cuda.synchronize()
        return sorted(times)[batches // 2]

    fwd(), fwdbwd()
    out = {"fwd_ms": per_call(fwd), "fwdbwd_ms": per_call(fwdbwd)}
    with torch.autograd.set_multithreading_enabled(False):
        out["fwdbwd_calling_thread_ms"] = per_call(fwdbwd)
    return out


def kernel_resources() -> list[dict]:
    """Registers, spills and warps of every compiled Triton SISO kernel (profile evidence)."""
    from hybridkit.kernels.mamba3.chunkscan import backward, forward

    rows = []
    for name, fn in [*vars(forward).items(), *vars(backward).items()]:
        caches = getattr(fn, "device_caches", None)
        if not name.endswith("_kernel") or caches is None:
            continue
        for cache in caches.values():
            for kern in cache[0].values():
                md = kern.metadata
                rows.append(
                    dict(
                        kernel=name,
                        regs=getattr(kern, "n_regs", None),
                        spills=getattr(kern, "n_spills", None),
                        warps=getattr(md, "num_warps", None),
                        maxnreg=getattr(md, "maxnreg", None),
                        shared=getattr(md, "shared", None),
                    )
                )
    return rows


def tuner_choices() -> dict[str, list[str]]:
    """The launch configuration each tuned kernel picked, per key (flags + dtypes): every
    tuner ``siso.launch`` defines."""
    from hybridkit.kernels.mamba3.chunkscan import launch

    out = {}
    for name, tuned in sorted(vars(launch).items()):
        if isinstance(tuned, launch.TunedKernel):
            out[name] = [f"{k}: {v}" for k, v in tuned.best.items()]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/mamba3_siso")
    ap.add_argument("--reps", type=int, default=500, help="do_bench rep budget (ms)")
    ap.add_argument("--no-chunked", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--shapes",
        default="",
        help="indices into SHAPES to run, e.g. 0,2 (default: all); for quick experiments",
    )
    args = ap.parse_args()
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    meta = dict(
        device=dev,
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        python=platform.python_version(),
        copy_bandwidth_GBps=bw / 1e9,
        peak_bf16_TFLOPs=989.0,
        method="triton.testing.do_bench median, L2 cleared per rep; "
        "two input sets alternated; autotune finished in warm-up",
    )
    rows = []
    for shape in shapes:
        r = bench_shape(shape, args.reps, not args.no_chunked, args.profile)
        ff, fb, bf_, bb = flops_bytes(*shape)
        r.update(
            shape=dict(zip("BLHPN", shape, strict=True)),
            chunk=64,
            G=1,
            S=shape[4] // 4,
            fwd_TFLOPs=ff / (r["fwd_ms"] * 1e-3) / 1e12,
            fwd_GBps=fb / (r["fwd_ms"] * 1e-3) / 1e9,
            fwd_floor_ms=max(ff / 989e12, fb / bw) * 1e3,
            fwdbwd_TFLOPs=bf_ / (r["fwdbwd_ms"] * 1e-3) / 1e12,
            fwdbwd_GBps=bb / (r["fwdbwd_ms"] * 1e-3) / 1e9,
            fwdbwd_floor_ms=max(bf_ / 989e12, bb / bw) * 1e3,
            official_ms=OFFICIAL.get(shape),
            target_ms=TARGET.get(shape),
        )
        rows.append(r)
        print(json.dumps(r, default=str), flush=True)
    meta["host_ms_per_call_tiny_shape"] = host_overhead()
    print(json.dumps(meta["host_ms_per_call_tiny_shape"]), flush=True)
    meta["sanity_rel_err_vs_chunked_fp32"] = {f"N{n}": sanity(N=n) for n in (128, 64)}
    print(json.dumps(meta["sanity_rel_err_vs_chunked_fp32"]), flush=True)
    if args.profile:
        meta["kernels"] = kernel_resources()
        print(json.dumps(meta["kernels"]), flush=True)
    meta["tuned"] = tuner_choices()
    print(json.dumps(meta["tuned"]), flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=2, default=str)
    lines = [
        "# Mamba-3 SISO scan (Triton) benchmark",
        "",
        f"{dev}; torch {torch.__version__}; triton {triton.__version__}; {meta['date']}; "
        f"measured copy bandwidth {bw / 1e9:.0f} GB/s. {meta['method']}. bf16, chunk 64, G 1, "
        "S = N/4, D + trapezoid + rotation on, no z gate, no final state (as in training).",
        "",
        "| (B, L, H, P, N) | fwd ms | fwd+bwd ms | target fwd / f+b | official fwd / f+b "
        "| torch chunked fwd / f+b | fwd TFLOP/s, GB/s | f+b TFLOP/s, GB/s | floor fwd / f+b ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["shape"]
        tc = r.get("torch_chunked_fwd_ms")
        tcs = f"{tc:.2f} / {r['torch_chunked_fwdbwd_ms']:.2f}" if tc else "-"
        tg = r["target_ms"]
        of = r["official_ms"]
        lines.append(
            f"| ({s['B']}, {s['L']}, {s['H']}, {s['P']}, {s['N']}) | {r['fwd_ms']:.3f} | "
            f"{r['fwdbwd_ms']:.3f} | {f'{tg[0]} / {tg[1]}' if tg else 'report'} | "
            f"{f'{of[0]} / {of[1]}' if of else '-'} | {tcs} | "
            f"{r['fwd_TFLOPs']:.0f}, {r['fwd_GBps']:.0f} | {r['fwdbwd_TFLOPs']:.0f}, "
            f"{r['fwdbwd_GBps']:.0f} | {r['fwd_floor_ms']:.3f} / {r['fwdbwd_floor_ms']:.3f} |"
        )
    ho = meta["host_ms_per_call_tiny_shape"]
    lines += [
        "",
        f"Host time per call at a tiny shape (1, 256, 4, 64, 128), GPU work negligible: "
        f"fwd {ho['fwd_ms']:.2f} ms, fwd+bwd {ho['fwdbwd_ms']:.2f} ms "
        f"({ho['fwdbwd_calling_thread_ms']:.2f} ms with the autograd engine on the calling "
        "thread). A shape whose GPU time is below these is host-bound.",
    ]
    if args.profile:
        lines += ["", "| (B, L, H, P, N) | GPU busy fwd ms | GPU busy fwd+bwd ms |"]
        lines.append("|---|---|---|")
        for r in rows:
            s = r["shape"]
            lines.append(
                f"| ({s['B']}, {s['L']}, {s['H']}, {s['P']}, {s['N']}) | "
                f"{r['kernels_fwd_ms']:.3f} | {r['kernels_fwdbwd_ms']:.3f} |"
            )
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
