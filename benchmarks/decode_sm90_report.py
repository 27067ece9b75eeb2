"""Resource report of the decode step's Triton kernels for sm_90, with and without PDL, built on
a machine with no GPU.

Compiles the few-row linears (one row; 16 rows; each with the SwiGLU epilogue), the fused
residual add + RMSNorm and the fused Mamba-3 step (SISO and MIMO R 4, grouped pre-gate norm;
SISO split over two programs per head, ``step_split``, and its finish launch, with PDL only
under ``FINISH_PDL``)
for an H100 target, ``USE_PDL`` off and on, and prints per kernel: registers and spills
(``ptxas -v``), the PDL instructions found, and the global loads and L2 prefetches the PTX
issues before ``griddepcontrol.wait`` (the weights a PDL launch asks for while its predecessor
still runs: the linears must prefetch or load only weights, and no store may come before the
wait).

    python benchmarks/decode_sm90_report.py [--check]

``--check`` (what ``tests/test_pdl.py`` runs, without ``TRITON_INTERPRET``) exits 1 when a
kernel breaks PDL's safety rule (``violations``).
"""

from __future__ import annotations

import argparse
import re

import triton
import triton.language as tl
from siso_sm90_report import ptxas_summary
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hybridkit.kernels.attention import step_kernel as attn_step
from hybridkit.kernels.linear import triton_kernels as lin
from hybridkit.kernels.mamba3.step import triton_step as step
from hybridkit.kernels.norm import triton_kernels as norm

LINEAR = dict(BLOCK_K=lin.BLOCK_K, STAGES=lin.STAGES, HAS_BIAS=False, PREFETCH=True)
LINEAR.update(PRENORM=False, LANES=32 * lin.WARPS)
GEMV = dict(BLOCK_N=lin.GEMV_BLOCK_N, BLOCK_K=lin.GEMV_BLOCK_K, STAGES=lin.GEMV_STAGES)
GEMV.update(HAS_BIAS=False, PREFETCH=True, PRENORM=False, LANES=32 * lin.GEMV_WARPS)
GEMV.update(PRELOAD=False, KP=1)
#: whole-K weight tiles loaded before the wait (PDL's default): fc2's (4 x 4,096, K 2,816) and
#: fc1 + SwiGLU's with the folded add + norm (2 x 4 x 1,024)
PRELOAD = dict(GEMV, PRELOAD=True, PREFETCH=False)
STEP = dict(H=32, G=1, P=64, N=128, S=32, BLOCK_P=64, BLOCK_N=128, BLOCK_S=32, HEAVY_TAIL=True)
STEP.update(HAS_TRAP=True, HAS_ANG=True, HAS_D=True, GATED=True, NORM=1, SPLIT=1)
STEP.update(EARLY_STATE=False)
STEP_FP32 = {"ANGLE", "SSM", "DT_BIAS", "B_BIAS", "C_BIAS", "B_NORM", "C_NORM", "DSKIP", "MX"}
STEP_FP32 |= {"MZ", "MO", "OUT_NORM", "THNEW", "Y"}
#: the split step's first launch: half the rows per program, y per rank out (the gate and norm
#: move to the finish launch)
SPLIT2 = dict(STEP, R=1, HALVES=False, HAS_MX=False, HAS_MZ=False, HAS_MO=False, SPLIT=2)
SPLIT2.update(BLOCK_P=32, GATED=False, NORM=0)
FINISH = dict(H=32, R=1, P=64, N=128, S=32, BLOCK_P=64, BLOCK_N=128, BLOCK_S=32, GATED=True)
FINISH.update(HAS_MZ=False, HAS_MO=False, NORM=1, HAS_ANG=True)
ATTN = dict(H=16, HK=4, REP=4, D=64, BLOCK_R=16, BLOCK_D=64, BLOCK_S=attn_step.BLOCK_S)
ATTN.update(HAS_ROPE=True, HAS_NORM=False, FP32=False, CDT=tl.float32)
ROWS16 = dict(LINEAR, BLOCK_M=16, BLOCK_N=16, FP32=False, SPLIT=1)
PRE16 = dict(ROWS16, PRENORM=True)
SISO = dict(STEP, R=1, HALVES=False, HAS_MX=False, HAS_MZ=False, HAS_MO=False)
MIMO = dict(STEP, R=4, HALVES=True, HAS_MX=True, HAS_MZ=True, HAS_MO=True)
#: (label, kernel, constexprs, fp32 pointer args, warps)
CASES = [
    ("gemv", lin._gemv_kernel, dict(GEMV, GLU=False), set(), 4),
    ("gemv glu", lin._gemv_kernel, dict(GEMV, GLU=True), set(), 4),
    ("16-row", lin._skinny_linear_kernel, dict(ROWS16, GLU=False), set(), 4),
    ("16-row glu", lin._skinny_linear_kernel, dict(ROWS16, GLU=True), set(), 4),
    ("16-row N>=8192", lin._skinny_linear_kernel, dict(ROWS16, BLOCK_N=32, GLU=False), set(), 4),
    # K in 4 slices, the partials added by each tile's last program (SPLIT_K_MAX)
    ("16-row split 4", lin._skinny_linear_kernel, dict(ROWS16, GLU=False, SPLIT=4), {"WS"}, 4),
    # norm_linear: the block's add + pre-norm folded into the projection
    ("gemv prenorm", lin._gemv_kernel, dict(GEMV, GLU=False, PRENORM=True), set(), 4),
    ("gemv glu prenorm", lin._gemv_kernel, dict(GEMV, GLU=True, PRENORM=True), set(), 4),
    ("gemv preload K4096", lin._gemv_kernel, dict(PRELOAD, KP=4096, GLU=False), set(), 4),
    (
        "gemv preload glu prenorm",
        lin._gemv_kernel,
        dict(PRELOAD, KP=1024, GLU=True, PRENORM=True),
        set(),
        4,
    ),  # fmt: skip
    ("16-row prenorm", lin._skinny_linear_kernel, dict(PRE16, GLU=False), set(), 4),
    ("16-row glu prenorm", lin._skinny_linear_kernel, dict(PRE16, GLU=True), set(), 4),
    (
        "add+norm",
        norm._add_norm_fwd_kernel,
        dict(D=1024, BLOCK_M=2, BLOCK_N=1024, STORE_RSTD=False),
        set(),
        8,
    ),
    ("step SISO", step.mamba3_step_kernel, SISO, STEP_FP32, 8),
    ("step MIMO R4", step.mamba3_step_kernel, MIMO, STEP_FP32, 8),
    ("step SISO split2", step.mamba3_step_kernel, SPLIT2, STEP_FP32 | {"OUT"}, 4),  # y fp32
    # the split step's default under PDL: its state read before the wait (EARLY_STATE)
    (
        "step SISO split2 early state",
        step.mamba3_step_kernel,
        dict(SPLIT2, EARLY_STATE=True),
        STEP_FP32 | {"OUT"},
        4,
    ),  # fmt: skip
    (
        "step MIMO R4 split2 early state",
        step.mamba3_step_kernel,
        dict(MIMO, SPLIT=2, BLOCK_P=32, GATED=False, NORM=0, EARLY_STATE=True),
        STEP_FP32 | {"OUT"},
        4,
    ),  # fmt: skip
    ("step finish", step.mamba3_step_finish_kernel, FINISH, STEP_FP32, 4),  # FINISH_PDL
    ("attention step", attn_step._attention_step_kernel, ATTN, set(), 4),
    # head_dim 8 pads to 16 columns: the GPU's 16-bit dot needs an inner size >= 16
    (
        "attention step D8",
        attn_step._attention_step_kernel,
        dict(ATTN, H=2, HK=1, REP=2, D=8, BLOCK_D=16),
        set(),
        4,
    ),  # fmt: skip
]


#: register caps the launches apply by default (the SISO step's, ``_default_maxnreg``)
CAPS = {"step SISO": step._default_maxnreg(8, 1, "interleaved")}


def compile_case(fn, consts: dict, fp32: set[str], warps: int, pdl: bool, maxnreg: int = 0):
    sig, const, attrs = {}, {}, {}
    consts = dict(consts, USE_PDL=pdl)
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a], const[a] = "constexpr", consts[a]
        elif a in ("a_floor", "eps", "scale", "log2_theta"):
            sig[a] = "fp32"
        elif a == "POS":
            sig[a] = "*i64"
        elif a == "COUNT":
            sig[a] = "*i32"
        elif a.startswith(("s_", "stride")) or a in ("M", "N", "K", "ring", "k_slice"):
            sig[a] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[a] = "*fp32" if a in fp32 else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
    opts = dict(num_warps=warps, num_stages=1, launch_pdl=pdl)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(
        ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=opts
    )


def pdl_profile(ptx: str) -> str:
    """PDL instructions, and the global loads / prefetches / stores before the wait."""
    before, sep, _ = ptx.partition("griddepcontrol.wait")
    if not sep:
        return "no griddepcontrol.wait"
    trig = "launch_dependents" in ptx
    loads, prefetches, stores = _before_wait(before)
    return (
        f"launch_dependents {'yes' if trig else 'NO'}; before the wait {loads} loads, "
        f"{prefetches} L2 prefetches, {stores} stores"
    )


def _before_wait(before: str) -> tuple[int, int, int]:
    loads = len(re.findall(r"\bld\.global", before))
    prefetches = len(re.findall(r"\bcp\.async\.bulk\.prefetch\.L2", before))
    return loads, prefetches, len(re.findall(r"\bst\.global", before))


def violations(label: str, ptx_on: str, ptx_off: str) -> list[str]:
    """PDL's safety rule broken by one kernel's PTX (empty: kept): with ``USE_PDL`` it triggers
    its successor and waits, and before the wait stores nothing and reads only weights: the
    linears only bulk-prefetch them (no load) or, preloading whole tiles, only load them (no
    prefetch), the add + norm and the step load at most their per-head / per-channel parameters
    (a handful of loads; the split step with ``EARLY_STATE`` its state as well, which only its
    layer's previous step writes), the attention step nothing; without it, no PDL instruction."""
    found = []
    before, sep, _ = ptx_on.partition("griddepcontrol.wait")
    if not sep or "griddepcontrol.launch_dependents" not in ptx_on:
        found.append(f"{label}: no griddepcontrol.wait / launch_dependents with USE_PDL")
    loads, prefetches, stores = _before_wait(before)
    if stores:
        found.append(f"{label}: {stores} global stores before the wait")
    linear = label.startswith(("gemv", "16-row"))
    preload = "preload" in label  # loads its weight tile itself (the weight's loads only)
    if linear and not preload and (loads or prefetches != 1):
        found.append(f"{label}: {loads} loads and {prefetches} prefetches before the wait")
    if preload and (prefetches or not loads):
        found.append(f"{label}: {loads} loads and {prefetches} prefetches before the wait")
    early = "early state" in label  # the split step's state too (triton_step._early_state)
    if not linear and (prefetches or (loads > 12 and not early)):
        found.append(f"{label}: {loads} loads before the wait (expected its parameters only)")
    if early and loads <= 2:
        found.append(f"{label}: {loads} loads before the wait (expected the state's too)")
    if "griddepcontrol" in ptx_off:
        found.append(f"{label}: PDL instructions without USE_PDL")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a kernel breaks PDL's rule")
    args = ap.parse_args()
    broken = []
    for label, fn, consts, fp32, warps in CASES:
        ptx = {}
        for pdl in (False, True):
            ptx[pdl] = compile_case(fn, consts, fp32, warps, pdl, CAPS.get(label, 0)).asm["ptx"]
            extra = "; " + pdl_profile(ptx[pdl]) if pdl else ""
            print(f"{label:16s} pdl={int(pdl)} ({warps} warps): {ptxas_summary(ptx[pdl])}{extra}")
        broken += violations(label, ptx[True], ptx[False])
    for line in broken:
        print("VIOLATION", line)
    if args.check and broken:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
