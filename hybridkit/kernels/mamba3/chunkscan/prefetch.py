"""L2 prefetch for the scan's chunk kernels (kernel settings ``scan_prefetch`` and
``scan_prefetch_ahead``).

Why: the backward chunk kernels hold 255 registers, so only two 4-warp programs share an SM,
and their top stall is waiting on global loads (docs/kernels.md, "What limits it"). A program
loads in rounds: the gates, then q / k / x / dy, then its state tiles after the products that
need them; a round that misses L2 waits a DRAM latency with few other warps to switch to. A
prefetch asks L2 for a 128-byte line and holds no register and nothing waits for it, so a
program can ask, before its first load, for every line it will read later (``ahead`` 0: its
later rounds then hit L2), or for the lines of the program ``ahead`` places later in the grid,
which runs about that many programs later and then finds even its first round in L2.

A prefetch moves data into L2 and nothing else: results are bitwise those without it. Only on
a GPU (PTX ``prefetch.global.L2``); the interpreter runs with it off.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hybridkit.kernels.mamba3.chunkscan.common import _chunk, _gate_offsets, _rows, _tokens

# lanes per span: lanes at elements 0, E, 2E and the last one (E per 128-byte line) touch every
# line of a span of up to 3E + 1 elements whatever its alignment (a bf16 x / dy row of P <= 192,
# a chunk's gates, cos / sin or per-row buffer at C x R <= 96); of a longer span, its first four
# lines only (a hint: the rest loads as before)
SPAN_LANES = tl.constexpr(4)


@triton.jit
def _l2(ptrs, active):
    """``prefetch.global.L2`` of the line holding each address of ``ptrs`` where ``active``
    (a predicate per lane: an inactive lane issues nothing)."""
    tl.inline_asm_elementwise(
        "{\n\t.reg .pred p;\n\tsetp.ne.u32 p, $2, 0;\n\t@p prefetch.global.L2 [$1];"
        "\n\tmov.u32 $0, 0;\n\t}",
        "=r,l,r",
        [ptrs, active.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _spans(starts, active, width):
    """Every line of the ``width`` contiguous elements from each pointer of the 1-D ``starts``
    (``width`` >= 1): lanes at the line-sized steps 0, E, 2E and the last element
    (``SPAN_LANES``), so nothing past the span is touched."""
    per_line: tl.constexpr = 1024 // starts.dtype.element_ty.primitive_bitwidth
    i = tl.arange(0, SPAN_LANES)
    offs = tl.minimum(i * per_line, width - 1)
    lane_on = i * per_line < width + per_line
    _l2(starts[:, None] + offs[None, :], active[:, None] & lane_on[None, :])


@triton.jit
def _tile(base, active, ELEMS: tl.constexpr):
    """Every line of a contiguous tile of ``ELEMS`` elements (a P x N chunk state)."""
    per_line: tl.constexpr = 1024 // base.dtype.element_ty.primitive_bitwidth
    lines = tl.arange(0, ELEMS // per_line)
    _l2(base + lines * per_line, (lines * 0 + active.to(tl.int32)) != 0)


@triton.jit
def prefetch_chunk(
    AHEAD, H, CHTAB, L, NC, V, s_vb, s_vl, s_vh, DY, s_yb, s_yl, s_yr, s_yh, GATES, CSN, NANG,
    S1, S2, ROW1, ROW2, C: tl.constexpr, P: tl.constexpr, N2: tl.constexpr, NA: tl.constexpr,
    R: tl.constexpr, VARLEN: tl.constexpr, HAS_DY: tl.constexpr, HAS_CSN: tl.constexpr,
    HAS_S1: tl.constexpr, HAS_S2: tl.constexpr, HAS_ROWS: tl.constexpr,
):  # fmt: skip
    """Prefetch what the (chunk, head) program ``AHEAD`` places after this one reads (a
    grid of chunk slots x heads, heads fastest): its x rows, its dy rows (``HAS_DY``), its
    saved gates, its cos / sin (``HAS_CSN``), the chunk states ``S1`` / ``S2`` of its slot and
    its per-row buffers ``ROW1`` / ``ROW2`` ((B, H, L * R) float32, ``HAS_ROWS``). Past the
    grid's end nothing is asked for."""
    t = tl.program_id(0) + AHEAD
    ok = t < tl.num_programs(0)
    t = tl.where(ok, t, tl.program_id(0))  # addresses stay those of a real program
    h = (t % H).to(tl.int64)
    gc = (t // H).to(tl.int64)
    bat, _seq, tok_start, tok_end, _end = _chunk(gc, CHTAB, L, NC, C, VARLEN)
    width = tl.maximum(tok_end - tok_start, 1)
    tok, mtok = _tokens(tok_start, tok_end, C)
    _spans(V + bat * s_vb + tok * s_vl + h * s_vh, mtok & ok, P)
    if HAS_DY:
        tt, rr, mc = _rows(tok_start, tok_end, C, R)
        _spans(DY + bat * s_yb + tt * s_yl + rr * s_yr + h * s_yh, mc & ok, P)
    planes = tl.arange(0, 4)  # gamma, kappa, cs: (B, H, 3, L) float32
    _spans(GATES + _gate_offsets(bat, h, H, L, tok_start) + planes * L, (planes < 3) & ok, width)
    if HAS_CSN:  # cos / sin, (B, H, 2, S, L): the S rows of each, NA lanes per half
        lane = tl.arange(0, 2 * NA)
        pair = lane % NA
        row = (lane // NA) * NANG + pair
        o = ((bat * H + h) * (2 * NANG) + row) * L + tok_start
        _spans(CSN + o, (pair < NANG) & ok, width)
    if HAS_S1:
        _tile(S1 + (gc * H + h) * (P * 2 * N2), ok, P * 2 * N2)
    if HAS_S2:
        _tile(S2 + (gc * H + h) * (P * 2 * N2), ok, P * 2 * N2)
    if HAS_ROWS:
        both = tl.arange(0, 2)
        row0 = (bat * H + h) * (L * R) + tok_start * R
        _spans(tl.where(both == 0, ROW1, ROW2) + row0, (both < 2) & ok, width * R)
