"""Does a grid barrier cost less than a kernel launch? One-row MLP chains on the GPU.

Why (issue #16): the 400M hybrid's batch-1 decode step is ~150 kernels of a few microseconds
each, and Nsight Compute (``benchmarks/results/decode_ncu_h100.md``) shows the one-row linears
at 19-40 % of DRAM bandwidth whatever their size: the step is bound by the number of launches,
not by bytes. A persistent kernel can run several dependent projections in one launch if its
programs wait for each other between them (a grid barrier: every program adds one to a counter
in global memory and spins until the counter reaches the phase's target), and it can ask L2
for the next projection's weights before it waits, as PDL was meant to. Before building the
decode step that way, this measures whether it pays on the shape that dominates the step: the
24 SwiGLU MLPs of the 400M model, ``x <- (silu(x W1g^T) * x W1v^T) W2^T`` at batch 1
(d_model 1,024, d_ff 2,816, bf16 weights, 415 MB per chain: more than L2, as in a real step).

Compared, each captured in a CUDA graph and replayed (median of CUDA-event timings):

* ``launches``: our production one-row kernel (``skinny_linear``, fc1 with ``glu``, then fc2):
  48 launches;
* ``persistent per MLP``: one launch per MLP (two phases, one barrier): 24 launches;
* ``persistent whole chain``: one launch for all 24 MLPs: 47 barriers;

each persistent variant with the L2 prefetch of a phase's weights issued before the barrier
that precedes it (``ahead`` 0), one phase earlier (``ahead`` 1), or not at all. Every variant's
output is first checked MLP by MLP against a float32 torch MLP (poisoned outputs, fresh random
inputs; ``check``).

The barrier needs every program resident at once (one program per SM, launched alone): a
persistent kernel is never run by the Triton interpreter, where programs run one after another
and the first would spin forever. GPU only.

    python benchmarks/persistent_chain.py --out benchmarks/results/persistent_chain_h100
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

from hybridkit.decode_bench import copy_bandwidth
from hybridkit.kernels.linear.triton_kernels import bulk_prefetch_l2, skinny_linear
from hybridkit.train.provenance import run_environment

D_MODEL, D_FF, BLOCKS = 1024, 2816, 24
#: persistent launches: (programs per SM, fc1 / fc2 columns per tile, K per step, K loop
#: unrolled, warps). The first is the best of the first run (H100, 2026-12-07: a loop over 4-column
#: tiles, K loop not unrolled); the others give each program one tile per phase where they can
#: (fc1: 2,816 columns, fc2: 1,024), its loads all issued before its first product.
LAUNCHES = (
    (2, 4, 4, 512, False, 4),
    (4, 8, 2, 256, True, 4),
)
#: one tile per program per phase, its weights loaded into registers before the barrier:
#: (programs per SM, fc1 / fc2 columns, warps, MLPs per launch, back-off between polls in ns).
#: The first call with such launches (264 programs x 8 warps, columns 16 / 4) hung: more
#: registers than two 8-warp programs per SM allow, so half the grid never started; launches
#: are now refused unless the compiled kernel's grid fits at once (``_launch``). The whole
#: chain at 4 programs per SM takes 168 registers (3 fit; one MLP per launch, where Triton
#: specialises the count of 1, fits 4), hence 3 per SM with 4 fc2 columns (256 tiles).
REG_LAUNCHES = (
    (4, 8, 2, 4, 1, 0),
    (4, 8, 2, 4, 24, 0),
    (3, 8, 4, 4, 1, 0),
    (3, 8, 4, 4, 24, 0),
    (3, 8, 4, 4, 24, 200),
)


@triton.jit
def _prefetch_rows(W, pid, NPROG: tl.constexpr, N, K, BLOCK_N: tl.constexpr,
                   GLU: tl.constexpr, LANES: tl.constexpr):  # fmt: skip
    """Ask L2 for every weight row this program will read in a phase (its column tiles
    ``pid, pid + NPROG, ...``; with ``GLU`` also the gate half's rows, N further on), one bulk
    prefetch per row."""
    lane = tl.arange(0, LANES)
    per_tile = 2 * BLOCK_N if GLU else BLOCK_N
    tile = pid + (lane // per_tile) * NPROG
    within = lane % per_tile
    gate = within >= BLOCK_N
    row = tile * BLOCK_N + tl.where(gate, within - BLOCK_N, within)
    active = row < N
    row = tl.minimum(row, N - 1) + tl.where(gate, N, 0)
    bulk_prefetch_l2(W + row.to(tl.int64) * K, tl.zeros_like(lane) + K * 2, active)


@triton.jit
def _arrive(BAR):
    """This program's writes of the phase are done: publish them and count it in."""
    tl.debug_barrier()
    tl.atomic_add(BAR, 1, sem="release", scope="gpu")


@triton.jit
def _retire(BAR, NPROG: tl.constexpr):
    """Count this program out (``BAR[1]``); the last one, when every program has passed its
    last wait, zeroes both counters for the next launch."""
    done = tl.atomic_add(BAR + 1, 1, sem="acq_rel", scope="gpu")
    if done == NPROG - 1:
        tl.atomic_xchg(BAR, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(BAR + 1, 0, sem="relaxed", scope="gpu")


@triton.jit
def _wait(BAR, target, SLEEP: tl.constexpr = 0):
    """Spin until ``target`` arrivals are counted, then let every thread of the program go on
    (the acquire makes the other programs' writes visible; activations are then loaded from L2,
    ``.cg``, never from a stale L1 line). ``SLEEP``: nanoseconds to back off between polls."""
    seen = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    while seen < target:
        if SLEEP > 0:
            tl.inline_asm_elementwise(
                f"nanosleep.u32 {SLEEP}; mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                is_pure=False, pack=1,
            )  # fmt: skip
        seen = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _k_step(acc, gacc, X, rows, k0, n_ok, N, K, BLOCK_K: tl.constexpr, GLU: tl.constexpr):
    """One BLOCK_K slice of the products (the input read from L2: other programs wrote it)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    m = n_ok[:, None] & k_ok[None, :]
    x = tl.load(X + offs_k, mask=k_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    acc += tl.load(rows + offs_k[None, :], mask=m, other=0.0).to(tl.float32) * x[None, :]
    if GLU:
        wg = tl.load(rows + N * K + offs_k[None, :], mask=m, other=0.0)
        gacc += wg.to(tl.float32) * x[None, :]
    return acc, gacc


@triton.jit
def _store_tile(out, gout, Y, Y2, offs_n, n_ok, GLU: tl.constexpr, COPY: tl.constexpr):
    """A tile's sums out in bf16 (GLU: ``value * silu(gate)``, each half first rounded to bf16
    as the production kernel does); with ``COPY`` to ``Y2`` as well."""
    if GLU:
        v = out.to(tl.bfloat16).to(tl.float32)
        g = gout.to(tl.bfloat16).to(tl.float32)
        out = v * g / (1.0 + tl.exp(-g))
    tl.store(Y + offs_n, out.to(tl.bfloat16), mask=n_ok)
    if COPY:
        tl.store(Y2 + offs_n, out.to(tl.bfloat16), mask=n_ok)


@triton.jit
def _gemv_phase(X, W, Y, Y2, pid, NPROG: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GLU: tl.constexpr,
                COPY: tl.constexpr, UNROLL: tl.constexpr):  # fmt: skip
    """``Y = X W^T`` for one row (GLU: ``silu(X Wg^T) * X Wv^T``, value rows first, each half
    rounded to bf16 first as the production kernel does), this program's column tiles; with
    ``COPY`` stored to ``Y2`` as well. ``UNROLL``: the K loop unrolled, so that every load of a
    tile can be issued before the first product (one trip to memory per tile, not K / BLOCK_K)."""
    for n0 in range(pid * BLOCK_N, N, NPROG * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        rows = W + offs_n.to(tl.int64)[:, None] * K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        gacc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if UNROLL:
            for k0 in tl.static_range(0, K, BLOCK_K):
                acc, gacc = _k_step(acc, gacc, X, rows, k0, n_ok, N, K, BLOCK_K, GLU)
        else:
            for k0 in range(0, K, BLOCK_K):
                acc, gacc = _k_step(acc, gacc, X, rows, k0, n_ok, N, K, BLOCK_K, GLU)
        _store_tile(tl.sum(acc, axis=1), tl.sum(gacc, axis=1), Y, Y2, offs_n, n_ok, GLU, COPY)


@triton.jit
def _chain_kernel(
    X, H, W1, W2, BAR, XS, first, count, D: tl.constexpr, F: tl.constexpr,
    NPROG: tl.constexpr, RECORD: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr,
    BLOCK_K: tl.constexpr, UNROLL: tl.constexpr, PREFETCH: tl.constexpr, AHEAD: tl.constexpr,
    LANES1: tl.constexpr, LANES2: tl.constexpr,
):  # fmt: skip
    """MLPs ``first .. first + count - 1``: phase 2j is fc1 + SwiGLU (X -> H, ``BN1`` columns
    per tile), phase 2j + 1 fc2 (H -> X, ``BN2``), a grid barrier between phases; with
    ``RECORD`` fc2 of MLP j also writes row j + 1 of ``XS`` (the check's per-MLP outputs).
    ``BAR[0]`` counts arrivals, ``BAR[1]`` finished programs; the last program to finish zeroes
    both for the next launch."""
    pid = tl.program_id(0)
    if PREFETCH and AHEAD == 1:
        _prefetch_rows(W1 + first * 2 * F * D, pid, NPROG, F, D, BN1, True, LANES1)
    for j in range(first, first + count):
        w1 = W1 + j.to(tl.int64) * 2 * F * D
        w2 = W2 + j.to(tl.int64) * D * F
        phase = 2 * (j - first)
        if PREFETCH:
            if AHEAD == 0:
                _prefetch_rows(w1, pid, NPROG, F, D, BN1, True, LANES1)
            else:
                _prefetch_rows(w2, pid, NPROG, D, F, BN2, False, LANES2)
        if phase > 0:
            _wait(BAR, phase * NPROG)
        _gemv_phase(X, w1, H, H, pid, NPROG, F, D, BN1, BLOCK_K, True, False, UNROLL)
        _arrive(BAR)
        if PREFETCH:
            if AHEAD == 0:
                _prefetch_rows(w2, pid, NPROG, D, F, BN2, False, LANES2)
            elif j + 1 < first + count:
                _prefetch_rows(w1 + 2 * F * D, pid, NPROG, F, D, BN1, True, LANES1)
        _wait(BAR, (phase + 1) * NPROG)
        xs = XS + (j + 1).to(tl.int64) * D
        _gemv_phase(H, w2, X, xs, pid, NPROG, D, F, BN2, BLOCK_K, False, RECORD, UNROLL)
        if j + 1 < first + count:
            _arrive(BAR)
    _retire(BAR, NPROG)


@triton.jit
def _tile_weights(W, pid, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                  KP: tl.constexpr, GLU: tl.constexpr):  # fmt: skip
    """This program's one tile of weights, whole K (padded to ``KP``), into registers: issued
    before the barrier, so the DRAM reads overlap the wait (programs past the last tile load
    nothing)."""
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, KP)
    m = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    rows = W + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    w = tl.load(rows, mask=m, other=0.0)
    wg = w
    if GLU:
        wg = tl.load(rows + N * K, mask=m, other=0.0)
    return w, wg


@triton.jit
def _tile_product(w, wg, X, Y, Y2, pid, N: tl.constexpr, K: tl.constexpr,
                  BLOCK_N: tl.constexpr, KP: tl.constexpr, GLU: tl.constexpr,
                  COPY: tl.constexpr):  # fmt: skip
    """The tile's products with the input (read after the barrier, from L2), as
    :func:`_gemv_phase` computes them."""
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, KP)
    x = tl.load(X + offs_k, mask=offs_k < K, other=0.0, cache_modifier=".cg").to(tl.float32)
    out = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    gout = out
    if GLU:
        gout = tl.sum(wg.to(tl.float32) * x[None, :], axis=1)
    _store_tile(out, gout, Y, Y2, offs_n, offs_n < N, GLU, COPY)


@triton.jit
def _chain_kernel_regs(
    X, H, W1, W2, BAR, XS, first, count, D: tl.constexpr, F: tl.constexpr,
    NPROG: tl.constexpr, RECORD: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr,
    DP: tl.constexpr, FP: tl.constexpr, SLEEP: tl.constexpr,
):  # fmt: skip
    """:func:`_chain_kernel` with one tile per program per phase (``BN1`` / ``BN2`` columns
    such that the tiles are at most the programs) whose weights are loaded into registers
    before the barrier that precedes the phase."""
    pid = tl.program_id(0)
    for j in range(first, first + count):
        w1 = W1 + j.to(tl.int64) * 2 * F * D
        w2 = W2 + j.to(tl.int64) * D * F
        phase = 2 * (j - first)
        wv, wg = _tile_weights(w1, pid, F, D, BN1, DP, True)
        if phase > 0:
            _wait(BAR, phase * NPROG, SLEEP)
        _tile_product(wv, wg, X, H, H, pid, F, D, BN1, DP, True, False)
        _arrive(BAR)
        w, _ = _tile_weights(w2, pid, D, F, BN2, FP, False)
        _wait(BAR, (phase + 1) * NPROG, SLEEP)
        xs = XS + (j + 1).to(tl.int64) * D
        _tile_product(w, w, H, X, xs, pid, D, F, BN2, FP, False, RECORD)
        if j + 1 < first + count:
            _arrive(BAR)
    _retire(BAR, NPROG)


def _lanes(tiles: int, per_tile: int, nprog: int) -> int:
    return max(128, triton.next_power_of_2(triton.cdiv(tiles, nprog) * per_tile))


class NotResident(RuntimeError):
    """A persistent launch whose programs would not all fit on the GPU at once: its barrier
    would wait forever for programs that cannot start, so it is refused, not run."""


def resident_per_sm(regs: int, shared: int, warps: int) -> int:
    """How many programs of a kernel one SM holds at once (sm_90: 64K registers, allocated per
    warp in units of 256, 2,048 threads, 227 KB of shared memory, 32 blocks)."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (per_warp * warps), 2048 // (32 * warps), 227 * 1024 // max(shared, 1), 32)


def _launch(kernel, nprog: int, args: tuple, kw: dict) -> None:
    """Compile (cached), refuse a grid that cannot be resident at once, launch."""
    compiled = kernel.warmup(*args, grid=(nprog,), **kw)
    compiled._init_handles()
    sms = torch.cuda.get_device_properties(args[0].device).multi_processor_count
    fits = resident_per_sm(compiled.n_regs, compiled.metadata.shared, kw["num_warps"]) * sms
    if nprog > fits:
        raise NotResident(
            f"{nprog} programs at {compiled.n_regs} registers x {kw['num_warps']} warps: "
            f"only {fits} fit at once"
        )
    kernel[(nprog,)](*args, **kw)


def persistent_chain(x, h, w1, w2, bar, v: dict, xs=None) -> None:
    """Run the chain in place on ``x`` (1, D) with the launch ``v`` (programs, MLPs per launch,
    columns per tile of each phase, K per step, unrolled or not, prefetch, warps); ``xs``
    (MLPs + 1, D): where to record every MLP's output (row j + 1)."""
    d, f, nprog = x.shape[1], h.shape[1], v["nprog"]
    kw = dict(NPROG=nprog, RECORD=xs is not None, BN1=v["bn1"], BN2=v["bn2"], num_warps=v["warps"])
    if v.get("regs"):
        if triton.cdiv(f, v["bn1"]) > nprog or triton.cdiv(d, v["bn2"]) > nprog:
            raise ValueError("one tile per program: more tiles than programs")
        kernel = _chain_kernel_regs
        kw.update(DP=triton.next_power_of_2(d), FP=triton.next_power_of_2(f), SLEEP=v["sleep"])
    else:
        kernel = _chain_kernel
        kw.update(BLOCK_K=v["block_k"], UNROLL=v["unroll"], PREFETCH=v["prefetch"], AHEAD=0)
        kw.update(LANES1=_lanes(triton.cdiv(f, v["bn1"]), 2 * v["bn1"], nprog))
        kw.update(LANES2=_lanes(triton.cdiv(d, v["bn2"]), v["bn2"], nprog))
    for first in range(0, w1.shape[0], v["per_launch"]):
        args = (x, h, w1, w2, bar, x if xs is None else xs, first, v["per_launch"], d, f)
        _launch(kernel, nprog, args, kw)


def launch_chain(x, w1, w2, xs=None):
    """The production path: 48 launches of the one-row kernel (and one copy into ``x``)."""
    y = x
    for j in range(w1.shape[0]):
        y = skinny_linear(skinny_linear(y, w1[j], None, glu=True), w2[j], None)
        if xs is not None:
            xs[j + 1].copy_(y[0])
    x.copy_(y)


def reference_mlp(x, w1, w2):
    """One MLP in float32 with the kernels' bf16 roundings (each product's halves, the
    activation; the output left in float32)."""
    f = w1.shape[0] // 2
    p = x.float() @ w1.float().T
    v = p[..., :f].bfloat16().float()
    g = p[..., f:].bfloat16().float()
    return (v * torch.sigmoid(g) * g).bfloat16().float() @ w2.float().T


def check(xs, w1, w2) -> tuple[float, int]:
    """Each MLP's recorded output against the reference MLP applied to its recorded input
    (teacher forcing: a SwiGLU chain is quadratic, so after a dozen MLPs any two roundings
    drift apart or underflow, while a barrier that let a phase read a stale input shows at the
    first MLP). Returns the largest relative error over the MLPs whose reference output has a
    norm in [1e-3, 1e4], and how many those were (NaN if any output is not finite)."""
    if not torch.isfinite(xs).all():
        return float("nan"), 0
    worst, checked = 0.0, 0
    for j in range(w1.shape[0]):
        ref = reference_mlp(xs[j], w1[j], w2[j])
        norm = ref.norm().item()
        if 1e-3 <= norm <= 1e4:
            worst = max(worst, ((xs[j + 1].float() - ref).norm() / norm).item())
            checked += 1
    return worst, checked


def graphed(fn):
    """Capture ``fn`` once (after a warm-up call on a side stream) and return its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def time_us(replay, reps: int = 200, warmup: int = 20) -> float:
    for _ in range(warmup):
        replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="path stem for the .json and .md")
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(0)
    w1 = torch.randn(BLOCKS, 2 * D_FF, D_MODEL, device=dev, generator=gen) / D_MODEL**0.5
    # 1.6: the chain's norm stays near its input's for several MLPs before it decays
    w2 = torch.randn(BLOCKS, D_MODEL, D_FF, device=dev, generator=gen) * 1.6 / D_FF**0.5
    w1, w2 = w1.bfloat16(), w2.bfloat16()
    x0 = torch.randn(1, D_MODEL, device=dev, generator=gen).bfloat16()
    weight_bytes = (w1.numel() + w2.numel()) * 2
    bw = copy_bandwidth(dev)
    floor_us = weight_bytes / bw * 1e6

    x = torch.empty_like(x0)
    h = torch.empty(1, D_FF, device=dev, dtype=torch.bfloat16)
    bar = torch.zeros(2, device=dev, dtype=torch.int32)
    xs = torch.empty(BLOCKS + 1, D_MODEL, device=dev, dtype=torch.bfloat16)
    variants = [
        ("launches (production one-row kernel)", lambda xs=None: launch_chain(x, w1, w2, xs), 48)
    ]

    def add(v: dict, detail: str) -> None:
        """A persistent variant: its name (layout, then ``detail``), runner and launches."""
        scope = "per MLP" if v["per_launch"] == 1 else "whole chain"
        name = (
            f"persistent, {scope}, {v['nprog']} programs x {v['warps']} warps, columns "
            f"{v['bn1']} / {v['bn2']}, {detail}"
        )

        def fn(xs=None, v=v):
            persistent_chain(x, h, w1, w2, bar, v, xs)

        variants.append((name, fn, BLOCKS // v["per_launch"]))

    for mult, bn1, bn2, block_k, unroll, warps in LAUNCHES:
        for per_launch in (1, BLOCKS):
            for prefetch in (False, True):
                v = dict(nprog=mult * sms, per_launch=per_launch, bn1=bn1, bn2=bn2)
                v.update(block_k=block_k, unroll=unroll, prefetch=prefetch, warps=warps)
                add(
                    v,
                    f"K step {block_k}{' unrolled' if unroll else ''}, "
                    f"prefetch {'on' if prefetch else 'off'}",
                )
    for mult, bn1, bn2, warps, per_launch, sleep in REG_LAUNCHES:
        v = dict(nprog=mult * sms, per_launch=per_launch, bn1=bn1, bn2=bn2, warps=warps)
        v.update(regs=True, sleep=sleep)
        add(v, f"weights into registers before the barrier, {sleep} ns between polls")
    rows = []
    for name, fn, launches in variants:
        xs.fill_(float("nan"))
        h.fill_(float("nan"))
        x.copy_(x0)
        xs[0].copy_(x0[0])
        try:
            fn(xs)
        except NotResident as e:
            rows.append({"variant": name, "launches": launches, "refused": str(e)})
            print(json.dumps(rows[-1]), flush=True)
            continue
        torch.cuda.synchronize()
        err, checked = check(xs, w1, w2)
        ok = err < 2e-2 and checked >= 5
        row = {"variant": name, "launches": launches, "rel_err": err, "checked_mlps": checked}
        row["correct"] = ok
        if ok:
            x.copy_(x0)
            fn()
            end = x.clone()
            replay = graphed(fn)
            x.copy_(x0)
            replay()
            torch.cuda.synchronize()
            row["graph_equals_eager"] = bool(torch.equal(x, end))
            row["us"] = time_us(replay)
            row["x_floor"] = row["us"] / floor_us
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "environment": run_environment(),
        "device": torch.cuda.get_device_name(dev),
        "sms": sms,
        "shape": {"d_model": D_MODEL, "d_ff": D_FF, "blocks": BLOCKS, "rows": 1},
        "weight_bytes": weight_bytes,
        "copy_bandwidth_GBps": bw / 1e9,
        "floor_us": floor_us,
        "rows": rows,
    }
    with open(args.out + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    lines = [
        f"# One-row MLP chains: launches against grid barriers ({result['device']})",
        "",
        f"24 SwiGLU MLPs of the 400M model at batch 1 (d_model {D_MODEL}, d_ff {D_FF}, bf16), "
        f"{weight_bytes / 1e6:.0f} MB of weights; byte floor {floor_us:.1f} us at the "
        f"{bw / 1e9:.0f} GB/s copy bandwidth measured in the same run. CUDA graphs, median of "
        "200 replays. Checked first: every MLP's output against a float32 reference MLP on its "
        "recorded input (largest relative error over the MLPs with a healthy norm), and the "
        "graph's replay bitwise equal to an eager run.",
        "",
        "| variant | launches | us per chain | x floor | us per MLP | rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['variant']} | {r['launches']} | refused: {r['refused']} | | | |")
        elif "us" in r:
            lines.append(
                f"| {r['variant']} | {r['launches']} | {r['us']:.1f} | {r['x_floor']:.2f} | "
                f"{r['us'] / BLOCKS:.2f} | {r['rel_err']:.1e} |"
            )
        else:
            lines.append(f"| {r['variant']} | {r['launches']} | wrong | | | {r['rel_err']:.1e} |")
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
