"""Where the MIMO scan's time goes: chunk height and warps against SISO at equal chunks (GPU).

At (8, 4096, 32, 64, 128): SISO at chunks 16 / 32 / 64 and MIMO R 4 at chunks 16 (64 rows) and
32 (128 rows, forced past the tile rule), backward warps 4 and 8; then a profiled MIMO forward +
backward split by kernel. Prints one JSON line per measurement.

    python benchmarks/mimo_probe.py
    python benchmarks/mimo_probe.py --focus   # MIMO R 4 only, profiled at backward warps 4, 8,
                                              # and 4 with the x kernel at 8 (bwd_x_warps);
                                              # then chunk 32 (128 rows) at 8 warps
"""

from __future__ import annotations

import argparse
import json

import torch
from mamba3_siso import make_inputs
from triton.testing import do_bench

from hybridkit.kernels.config import kernel_config
from hybridkit.kernels.mamba3.chunkscan import scan

SHAPE = (8, 4096, 32, 64, 128)


def run(R: int, C: int, warps: int, profile: bool = False, x_warps: int | None = None) -> None:
    B, L, H, P, N = SHAPE
    inp = make_inputs(B, L, H, P, N, R=R)
    for t in inp.values():
        t.requires_grad_(True)
    dy = torch.randn(B, L, R, H, P, device="cuda", dtype=torch.bfloat16)
    pairing = "halves" if R > 1 else "interleaved"
    real = scan.kernel_chunk
    scan.kernel_chunk = lambda *a: C  # noqa: E731  (force the chunk past the tile rule)
    try:
        with kernel_config(bwd_warps=warps, bwd_x_warps=x_warps):

            def fwd():
                with torch.no_grad():
                    scan.mamba3_scan_triton(**inp, pairing=pairing, chunk_size=64 // R,
                                            return_state=False)  # fmt: skip

            def fb():
                y, _ = scan.mamba3_scan_triton(**inp, pairing=pairing, chunk_size=64 // R,
                                               return_state=False)  # fmt: skip
                y.backward(dy)

            for _ in range(3):
                fwd()
                fb()
            res = dict(R=R, C=C, rows=C * R, bwd_warps=warps, bwd_x_warps=x_warps)
            res["fwd_ms"] = do_bench(fwd, warmup=20, rep=100, return_mode="median")
            res["fwdbwd_ms"] = do_bench(
                fb, warmup=20, rep=100, grad_to_none=list(inp.values()), return_mode="median"
            )
            print(json.dumps(res), flush=True)
            if profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as p:
                    for _ in range(5):
                        fb()
                    torch.cuda.synchronize()
                per = {}
                for e in p.key_averages():
                    if e.device_type.name == "CUDA":
                        per[e.key[:60]] = round(e.self_device_time_total / 5e3, 3)
                top = dict(sorted(per.items(), key=lambda kv: -kv[1])[:14])
                print(json.dumps({"profile_ms_per_fwdbwd": top}), flush=True)
    except Exception as e:  # a configuration that does not compile or fit: say so, go on
        print(json.dumps(dict(R=R, C=C, bwd_warps=warps, error=repr(e)[:300])), flush=True)
    finally:
        scan.kernel_chunk = real
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--focus", action="store_true", help="MIMO R 4 only, at several warps")
    args = ap.parse_args()
    if args.focus:
        for warps, x_warps in ((4, None), (8, None), (4, 8)):
            run(4, 16, warps, profile=True, x_warps=x_warps)
        # 128-row chunks (half the chunk states) with a backward that really runs 8 warps: the
        # 2026-12-03 "C 32 at 8 warps" row ran 4 (the kernel_config did not reach the backward)
        run(4, 32, 8)
        return
    for C in (16, 32, 64):
        run(1, C, 4)
    run(4, 16, 4, profile=True)
    run(4, 16, 8)
    run(4, 32, 8)
    run(4, 32, 4)
    run(2, 32, 4)


if __name__ == "__main__":
    main()
