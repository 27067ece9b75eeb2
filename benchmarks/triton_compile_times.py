"""How long the Triton SISO kernels take to compile, per configuration (run on the GPU machine).

Each configuration runs in its own Python process (so each compiles from an empty Triton cache
and a stall cannot block the others): one forward + backward through
``mamba3_scan(..., backend="triton")`` with autotuning off, timed from the call to the end of
the backward (compilation of all nine kernels plus one run), then a second call (the run alone).
A process that does not finish within ``--timeout`` seconds is reported as a stall. Results go
to ``--out`` (.json + .md) and a table is printed last.

    python benchmarks/triton_compile_times.py --out benchmarks/results/triton_compile_times
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import sys, time, torch
from hybridkit.kernels.mamba3.ops import mamba3_scan
try:
    from hybridkit.kernels import config
    ctx, chunk = config.kernel_config(autotune=False), config.triton_chunk
except ImportError:  # before the kernel configuration existed: HYBRIDKIT_MAMBA3_AUTOTUNE=0
    import contextlib
    ctx, chunk = contextlib.nullcontext(), lambda C, N, P, fast: C
C, N, P, fast = (int(a) for a in sys.argv[1:5])
dt = torch.bfloat16 if fast else torch.float32
dev, B, L, H, S = "cuda", 2, 333, 4, N // 4
g = torch.Generator(device=dev).manual_seed(0)
r = lambda *s: torch.randn(*s, device=dev, generator=g)
q, k = r(B, L, 1, 1, N).to(dt), r(B, L, 1, 1, N).to(dt)
v = r(B, L, H, P).to(dt)
dtv = torch.rand(B, H, L, device=dev, generator=g) * 0.1 + 1e-3
adt = -dtv * (torch.rand(B, H, L, device=dev, generator=g) + 0.5)
args = [q, k, v, adt, dtv, r(B, H, L).to(dt), r(H, 1, N), r(H, 1, N), r(B, L, H, S).to(dt), r(H)]
for t in args:
    t.requires_grad_(True)
with ctx:
    for run in range(2):
        t0 = time.perf_counter()
        y, _ = mamba3_scan(*args, chunk_size=C, backend="triton", return_state=False)
        y.float().square().sum().backward()
        torch.cuda.synchronize()
        print(f"RUN{run} {time.perf_counter() - t0:.2f}", flush=True)
print("CHUNK", chunk(C, N, P, fast), flush=True)
"""


def run_case(case: tuple[int, int, int, int], timeout: float) -> dict:
    C, N, P, fast = case
    env = dict(os.environ)
    env["HYBRIDKIT_MAMBA3_AUTOTUNE"] = "0"
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(C), str(N), str(P), str(fast)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # so a stall's ptxas children die with it (they hold the pipe)
    )
    return {"case": dict(C=C, N=N, P=P, fast=bool(fast)), "proc": proc, "t0": t0, "to": timeout}


def finish(job: dict) -> dict:
    proc = job["proc"]
    remaining = max(1.0, job["to"] - (time.perf_counter() - job["t0"]))
    try:
        out, _ = proc.communicate(timeout=remaining)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = "stall"
    res = dict(job["case"], status=status, wall_s=round(time.perf_counter() - job["t0"], 1))
    for line in out.splitlines():
        if line.startswith("RUN0 "):
            res["first_call_s"] = float(line.split()[1])
        elif line.startswith("RUN1 "):
            res["second_call_s"] = float(line.split()[1])
        elif line.startswith("CHUNK "):
            res["kernel_chunk"] = int(line.split()[1])
    if status != "ok":
        res["tail"] = out[-800:]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="triton_compile_times")
    ap.add_argument("--timeout", type=float, default=400.0)
    ap.add_argument("--chunks", default="16,32,64,128")
    ap.add_argument("--states", default="64,128")
    ap.add_argument("--headdims", default="32,64")
    ap.add_argument("--modes", default="0,1", help="0 = fp32 precise, 1 = bf16 fast")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    cases = list(
        itertools.product(
            ints(args.chunks), ints(args.states), ints(args.headdims), ints(args.modes)
        )
    )
    jobs = [run_case(c, args.timeout) for c in cases]  # all at once: compilation is per process
    results = [finish(j) for j in jobs]
    import torch
    import triton

    meta = dict(
        device=torch.cuda.get_device_name(0),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        torch=torch.__version__,
        triton=triton.__version__,
        processes=len(cases),
        cpus=os.cpu_count(),
        shape="B 2, L 333, H 4, G 1, S N/4, trapezoid, D; forward + backward",
    )
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    lines = [
        "# Triton SISO compile times",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        "All configurations compiled concurrently (one process each), so times include CPU "
        "contention; a stall is a process still running at the timeout.",
        "",
        "| C asked | kernel C | N | P | mode | status | first call s | second call s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['C']} | {r.get('kernel_chunk', '-')} | {r['N']} | {r['P']} | "
            f"{'bf16' if r['fast'] else 'fp32'} | {r['status']} | {r.get('first_call_s', '-')} | "
            f"{r.get('second_call_s', '-')} |"
        )
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    for r in results:
        if "tail" in r:
            print(f"--- {r['C']}/{r['N']}/{r['P']}/{r['fast']}:\n{r['tail']}")


if __name__ == "__main__":
    main()
