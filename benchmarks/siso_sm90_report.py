"""Resource report of the Triton scan kernels (SISO, or MIMO with --rank) for sm_90, built
on a machine with no GPU.

Compiles each chunk kernel for an H100 target with Triton's own ``ptxas`` (the benchmark shape's
flags: C 64, P 64, N 128, bf16 fast mode, 16-byte aligned pointers as a real launch would
specialise them) and prints, per kernel: registers and spills (``ptxas -v``), global load /
store instructions by width (scalar ``b16`` loads mean an uncoalesced gather), and the source
lines with the most PTX instructions. It is how the fixes listed in ``docs/kernels.md`` were
found between GPU runs; numbers come from the local Triton, not the GPU machine's (3.6), so
compare variants, not absolute values.

    python benchmarks/siso_sm90_report.py [--warps 4] [--top 12] [--rank R] [--qk-heads N] \
        [kernel ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hybridkit.kernels.mamba3.chunkscan import backward, forward

KERNELS = ("_fwd_state", "_fwd_out", "_bwd_dstate", "_bwd_q", "_bwd_k", "_bwd_x", "_bwd_gates")
PASSES = ("_fwd_pass", "_bwd_pass")  # also accepted by name; PB as at batch 8
FLAGS = dict(C=64, P=64, N2=64, HAS_TRAP=True, HAS_ANG=True, VARLEN=False, FAST=True)
FLAGS.update(HAS_D=True, HAS_DTOT=False, HAS_INIT=False)
FLAGS.update(HAS_DSEND=False, PB=16, NA=32)  # NA: S = N / 4 angles
FLAGS.update(R=1, HALVES=False)  # --rank R: MIMO (C = 64 / R tokens, halves pairing)
FLAGS.update(HS=1)  # --qk-heads: heads per program of the q / k kernels (``qk_heads``)
# fp32 pointers (gates, biases, D, per-chunk scalars, backward scratch); everything else bf16
FP32 = {
    "ADT",
    "DT",
    "QB",
    "KB",
    "DSKIP",
    "DECAY",
    "OMEGA",
    "DCS_STATE",
    "DAS",
    "DOMEGA",
    "DTHETA",
    "DU",
    "DQ_HEADS",
}
FP32 |= {
    "DK_HEADS",
    "DQ_BIAS_PART",
    "DK_BIAS_PART",
    "DADT",
    "DKAPPA",
    "DGAMMA",
    "DD_PART",
    "DTOTAL_ANGLE",
    "DDT",
    "GATES",
    "PSI",
    "DPSI_PART",
}
UNIT_STRIDES = {"s_al", "s_dl", "s_tl"}  # (B, H, L) gates: specialised to 1 at launch
SIZES = {"L", "H", "HPG", "NANG", "NC", "NT"}


def compile_kernel(name: str, warps: int, maxnreg: int | None = None):
    """Compile the SISO kernel ``<name>_kernel`` for sm_90 with the benchmark's specialisation."""
    fn = getattr(forward, name + "_kernel", None) or getattr(backward, name + "_kernel")
    sig, const, attrs = {}, {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in UNIT_STRIDES:
            sig[a], const[a] = "constexpr", 1
            continue
        if a in FLAGS:
            sig[a], const[a] = "constexpr", FLAGS[a]
            continue
        attrs[(i,)] = [["tt.divisibility", 16]]
        if a.startswith("s_") or a in SIZES:
            sig[a] = "i32"
        elif a in ("CHTAB", "SEQTAB"):
            sig[a] = "*i64"
        else:
            sig[a] = "*fp32" if a in FP32 else "*bf16"
    src = ASTSource(fn, sig, const, attrs)
    opts = dict(num_warps=warps, num_stages=1)
    if maxnreg:
        opts["maxnreg"] = maxnreg  # a register cap, as the ``maxnreg`` launch option sets
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def ptxas_summary(ptx: str) -> str:
    """Registers and spill bytes from ``ptxas -v`` (the newest ptxas Triton ships)."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    exe = next(
        (os.path.join(bindir, b) for b in ("ptxas-blackwell", "ptxas") if b in os.listdir(bindir)),
        "ptxas",
    )
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run(
            [exe, "-arch=sm_90a", "-v", path, "-o", os.path.join(d, "k.o")],
            capture_output=True,
            text=True,
        )
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    if regs is None:
        return "ptxas failed: " + r.stderr.strip().splitlines()[-1]
    sp = f", spills {spills[0][0]} / {spills[0][1]} bytes" if spills else ""
    # a non-inlined device function (``qk_heads`` > 1) has its own spills
    sp += "".join(f" + {a} / {b} in a called function" for a, b in spills[1:])
    return f"{regs.group(1)} registers{sp}"


def ptx_profile(ptx: str) -> tuple[collections.Counter, collections.Counter]:
    """(global memory ops by width, instruction count by source line) of straight-line PTX."""
    files = dict(re.findall(r'\.file\s+(\d+)\s+"([^"]+)"', ptx))
    mem, lines = collections.Counter(), collections.Counter()
    loc = "?"
    for raw in ptx.splitlines():
        t = raw.strip()
        m = re.match(r"\.loc\s+(\d+)\s+(\d+)", t)
        if m:
            loc = f"{os.path.basename(files.get(m.group(1), '?'))}:{m.group(2)}"
            continue
        if not t or t.startswith(("//", ".", "$", "{", "}")) or t.endswith(":"):
            continue
        lines[loc] += 1
        g = re.search(r"\b((?:ld|st)\.global[\w.]*)", t)
        if g:
            mem[g.group(1)] += 1
    return mem, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernels", nargs="*", default=list(KERNELS))
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--top", type=int, default=8, help="source lines to list per kernel")
    ap.add_argument("--maxnreg", type=int, default=None, help="cap registers per thread")
    ap.add_argument("--rank", type=int, default=1, help="MIMO rank (chunk 64 / rank tokens)")
    ap.add_argument("--qk-heads", type=int, default=1, help="heads per q / k backward program")
    args = ap.parse_args()
    FLAGS.update(R=args.rank, HALVES=args.rank > 1, C=64 // args.rank, HS=args.qk_heads)
    for name in args.kernels:
        kern = compile_kernel(name, args.warps, args.maxnreg)
        ptx = kern.asm["ptx"]
        mem, lines = ptx_profile(ptx)
        smem = kern.metadata.shared
        print(
            f"{name} ({args.warps} warps): {ptxas_summary(ptx)}; {smem} B shared; "
            f"{sum(lines.values())} PTX"
        )
        print("  global:", ", ".join(f"{op} x{n}" for op, n in sorted(mem.items())))
        for loc, n in lines.most_common(args.top):
            print(f"  {n:6d}  {loc}")


if __name__ == "__main__":
    main()
