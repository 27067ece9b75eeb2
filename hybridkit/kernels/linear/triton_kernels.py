"""A Triton kernel for linears with few rows (decoding): ``y = x W^T (+ b)`` for x (M, K) with
M <= 16, W (N, K).

Why: at one token per sequence every projection is a matrix-vector product (or, at batch 16,
a 16-row one) whose time is reading W once. On the H200 one Mamba-3 layer's two projections at
batch 1 took ~22 us of its 27 us decode step against a 12.4 us floor (``docs/kernels.md``);
a GEMM library's output tiles are 64-256 columns wide, so a narrow output gets few thread
blocks. Here each program owns 16 or 32 output columns (8 for a single row, which needs no
tensor-core tile: ``_gemv_kernel``), so every projection of the 400M model gets 64 to 4,000
programs, and walks K with the loads software-pipelined (``tl.range(..., num_stages)``), so
every SM keeps several W tiles in flight. On the H200 (``benchmarks/results/skinny_linear_h200.md``)
one row takes 0.40-0.94x cuBLAS's time on the 400M model's shapes and fc1 + SwiGLU 0.17x (one
launch instead of two); at 16 rows it is 0.95-1.53x (the narrow qkv projection worst), so
``skinny_linear`` is on by default and the 16-row tile is the place to improve. The 16 rows
pad one tensor-core tile (rows past M are masked); the wasted arithmetic is free next to the
bytes. Plain linears with few column tiles (the projections back to d_model: 64 tiles of 16)
split K over up to ``SPLIT_K_MAX`` programs per tile so that every SM streams weights; the
slices' fp32 partials meet in a workspace and the tile's last program (an atomic counter)
adds them in slice order, so results do not depend on which program finishes last, with no
second launch (``_split_k_finish``).

fp32 inputs multiply in full fp32 (``ieee``), so the CPU interpreter's tests compare against
``torch.nn.functional.linear`` tightly; bf16 / fp16 use the tensor cores with fp32 accumulation.

``PRENORM`` (kernel setting ``norm_linear``): the input is ``rms_norm(h + delta) * w``, the
residual add and pre-norm of a block, which otherwise take a launch of their own before each
block's first projection (48 of a 400M decode step's 176 kernels). The norm's scale
``1 / rms(s)`` is one number per row of ``s = h + delta``. The one-row kernel keeps its input
in fp32, where it commutes with the product: it walks K as before, forming ``s`` (rounded to the
residual's dtype, as torch's add is), its sum of squares and ``s * w`` per tile, and scales its
two accumulators once at the end. The 16-row kernel rounds its input tile to the input dtype
for the tensor cores, where an unnormalised ``s * w`` can overflow fp16, so it first walks K
once over h and delta for the sum of squares, then rounds ``s / rms(s) * w`` per tile exactly
as the norm kernel does. Program 0 also stores ``s``, the new residual stream. The extra reads
(h, delta and the norm weight, one or two passes over K per row) come from L2 after the first
program.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hybridkit.compat import interpreting
from hybridkit.kernels.pdl import launch_options, use_pdl

#: the most rows a call may have (one tensor-core tile tall)
MAX_ROWS = 16

#: The launches, module-level so that ``benchmarks/skinny_linear.py --sweep`` can time others
#: without a code change (each checked against ``F.linear`` first). 2-16 rows
#: (``_skinny_linear_kernel``): K per step, pipeline depth of the K loop (W tiles in flight per
#: program), warps, and output columns per program (``block_n``: wide outputs get more).
#: Both sets are the best of ``--sweep`` on the H100 (2026-12-06,
#: ``benchmarks/results/skinny_linear_h100.md``), scored by the 400M decode step's matmul time:
#: 2 warps here (1,024 us against 1,093 at 4), 4 columns below (880 us against 923 at 8; every
#: 4-column launch beat every 8-column one with the same warps).
BLOCK_K = 256
STAGES = 4
WARPS = 2
NARROW_BLOCK_N = 16
WIDE_BLOCK_N = 32
#: Split over K for the 2-16-row kernel (plain linears only, not ``GLU`` / ``PRENORM``): a
#: projection back to d_model has 1,024 / 16 = 64 column tiles, so 64 programs stream its weight
#: on half the H100's SMs. With ``SPLIT_K_MAX`` > 1 each tile's K is cut into up to that many
#: slices (a power of two, each at least ``BLOCK_K``), so that tiles x slices stays within
#: ``SPLIT_K_PROGRAMS_PER_SM`` programs per SM; the slices' fp32 partial sums meet in a
#: workspace, where the tile's last program (a counter per tile) adds them in slice order, so
#: the result does not depend on which program finishes last. 1: no split.
SPLIT_K_MAX = 4
SPLIT_K_PROGRAMS_PER_SM = 2
#: One row (``_gemv_kernel``): 4 output columns x 512 of K per step (16 elements per thread at
#: 4 warps), the same pipeline depth.
GEMV_BLOCK_N = 4
GEMV_BLOCK_K = 512
GEMV_WARPS = 4
GEMV_STAGES = 4
#: One row, whole-K weight tiles in registers (``PRELOAD``): 0 never, 1 under PDL (the default:
#: the tile is read before ``gdc_wait``, so it streams in while the previous kernel still runs),
#: 2 always (the CPU tests run that code without PDL). Only where a program's tile, K padded to
#: a power of two, is at most ``GEMV_PRELOAD_MAX`` elements (value and gate halves together):
#: 16K at 4 columns covers every 400M projection (fc2: 4 x 4,096), 128 bf16 values a thread.
GEMV_PRELOAD = 1
GEMV_PRELOAD_MAX = 16384


@triton.jit
def _epilogue(acc, gacc, B, offs_n, n_ok, N, dtype: tl.constexpr, HAS_BIAS: tl.constexpr,
              GLU: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """Bias, then (GLU) ``value * silu(gate)`` of the two halves, each first rounded to the
    output dtype as ``F.linear`` would have stored it; the result in the output dtype.
    ``ROWS``: the accumulators are (rows, columns), else (columns,)."""
    if HAS_BIAS:
        acc += _bias(B, offs_n, n_ok, ROWS)
        if GLU:
            gacc += _bias(B + N, offs_n, n_ok, ROWS)
    if GLU:
        v = acc.to(dtype).to(tl.float32)
        g = gacc.to(dtype).to(tl.float32)
        acc = v * g / (1.0 + tl.exp(-g))
    return acc.to(dtype)


@triton.jit
def _bias(B, offs_n, n_ok, ROWS: tl.constexpr):
    """The bias of the columns ``offs_n`` in fp32, as a row vector when ``ROWS``."""
    b = tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if ROWS:
        b = b[None, :]
    return b


@triton.jit
def _x_wt(x, w, FP32: tl.constexpr):
    """x @ w^T on the tensor cores; fp32 inputs in full fp32 (``ieee``), not tf32."""
    if FP32:
        return tl.dot(x, tl.trans(w), input_precision="ieee")
    return tl.dot(x, tl.trans(w))


@triton.jit
def _pdl_prologue(
    W, pid, N, K, stride_wn, BLOCK_N: tl.constexpr, GLU: tl.constexpr, PREFETCH: tl.constexpr,
    LANES: tl.constexpr,
):  # fmt: skip
    """With PDL: let the next kernel launch, ask L2 for this program's whole weight slab, then
    wait for the previous kernel, whose output is ``x`` (``hybridkit/kernels/pdl.py``); the K
    loop after it reads the weights from L2, their DRAM traffic having overlapped the previous
    kernel. ``PREFETCH`` (rows on 16 bytes): one bulk prefetch per weight row (and per row of
    the gate half with ``GLU``): a 1-D tensor of ``LANES`` lanes (:func:`_lanes`: the program's
    threads, one lane each, unless the rows outnumber them), lane i < BLOCK_N the value row i,
    the next BLOCK_N the gate's."""
    tl.extra.cuda.gdc_launch_dependents()
    if PREFETCH:
        lane = tl.arange(0, LANES)
        gate = lane >= BLOCK_N
        row = pid * BLOCK_N + tl.where(gate, lane - BLOCK_N, lane)
        active = (row < N) & (lane < (2 * BLOCK_N if GLU else BLOCK_N))
        row = tl.minimum(row, N - 1) + tl.where(gate, N, 0)
        nbytes = tl.zeros_like(lane) + K * W.dtype.element_ty.primitive_bitwidth // 8
        bulk_prefetch_l2(W + row.to(tl.int64) * stride_wn, nbytes, active)
    tl.extra.cuda.gdc_wait()


@triton.jit
def bulk_prefetch_l2(ptrs, nbytes, active):
    """One ``cp.async.bulk.prefetch.L2`` per lane where ``active``: ``nbytes`` from ``ptrs``
    into L2 (both 16-byte aligned; sm_90 and later)."""
    tl.inline_asm_elementwise(
        "{\n\t.reg .pred p;\n\tsetp.ne.u32 p, $3, 0;\n\t"
        "@p cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;\n\t}",
        "=r,l,r,r",
        [ptrs, nbytes, active.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _residual(x, HRES, SOUT, h_off, mask):
    """One K tile of ``s = h + delta`` (``x`` holds delta), rounded to the residual's dtype
    as torch's add rounds it, in fp32. ``h_off``: the tile's offsets in h."""
    hres = tl.load(HRES + h_off, mask=mask, other=0.0)
    s = (hres.to(tl.float32) + x.to(tl.float32)).to(SOUT.dtype.element_ty)
    return s.to(tl.float32)


@triton.jit
def _store_residual(SOUT, s_off, sf, mask, offs_k, pid):
    """Program 0 stores the tile of the new residual stream (every program computes it)."""
    writer = (offs_k * 0 + pid) == 0  # a vector: the interpreter rejects a scalar mask term
    tl.store(SOUT + s_off, sf.to(SOUT.dtype.element_ty), mask=mask & writer)


@triton.jit
def _skinny_linear_kernel(
    X, W, B, Y, HRES, NW, SOUT, WS, COUNT,
    M, N, K, stride_xm, stride_wn, stride_ym, stride_hm, eps, k_slice,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, FP32: tl.constexpr, GLU: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, PRENORM: tl.constexpr, LANES: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    # SPLIT > 1: program (tile, slice) = divmod(program id, SPLIT) sums K in [slice * k_slice,
    # + k_slice) (``SPLIT_K_MAX``); the last program of a tile adds the slices' partials
    pid = tl.program_id(0) // SPLIT
    part = tl.program_id(0) % SPLIT
    k_lo = part * k_slice
    k_hi = tl.minimum(K, k_lo + k_slice) if SPLIT > 1 else K
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    r64 = offs_m.to(tl.int64)[:, None]  # row offsets may pass 2**31 in elements
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = X + r64 * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # GLU: the gate half's columns
    if USE_PDL:
        _pdl_prologue(W + k_lo, pid, N, k_hi - k_lo, stride_wn, BLOCK_N, GLU, PREFETCH, LANES)
    if PRENORM:  # first pass over K: the new residual (stored by program 0), 1 / rms per row
        sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):  # loads in flight
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xmask = m_ok[:, None] & (offs_k < K)[None, :]
            x = tl.load(x_rows + offs_k[None, :], mask=xmask, other=0.0)
            sf = _residual(x, HRES, SOUT, r64 * stride_hm + offs_k[None, :], xmask)
            _store_residual(SOUT, r64 * K + offs_k[None, :], sf, xmask, offs_k[None, :], pid)
            sumsq += tl.sum(sf * sf, axis=1)
        rstd = (1.0 / tl.sqrt(sumsq / K + eps))[:, None]
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        wmask = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_rows + offs_k[None, :], mask=wmask, other=0.0)
        xmask = m_ok[:, None] & k_ok[None, :]
        x = tl.load(x_rows + offs_k[None, :], mask=xmask, other=0.0)
        if PRENORM:  # the normed input tile, rounded as the norm kernel rounds its output
            sf = _residual(x, HRES, SOUT, r64 * stride_hm + offs_k[None, :], xmask)
            nw = tl.load(NW + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            x = (sf * rstd * nw[None, :]).to(X.dtype.element_ty)
        acc += _x_wt(x, w, FP32)
        if GLU:
            wg = tl.load(w_rows + N * stride_wn + offs_k[None, :], mask=wmask, other=0.0)
            gacc += _x_wt(x, wg, FP32)
    out = Y + r64 * stride_ym + offs_n[None, :]
    if SPLIT == 1:
        y = _epilogue(acc, gacc, B, offs_n, n_ok, N, Y.dtype.element_ty, HAS_BIAS, GLU, True)
        tl.store(out, y, mask=m_ok[:, None] & n_ok[None, :])
    else:
        _split_k_finish(acc, WS, COUNT, pid, part, B, out, offs_m, offs_n, m_ok, n_ok, N,
                        Y.dtype.element_ty, HAS_BIAS, BLOCK_M, BLOCK_N, SPLIT)  # fmt: skip


@triton.jit
def _split_k_finish(acc, WS, COUNT, tile, part, B, out, offs_m, offs_n, m_ok, n_ok, N,
                    dtype: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
    """Store this slice's fp32 partial (BLOCK_M x BLOCK_N) in the workspace, then count the
    tile's finished slices; the program that finishes last adds all of them in slice order
    (loads through L2, ``.cg``: an earlier launch may have left the lines in this SM's L1),
    applies the bias, stores the result and resets the counter for the next launch. The block
    barrier orders every thread's partial store before the counter's release."""
    tile_ws = WS + tile.to(tl.int64) * (SPLIT * BLOCK_M * BLOCK_N)
    cell = offs_m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(tile_ws + part * (BLOCK_M * BLOCK_N) + cell, acc)
    tl.debug_barrier()
    done = tl.atomic_add(COUNT + tile, 1, sem="acq_rel", scope="gpu")
    if done == SPLIT - 1:
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(SPLIT):
            total += tl.load(tile_ws + j * (BLOCK_M * BLOCK_N) + cell, cache_modifier=".cg")
        if HAS_BIAS:
            total += _bias(B, offs_n, n_ok, True)
        tl.store(out, total.to(dtype), mask=m_ok[:, None] & n_ok[None, :])
        tl.atomic_xchg(COUNT + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _gemv_kernel(
    X, W, B, Y, HRES, NW, SOUT, N, K, stride_wn, eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, HAS_BIAS: tl.constexpr,
    GLU: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, PRENORM: tl.constexpr,
    LANES: tl.constexpr, PRELOAD: tl.constexpr, KP: tl.constexpr,
):  # fmt: skip
    """One row (batch 1): no tensor-core tile to fill, so ``GEMV_BLOCK_N`` (4) output columns
    per program (four times the programs of the 16-row kernel: the 1,024-wide projections back
    to d_model get 256; more programs in flight read the weight faster at this size)
    and plain multiply-adds into a (BLOCK_N, BLOCK_K) fp32 accumulator, summed once at the end.
    The K loop is pipelined like the 16-row kernel's (compiled for sm_90: cp.async loads).

    ``PRELOAD``: the program's whole weight tile (K padded to ``KP``) is loaded at once, before
    the PDL wait when there is one, and the products are one (BLOCK_N, KP) multiply and sum: in
    a persistent kernel, loading the next projection's weights into registers before the grid
    barrier made a 24-MLP chain 18 % faster than its launches, where an L2 prefetch did not
    (``benchmarks/results/persistent_chain_h100.md``); under PDL the previous kernel plays the
    barrier's part."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    if PRELOAD:
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        offs_k = tl.arange(0, KP)
        k_ok = offs_k < K
        wmask = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_rows + offs_k[None, :], mask=wmask, other=0.0)
        wg = w
        if GLU:
            wg = tl.load(w_rows + N * stride_wn + offs_k[None, :], mask=wmask, other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        x = tl.load(X + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        sumsq = tl.zeros((KP,), dtype=tl.float32)
        if PRENORM:
            sf = _residual(x, HRES, SOUT, offs_k, k_ok)
            _store_residual(SOUT, offs_k, sf, k_ok, offs_k, pid)
            sumsq = sf * sf
            x = sf * tl.load(NW + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        out = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        gout = out
        if GLU:
            gout = tl.sum(wg.to(tl.float32) * x[None, :], axis=1)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        gacc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # GLU: the gate half's columns
        sumsq = tl.zeros((BLOCK_K,), dtype=tl.float32)  # PRENORM: of s = h + delta
        if USE_PDL:
            _pdl_prologue(W, pid, N, K, stride_wn, BLOCK_N, GLU, PREFETCH, LANES)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            wmask = n_ok[:, None] & k_ok[None, :]
            w = tl.load(w_rows + offs_k[None, :], mask=wmask, other=0.0)
            x = tl.load(X + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            if PRENORM:  # fp32 throughout: 1 / rms scales the sums at the end
                sf = _residual(x, HRES, SOUT, offs_k, k_ok)
                _store_residual(SOUT, offs_k, sf, k_ok, offs_k, pid)
                sumsq += sf * sf
                x = sf * tl.load(NW + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
            if GLU:
                wg = tl.load(w_rows + N * stride_wn + offs_k[None, :], mask=wmask, other=0.0)
                gacc += wg.to(tl.float32) * x[None, :]
        out, gout = tl.sum(acc, axis=1), tl.sum(gacc, axis=1)
    if PRENORM:  # the norm's 1 / rms, after the product (it commutes with it)
        rstd = 1.0 / tl.sqrt(tl.sum(sumsq, axis=0) / K + eps)
        out, gout = out * rstd, gout * rstd
    y = _epilogue(out, gout, B, offs_n, n_ok, N, Y.dtype.element_ty, HAS_BIAS, GLU, False)
    tl.store(Y + offs_n, y, mask=n_ok)


def gemv_preload(k: int, glu: bool, pdl: bool) -> bool:
    """Whether a one-row call with K ``k`` loads its weight tiles whole (``GEMV_PRELOAD``)."""
    if GEMV_PRELOAD == 0 or (GEMV_PRELOAD == 1 and not pdl):
        return False
    return GEMV_BLOCK_N * triton.next_power_of_2(k) * (2 if glu else 1) <= GEMV_PRELOAD_MAX


def block_n(n: int) -> int:
    """Output columns per program of the 2-16-row kernel: ``WIDE_BLOCK_N`` (32) for wide
    outputs, else ``NARROW_BLOCK_N`` (16: more programs for the narrow projections back to
    d_model, which have the fewest columns)."""
    return WIDE_BLOCK_N if n >= 8192 else NARROW_BLOCK_N


def _lanes(warps: int, columns: int) -> int:
    """The PDL prefetch's lanes: one per thread, or one per weight row of the program (value
    and gate halves) when those are more (``triton.next_power_of_2``: ``tl.arange``'s rule)."""
    return max(32 * warps, triton.next_power_of_2(2 * columns))


def split_k(tiles: int, k: int, sms: int) -> int:
    """Slices of K per column tile of the 2-16-row kernel (``SPLIT_K_MAX``): the largest power
    of two up to ``SPLIT_K_MAX`` whose grid stays within ``SPLIT_K_PROGRAMS_PER_SM`` programs
    per SM and whose slices hold at least ``BLOCK_K`` of K; 1 when the tiles alone fill that."""
    split = 1
    while (
        2 * split <= SPLIT_K_MAX
        and tiles * 2 * split <= SPLIT_K_PROGRAMS_PER_SM * sms
        and k >= 2 * split * BLOCK_K
    ):
        split *= 2
    return split


class _SplitWorkspace:
    """Per-device scratch of the split-K path: fp32 partials and one int32 counter per column
    tile, zero whenever no launch runs (each tile's last program resets its counter), so a
    launch needs no memset and a CUDA graph captures none. Every launch on the device reuses
    it: its partials and counters are touched only after the PDL wait, when the previous kernel
    of the stream has completed. (Two streams running split launches at the same time would
    share it; decoding runs one stream.) It grows outside CUDA-graph capture only: the decode
    runner's eager warm-up steps size it first."""

    def __init__(self) -> None:
        self._bufs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, device: torch.device, floats: int, tiles: int):
        ws, count = self._bufs.get(device, (None, None))
        if ws is not None and ws.numel() >= floats and count.numel() >= tiles:
            return ws, count
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "skinny_linear: the split-K workspace must exist before a CUDA graph is "
                "captured (run the step once eagerly first, as the decode runner does)"
            )
        if ws is not None:
            floats, tiles = max(floats, ws.numel()), max(tiles, count.numel())
        ws = torch.empty(floats, dtype=torch.float32, device=device)
        count = torch.zeros(tiles, dtype=torch.int32, device=device)
        self._bufs[device] = (ws, count)
        return ws, count


_WORKSPACE = _SplitWorkspace()


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the interpreter: an H100's 132); cached, since
    every eager 16-row call asks."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rows_aligned(weight: torch.Tensor) -> bool:
    """Whether every row of ``weight`` starts on 16 bytes and spans a multiple of 16 bytes
    (what the bulk L2 prefetch needs)."""
    row = weight.stride(0) * weight.element_size()
    width = weight.shape[1] * weight.element_size()
    return weight.data_ptr() % 16 == 0 and row % 16 == 0 and width % 16 == 0


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    glu: bool = False,
    prenorm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x @ weight.T (+ bias)`` for 2-D ``x`` (M <= 16, K) with a unit column stride and a
    contiguous ``weight`` (N, K); a fresh contiguous (M, N) result in x's dtype. With ``glu``
    the product's two halves ``[value | gate]`` (2F columns) leave as ``value * silu(gate)``
    (M, F): the SwiGLU MLP's first projection and activation in one launch, the (M, 2F)
    product never written.

    ``prenorm=(h, norm_weight, eps)``: ``x`` is a residual delta and the product is of
    ``rms_norm(h + x) * norm_weight`` (h like x, the norm weight (K,)); returns
    ``(h + x, product)``, the first fresh and contiguous."""
    m, k = x.shape
    n = weight.shape[0] // 2 if glu else weight.shape[0]
    if m > MAX_ROWS or weight.shape[1] != k or (glu and weight.shape[0] % 2):
        raise ValueError(
            f"skinny_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)}"
            + (" (glu needs an even number of rows)" if glu else "")
        )
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    interp = interpreting()
    pdl = use_pdl(x)
    prefetch = pdl and _rows_aligned(weight)
    b = weight if bias is None else bias
    if prenorm is None:
        hres, nw, s, eps = x, x, y, 0.0  # unused pointers
    else:
        hres, nw, eps = prenorm
        fits = hres.shape == x.shape and hres.dtype == x.dtype and hres.stride(-1) == 1
        if not fits or nw.shape != (k,) or nw.stride(0) != 1:
            raise ValueError(
                f"skinny_linear: prenorm h {tuple(hres.shape)} {hres.dtype} and norm weight "
                f"{tuple(nw.shape)} do not fit x {tuple(x.shape)} {x.dtype} (unit column strides)"
            )
        s = torch.empty(m, k, dtype=x.dtype, device=x.device)
    if m == 1:
        warps = 1 if interp else GEMV_WARPS
        preload = gemv_preload(k, glu, pdl)
        _gemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N),)](
            x, weight, b, y, hres, nw, s, n, k, weight.stride(0), float(eps),
            BLOCK_N=GEMV_BLOCK_N, BLOCK_K=GEMV_BLOCK_K, STAGES=1 if interp else GEMV_STAGES,
            HAS_BIAS=bias is not None, GLU=glu, USE_PDL=pdl, PREFETCH=prefetch and not preload,
            PRENORM=prenorm is not None, LANES=_lanes(warps, GEMV_BLOCK_N), PRELOAD=preload,
            KP=triton.next_power_of_2(k) if preload else 1, num_warps=warps,
            **launch_options(pdl),
        )  # fmt: skip
    else:
        bn, warps = block_n(n), 1 if interp else WARPS
        tiles = triton.cdiv(n, bn)
        split = 1 if glu or prenorm is not None else split_k(tiles, k, _sm_count(x.device))
        k_slice = triton.cdiv(triton.cdiv(k, split), BLOCK_K) * BLOCK_K
        split = triton.cdiv(k, k_slice)  # no empty slice (K 1,100 at 4: three of 512)
        ws, count = y, y  # unused pointers
        if split > 1:
            ws, count = _WORKSPACE.get(x.device, tiles * split * MAX_ROWS * bn, tiles)
        _skinny_linear_kernel[(tiles * split,)](
            x, weight, b, y, hres, nw, s, ws, count,
            m, n, k, x.stride(0), weight.stride(0), y.stride(0), hres.stride(0), float(eps),
            k_slice,
            BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=BLOCK_K, STAGES=1 if interp else STAGES,
            HAS_BIAS=bias is not None, FP32=x.dtype == torch.float32, GLU=glu, USE_PDL=pdl,
            PREFETCH=prefetch, PRENORM=prenorm is not None,
            LANES=_lanes(warps, bn), SPLIT=split, num_warps=warps, **launch_options(pdl),
        )  # fmt: skip
    return y if prenorm is None else (s, y)
