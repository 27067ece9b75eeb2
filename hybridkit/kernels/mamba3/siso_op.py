"""Mamba-3 SISO chunked scan on Triton, as ``torch.library`` custom ops with registered autograd.

Public entry point: :func:`mamba3_scan_triton` (same signature and results as the other scan
backends, plus an optional fused SiLU(z) gate). Two opaque custom ops carry the work:

* ``hybridkit::mamba3_siso_fwd`` returns the output, the end state in the relative frame (see
  :mod:`.triton_siso`), the sequence's total angle and, for the backward, the per-chunk start
  states (and the pre-gate output when gated): the only activations the backward re-reads;
* ``hybridkit::mamba3_siso_bwd`` returns the gradient of every input.

The conversion between the absolute-frame :class:`Mamba3State` and the kernels' relative frame
(rotate the initial state by ``-angle``, add the first token's trapezoid term of the previous
token; rotate the end state by the final angle, pick the last key / value) is plain torch on
(sequences, H, P, N) tensors in :func:`mamba3_scan_triton`, so autograd differentiates it and the
kernels never see the initial angle, key or value.

Both ops have fake (meta) implementations, so a model using them compiles with
``torch.compile(fullgraph=True)``; shapes depend only on static sizes (for packed batches the
per-chunk buffers have the static upper bound ``L // C + nseq`` slots). The backward reads
``ctx.saved_tensors`` exactly once, so non-reentrant activation checkpointing works.

Precision: ``fast=True`` (default for bf16/fp16 ``v``) uses bf16 tensor-core operands with fp32
accumulation, PTX approximations of tanh/sin/cos and bf16 per-chunk state buffers;
``fast=False`` is fp32 throughout with exact ``ieee`` dots (the float64-checked mode).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from hybridkit.kernels.mamba3 import triton_siso as K
from hybridkit.kernels.mamba3.reference import rotate_pairs, wrap_angle
from hybridkit.kernels.mamba3.state import Mamba3State

__all__ = ["mamba3_scan_triton", "supports"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_FLAGS = ["C", "P", "N2", "HAS_TRAP", "HAS_ANG", "VARLEN", "FAST"]


class _WarpTuned:
    """A Triton kernel whose launch configuration (warps, optional register cap) is chosen once
    per key by timing each candidate.

    ``triton.autotune`` does the same, but its wrapper costs ~75 us of host time per launch on
    the H100 machine (it rebuilds a dict of all ~50 arguments on every call), a quarter of the
    host time of a batch-1 forward, which is host-bound. Here a launch after the first one for a
    key costs a tuple and a dict lookup. The key is the constexpr flags named in ``keys`` plus
    the dtypes of the tensor arguments (never batch or length). Candidates are timed on the
    first launch for a key, never during CUDA graph capture (there the first candidate runs and
    nothing is cached). Only for kernels that write fresh outputs: each candidate runs several
    times.

    A candidate is a warp count or ``(warps, maxnreg)``. The cap matters because occupancy
    moves in steps: a 4-warp program at 169-255 registers per thread leaves room for two per
    SM, at <= 168 for three, so a cap that costs a few spilled bytes can win (Triton 3.6 sm_90
    compile: ``_fwd_out`` 253 registers, 52 spill bytes at 168).
    """

    def __init__(self, fn, keys: list[str], configs: tuple, timer=None):
        self.fn, self.keys = fn, tuple(keys)
        self.configs = tuple(c if isinstance(c, tuple) else (c, None) for c in configs)
        self.best: dict[tuple, dict] = {}
        self._timer = timer or _median_ms

    def __getitem__(self, grid):
        def launch(*args, **kw):
            key = tuple(kw[k] for k in self.keys)
            key += tuple(a.dtype for a in args if isinstance(a, Tensor))
            opts = self.best.get(key)
            if opts is None:
                opts = self._choose(grid, args, kw, key)
            return self.fn[grid](*args, **opts, **kw)

        return launch

    @staticmethod
    def _options(config: tuple) -> dict:
        warps, maxnreg = config
        opts = dict(num_warps=warps, num_stages=1)
        if maxnreg:
            opts["maxnreg"] = maxnreg
        return opts

    def _choose(self, grid, args, kw, key) -> dict:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return self._options(self.configs[0])
        times = {
            c: self._timer(lambda c=c: self.fn[grid](*args, **self._options(c), **kw))
            for c in self.configs
        }
        self.best[key] = self._options(min(times, key=times.get))
        return self.best[key]


def _median_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def _tuned(fn, keys: list[str], configs: tuple = (4, 8, 16)):
    """Tune the launch configuration on a GPU (:class:`_WarpTuned`; keys never include batch
    or length).

    Only for kernels that write fresh outputs (the element-wise passes update their buffer in
    place and must run exactly once). Read at import: ``HYBRIDKIT_MAMBA3_AUTOTUNE=0`` uses one
    fixed configuration (8 warps); ``HYBRIDKIT_MAMBA3_WARPS=8,16`` restricts the candidates'
    warp counts. The chunk kernels have no loop, so software pipelining (``num_stages``) has
    nothing to overlap: always 1.
    """
    if _INTERPRET or os.environ.get("HYBRIDKIT_MAMBA3_AUTOTUNE", "1") == "0":
        return fn  # launched with 8 warps (``_kw``)
    allowed = os.environ.get("HYBRIDKIT_MAMBA3_WARPS")
    if allowed:
        warps = allowed.split(",")
        configs = tuple(
            c for c in configs if str(c[0] if isinstance(c, tuple) else c) in warps
        ) or (8,)
    return _WarpTuned(fn, keys, configs)


def _env_warps(name: str, default: str) -> int:
    value = os.environ.get(name, default)
    if value not in ("1", "2", "4", "8", "16"):
        raise ValueError(f"{name}={value!r}: allowed values are 1, 2, 4, 8, 16 (warps)")
    return int(value)


# Register caps: 4 warps at <= 168 registers fit three programs per SM, at <= 128 four. On the
# H100 (Triton 3.6, the benchmark's first shape) ``_fwd_state`` compiles to 134 registers and
# to 128 without spills under the cap, ``_fwd_out`` to 248 (44 spill bytes at 168) and
# ``_bwd_dstate`` to 183 (none at 168); the tuner picked (4, 128), (4, 168) and (4, 168).
_FWD_STATE = _tuned(K._fwd_state_kernel, _FLAGS + ["NA"], (4, (4, 168), (4, 128), 8, 16))
_FWD_OUT = _tuned(
    K._fwd_out_kernel,
    ["C", "P", "N2", "NA", "HAS_ANG", "VARLEN", "FAST", "HAS_D", "HAS_Z", "SAVE_Y"],
    (4, (4, 168), 8),
)
_BWD_DSTATE = _tuned(
    K._bwd_dstate_kernel,
    ["C", "P", "N2", "NA", "HAS_TRAP", "HAS_ANG", "HAS_Z", "VARLEN", "FAST"],
    (4, (4, 168), 8, 16),
)
# Backward chunk kernels: a fixed warp count (no autotuning), 4 unless
# ``HYBRIDKIT_MAMBA3_BWD_WARPS`` says otherwise (read at import). On the H100 at
# (8, 4096, 32, 64, 128), 4 warps ran q / k / x in 1.22 / 1.91 / 0.86 ms against 2.08 / 2.13 /
# 1.83 at 8: both fill the 255 registers, but two 4-warp programs per SM overlap each other's
# latency. 16 warps caps registers at 128 per thread and spills more.
_BWD_WARPS = _env_warps("HYBRIDKIT_MAMBA3_BWD_WARPS", "4")


def _env_maxnreg(name: str) -> int | None:
    value = os.environ.get(name, "")
    if value in ("", "0"):
        return None
    if not value.isdigit() or not 24 <= int(value) <= 255:
        raise ValueError(f"{name}={value!r}: allowed values are 0 (no cap) or 24..255 (registers)")
    return int(value)


# Experimental register cap for the backward chunk kernels (``maxnreg``): at 255 registers two
# 4-warp programs fit per SM; at <= 168 three do, at the price of spills. Measured on the H100
# at (8, 4096, 32, 64, 128): 168 made _bwd_q / _bwd_k / _bwd_x 1.7x / 1.6x / 1.6x slower (0.5-1.1
# KB of spill stores per thread), so it stays unset by default; kept for experiments.
_BWD_MAXNREG = _env_maxnreg("HYBRIDKIT_MAMBA3_BWD_MAXNREG")
_BWD_Q, _BWD_K, _BWD_X = K._bwd_q_kernel, K._bwd_k_kernel, K._bwd_x_kernel


def supports(q: Tensor, v: Tensor, mimo_x: Tensor | None, pairing: str) -> bool:
    """Whether the Triton SISO path handles this call (else use the chunked torch path)."""
    if q.dim() != 5 or q.shape[2] != 1 or mimo_x is not None or pairing != "interleaved":
        return False
    n, p = q.shape[-1], v.shape[-1]
    pow2 = lambda x: x >= 1 and (x & (x - 1)) == 0  # noqa: E731
    dtypes = {q.dtype, v.dtype}
    lo = 32 if q.is_cuda else 4  # tl.dot needs every dimension >= 16 on a GPU (N/2, P)
    return n >= lo and pow2(n) and pow2(p) and p >= lo // 2 and torch.float64 not in dtypes


# ----------------------------------------------------------------------------- planning


class _Plan:
    """Chunk slots of a call: ``B * ceil(L / C)`` in order, or per packed sequence."""

    def __init__(self, B: int, L: int, C: int, cu: Tensor | None, device):
        self.varlen = cu is not None
        self.chtab = self.seqtab = None
        if cu is None:
            self.nseq = B
            self.NC = -(-L // C)
            self.nchunks = B * self.NC
            return
        bounds = [int(b) for b in cu.tolist()]
        self.lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        self.nseq, self.NC = len(self.lengths), 1
        chs, seqs = [], []
        for i, (s0, n) in enumerate(zip(bounds[:-1], self.lengths, strict=True)):
            nc = -(-n // C)
            seqs.append([len(chs), nc])
            chs += [[i, s0 + c * C, min(s0 + (c + 1) * C, s0 + n), s0 + n] for c in range(nc)]
        self.nchunks = len(chs)

        def tab(rows, width):
            return torch.tensor(rows or [[0] * width], dtype=torch.int64).to(device)

        self.chtab, self.seqtab = tab(chs, 4), tab(seqs, 2)

    def tiles(self, H: int, N: int, P: int, device) -> int:
        """Row tiles of the element-wise passes: enough programs to fill the GPU, each still
        moving >= 512 state elements per chunk."""
        sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if (device.type == "cuda")
            else 2
        )
        nt = 1
        while nt < P and self.nseq * H * nt < 4 * sms and (P // (2 * nt)) * N >= 512:
            nt *= 2
        return nt


def _slots(B: int, L: int, C: int, nseq: int, varlen: bool) -> int:
    return (L // C + nseq) if varlen else B * (-(-L // C))


def _strides(t: Tensor | None, dims=(0, 1, 2)) -> tuple[int, ...]:
    return (0,) * len(dims) if t is None else tuple(t.stride(d) for d in dims)


def _bwd_warps() -> int:
    return 1 if _INTERPRET else _BWD_WARPS


def _bwd_kw(fn, **kw):
    """Launch options of the backward chunk kernels: fixed warps, optional register cap."""
    if _BWD_MAXNREG and not _INTERPRET:
        kw["maxnreg"] = _BWD_MAXNREG
    return _kw(fn, num_warps=_bwd_warps(), **kw)


def _kw(fn, **kw):
    if not isinstance(fn, _WarpTuned):
        kw.setdefault("num_warps", 8 if not _INTERPRET else 1)
        kw.setdefault("num_stages", 1)
    return kw


# ----------------------------------------------------------------------------- forward


def _angles_tokens_last(angles: Tensor | None) -> tuple[Tensor | None, tuple[int, int, int]]:
    """The (B, L, H, S) angles with tokens contiguous, and their (batch, pair, head) strides.

    The kernels scan the angles over the tokens of a chunk; Triton scans cheaply only along a
    tile's contiguous axis. Angles shared by all heads (stride 0, as the layer passes them)
    become one (B, S, L) copy (L * S elements per sequence, tiny next to q / k / v)."""
    if angles is None:
        return None, (0, 0, 0)
    if angles.shape[2] == 1 or angles.stride(2) == 0:
        t = angles[:, :, 0].transpose(1, 2).contiguous()  # (B, S, L)
        return t, (t.stride(0), t.stride(1), 0)
    t = angles.permute(0, 2, 3, 1).contiguous()  # (B, H, S, L)
    return t, (t.stride(0), t.stride(2), t.stride(1))


def _angle_width(N2: int, S: int) -> int:
    """NA, the width of the kernels' angle tiles: the rotated pairs rounded up to N2 / 2 or N2
    (rope_fraction 0.5 rotates half the pairs; the angle pipeline then skips the other half)."""
    return N2 // 2 if N2 >= 2 and S <= N2 // 2 else N2


def _fwd_impl(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, s0, cu, C, fast, store):
    B, L, _, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    N2, S = N // 2, (angles.shape[-1] if angles is not None else 0)
    dev, f32 = q.device, torch.float32
    plan = _Plan(B, L, C, cu, dev)
    nseq = plan.nseq
    st_dtype = torch.bfloat16 if fast else f32
    out = torch.empty(B, L, H, P, dtype=v.dtype, device=dev)
    # ``_fwd_pass`` writes every sequence's total angle; with no chunk it stays zero
    tot = (torch.empty if plan.nchunks > 0 else torch.zeros)(nseq, H, S, dtype=f32, device=dev)
    st = torch.empty(_slots(B, L, C, nseq, plan.varlen), H, P, N, dtype=st_dtype, device=dev)
    ypre = (
        torch.empty(B, L, H, P, dtype=v.dtype, device=dev)
        if (store and z is not None)
        else (torch.empty(0, dtype=v.dtype, device=dev))
    )
    if plan.nchunks == 0:
        send = s0.clone() if s0 is not None else torch.zeros(nseq, H, P, N, dtype=f32, device=dev)
        return out, tot, send, st, ypre
    send = torch.empty(nseq, H, P, N, dtype=f32, device=dev)
    ca = torch.empty(plan.nchunks, H, dtype=f32, device=dev)
    com = torch.empty(plan.nchunks, H, max(S, 1), dtype=f32, device=dev)
    dummy = out
    opt = lambda t: dummy if t is None else t  # noqa: E731
    chtab = plan.chtab if plan.varlen else dummy
    angt, gstr = _angles_tokens_last(angles)
    gates = (*_strides(adt), *_strides(dt), *_strides(trap), *gstr)
    flags = dict(C=C, P=P, N2=N2, HAS_TRAP=trap is not None, HAS_ANG=angles is not None)
    flags.update(VARLEN=plan.varlen, FAST=fast, NA=_angle_width(N2, S))
    grid = (plan.nchunks * H,)
    # per-token gamma, kappa and in-chunk cumsum of adt, written by ``_fwd_state`` for
    # ``_fwd_out`` (3 x 4 B per token and head)
    gk = torch.empty(B, H, 3, L, dtype=f32, device=dev)
    _FWD_STATE[grid](
        k, v, adt, dt, opt(trap), k_bias, opt(angt), chtab, st, ca, com, gk,
        *_strides(k, (0, 1, 3)), *_strides(v), *gates,
        L, H, H // G, S, plan.NC,
        **_kw(_FWD_STATE, **flags),
    )  # fmt: skip
    nt = plan.tiles(H, N, P, dev)
    K._fwd_pass_kernel[(nseq * H * nt,)](
        st, ca, com, opt(s0), send, tot, plan.seqtab if plan.varlen else dummy,
        H, S, plan.NC, nt,
        P=P, N2=N2, PB=P // nt, HAS_INIT=s0 is not None, HAS_ANG=angles is not None,
        VARLEN=plan.varlen, num_warps=4,
    )  # fmt: skip
    flags.pop("HAS_TRAP")  # the trapezoid is inside the saved gates
    _FWD_OUT[grid](
        q, k, v, gk, dt, q_bias, k_bias, opt(angt), opt(D), opt(z), out,
        ypre if ypre.numel() else dummy, chtab, st,
        *_strides(q, (0, 1, 3)), *_strides(k, (0, 1, 3)), *_strides(v), *_strides(dt), *gstr,
        *_strides(z), *_strides(out),
        L, H, H // G, S, plan.NC,
        **_kw(_FWD_OUT, HAS_D=D is not None, HAS_Z=z is not None, SAVE_Y=ypre.numel() > 0,
              **flags),
    )  # fmt: skip
    return out, tot, send, st, ypre


# ----------------------------------------------------------------------------- backward


def _bwd_impl(
    dout, dtot, dsend, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, s0, cu, st, ypre,
    C, fast,
):  # fmt: skip
    B, L, _, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    N2, S = N // 2, (angles.shape[-1] if angles is not None else 0)
    dev, f32 = q.device, torch.float32
    plan = _Plan(B, L, C, cu, dev)
    nseq = plan.nseq
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    # unused end-state outputs (training) arrive as None: the kernels then read no gradient
    # for them (``HAS_DSEND`` / ``HAS_DTOT``) instead of zero-filled buffers
    if dsend is not None:
        dsend = dsend.float().contiguous()
    elif plan.nchunks == 0:
        dsend = torch.zeros(nseq, H, P, N, dtype=f32, device=dev)
    dtot = dtot.float().contiguous() if dtot is not None else None
    # packed batches may leave tokens outside every sequence: zero-fill only there
    new = torch.zeros if plan.varlen else torch.empty
    dh_dtype = torch.bfloat16 if fast else f32  # per-head dq / dk before the group sum
    dqh = new(B, L, H, N, dtype=dh_dtype, device=dev)
    dkh = new(B, L, H, N, dtype=dh_dtype, device=dev)
    dx = new(B, L, H, P, dtype=v.dtype, device=dev)
    dz = new(B, L, H, P, dtype=z.dtype, device=dev) if z is not None else None
    dadt, dkap, dgam = (new(B, H, L, dtype=f32, device=dev) for _ in range(3))
    # written by ``_bwd_gates`` (zeros where there is no chunk)
    gnew = new if plan.nchunks > 0 else torch.zeros
    ddt = gnew(B, H, L, dtype=dt.dtype, device=dev)
    dtrap = gnew(B, H, L, dtype=trap.dtype, device=dev) if trap is not None else None
    dang = new(B, L, H, S, dtype=angles.dtype, device=dev) if angles is not None else None
    # per-(chunk, head) partial sums: every slot is written when there is a chunk
    nsl = max(plan.nchunks, 1)
    part = torch.empty if plan.nchunks > 0 else torch.zeros
    dqbp = part(nsl, H, N, dtype=f32, device=dev)
    dkbp = part(nsl, H, N, dtype=f32, device=dev)
    ddp = part(nsl, H, dtype=f32, device=dev)
    # the reverse pass writes the initial-state gradient; with no chunk it is d(end state)
    ds0 = torch.empty(nseq, H, P, N, dtype=f32, device=dev) if plan.nchunks > 0 else dsend.clone()
    if plan.nchunks > 0:
        dummy = dqh
        opt = lambda t: dummy if t is None else t  # noqa: E731
        chtab = plan.chtab if plan.varlen else dummy
        seqtab = plan.seqtab if plan.varlen else dummy
        dg = torch.empty(plan.nchunks, H, P, N, dtype=st.dtype, device=dev)
        ca = torch.empty(plan.nchunks, H, dtype=f32, device=dev)
        com = torch.empty(plan.nchunks, H, max(S, 1), dtype=f32, device=dev)
        dy = (
            torch.empty(B, L, H, P, dtype=v.dtype if fast else f32, device=dev)
            if (z is not None)
            else dout
        )
        angt, gstr = _angles_tokens_last(angles)
        na = _angle_width(N2, S)
        grid = (plan.nchunks * H,)
        # gamma, kappa, in-chunk cumsum of adt: written by ``_bwd_dstate``, loaded by q / k / x
        gk = torch.empty(B, H, 3, L, dtype=f32, device=dev)
        # cos / sin of the in-chunk angles, written once by ``_bwd_dstate`` and loaded by the
        # q / k / x kernels (fp16 in fast mode: 2^-11 next to the bf16 operands they rotate)
        csn = (
            torch.empty(B, H, 2 * S, L, dtype=torch.float16 if fast else f32, device=dev)
            if angles is not None
            else dummy
        )
        _BWD_DSTATE[grid](
            q, adt, dt, opt(trap), q_bias, opt(angt), opt(z), ypre if ypre.numel() else dummy,
            dout, chtab, dy, opt(dz), dg, ca, com, csn, gk,
            *_strides(q, (0, 1, 3)), *_strides(adt), *_strides(dt), *_strides(trap), *gstr,
            *_strides(z), *_strides(dout),
            L, H, H // G, S, plan.NC,
            **_kw(_BWD_DSTATE, C=C, P=P, N2=N2, NA=na,
                  HAS_TRAP=trap is not None, HAS_ANG=angles is not None, HAS_Z=z is not None,
                  VARLEN=plan.varlen, FAST=fast),
        )  # fmt: skip
        nt = plan.tiles(H, N, P, dev)
        K._bwd_pass_kernel[(nseq * H * nt,)](
            dg, ca, com, opt(dsend), ds0, seqtab, H, S, plan.NC, nt,
            P=P, N2=N2, PB=P // nt, HAS_ANG=angles is not None, HAS_DSEND=dsend is not None,
            VARLEN=plan.varlen, num_warps=4,
        )  # fmt: skip
        gin, du = torch.empty(B, H, L, dtype=f32, device=dev), torch.empty_like(dadt)
        common = (
            *_strides(q, (0, 1, 3)), *_strides(k, (0, 1, 3)), *_strides(v), *_strides(dy),
            L, H, H // G, S, plan.NC,
        )  # fmt: skip
        flags = dict(C=C, P=P, N2=N2, HAS_ANG=angles is not None, HAS_D=D is not None)
        flags.update(VARLEN=plan.varlen, FAST=fast, NA=na)
        inputs = (q, k, v, gk, ca, q_bias, k_bias, csn)
        # per-token d theta terms, tokens last (scanned by ``_bwd_gates``)
        rq = torch.empty(B, H, S, L, dtype=f32, device=dev) if angles is not None else dummy
        doms = torch.empty(plan.nchunks, H, max(S, 1), dtype=f32, device=dev)
        _BWD_Q[grid](
            *inputs, dy, chtab, st, dqh, dqbp, rq, gin,
            *common, **_bwd_kw(_BWD_Q, **flags),
        )  # fmt: skip
        _BWD_K[grid](
            *inputs, dy, chtab, dg, opt(dtot), rq, doms, dkh, dkbp, du,
            *common, **_bwd_kw(_BWD_K, HAS_DTOT=dtot is not None, **flags),
        )  # fmt: skip
        _BWD_X[grid](
            *inputs, opt(D), dy, chtab, dg, gin, du, st, doms, dx, dadt, dkap, dgam, ddp,
            *common, **_bwd_kw(_BWD_X, **flags),
        )  # fmt: skip
        K._bwd_gates_kernel[grid](
            opt(angt), dt, opt(trap), rq, doms, chtab, seqtab, dgam, dkap, opt(dang), ddt,
            opt(dtrap), *gstr, *_strides(dt), *_strides(trap), L, H, S, plan.NC,
            C=C, NA=na, HAS_ANG=angles is not None,
            HAS_TRAP=trap is not None,
            VARLEN=plan.varlen, FAST=fast, num_warps=4 if not _INTERPRET else 1,
        )  # fmt: skip
    hpg = H // G
    # sums over the group's heads accumulate in fp32 also for bf16 buffers (torch's reduction
    # accumulator), so the result is rounded once, as with an fp32 sum and a cast
    dq = dqh.view(B, L, G, hpg, N).sum(3).unsqueeze(2).to(q.dtype)
    dk = dkh.view(B, L, G, hpg, N).sum(3).unsqueeze(2).to(k.dtype)
    grads = [
        dq,
        dk,
        dx,
        dadt.to(adt.dtype),
        ddt,
        dtrap,
        dqbp.sum(0).view(H, 1, N).to(q_bias.dtype),
        dkbp.sum(0).view(H, 1, N).to(k_bias.dtype),
        dang,
        ddp.sum(0).to(D.dtype) if D is not None else None,
        dz,
        ds0 if s0 is not None else None,
    ]
    return [torch.empty(0, device=dev) if g_ is None else g_ for g_ in grads]


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("hybridkit::mamba3_siso_fwd", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adt: Tensor,
    dt: Tensor,
    trap: Tensor | None,
    q_bias: Tensor,
    k_bias: Tensor,
    angles: Tensor | None,
    D: Tensor | None,
    z: Tensor | None,
    init_state: Tensor | None,
    cu_seqlens: Tensor | None,
    chunk_size: int,
    fast: bool,
    store: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fwd_impl(
        q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, init_state, cu_seqlens,
        chunk_size, fast, store,
    )  # fmt: skip


@_fwd_op.register_fake
def _(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, init_state, cu_seqlens, chunk_size,
      fast, store):  # fmt: skip
    B, L, _, _, N = q.shape
    H, P = v.shape[2], v.shape[3]
    varlen = cu_seqlens is not None
    nseq = cu_seqlens.shape[0] - 1 if varlen else B
    S = angles.shape[-1] if angles is not None else 0
    f32 = torch.float32
    new = q.new_empty
    slots = _slots(B, L, chunk_size, nseq, varlen)
    return (
        new(B, L, H, P, dtype=v.dtype),
        new(nseq, H, S, dtype=f32),
        new(nseq, H, P, N, dtype=f32),
        new(slots, H, P, N, dtype=torch.bfloat16 if fast else f32),
        new(B, L, H, P, dtype=v.dtype) if (store and z is not None) else new(0, dtype=v.dtype),
    )


@torch.library.custom_op("hybridkit::mamba3_siso_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor,
    d_tot: Tensor | None,
    d_send: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adt: Tensor,
    dt: Tensor,
    trap: Tensor | None,
    q_bias: Tensor,
    k_bias: Tensor,
    angles: Tensor | None,
    D: Tensor | None,
    z: Tensor | None,
    init_state: Tensor | None,
    cu_seqlens: Tensor | None,
    states: Tensor,
    ypre: Tensor,
    chunk_size: int,
    fast: bool,
) -> list[Tensor]:
    return _bwd_impl(
        dout, d_tot, d_send, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, init_state,
        cu_seqlens, states, ypre, chunk_size, fast,
    )  # fmt: skip


@_bwd_op.register_fake
def _(dout, d_tot, d_send, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, init_state,
      cu_seqlens, states, ypre, chunk_size, fast):  # fmt: skip
    like = lambda t: torch.empty_like(t) if t is not None else q.new_empty(0)  # noqa: E731
    return [like(t) for t in (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, init_state)]


_N_TENSOR_IN = 13  # q ... cu_seqlens


def _setup_context(ctx, inputs, output):
    tensors = list(inputs[:_N_TENSOR_IN])
    ctx.present = [t is not None for t in tensors]
    ctx.chunk_size, ctx.fast = inputs[13], inputs[14]
    ctx.save_for_backward(*tensors, output[3], output[4])
    # unused outputs get None, not zeros: autograd would otherwise fill a zero gradient for the
    # saved chunk states (268 MB at B 8, L 4096, H 32; 81 us on the H100) every step
    ctx.set_materialize_grads(False)


def _run_backward(ctx, dy, d_tot, d_send, bwd):
    saved = ctx.saved_tensors  # read exactly once (activation checkpointing)
    if dy is None:  # only the final state was used
        v = saved[2]
        dy = v.new_zeros(v.shape)
    grads = bwd(dy, d_tot, d_send, *saved, ctx.chunk_size, ctx.fast)
    out = [g if present else None for g, present in zip(grads, ctx.present[:12], strict=True)]
    return (*out, None, None, None, None)


def _backward(ctx, dy, d_tot, d_send, _d_states, _d_ypre):
    return _run_backward(ctx, dy, d_tot, d_send, torch.ops.hybridkit.mamba3_siso_bwd)


torch.library.register_autograd(
    "hybridkit::mamba3_siso_fwd", _backward, setup_context=_setup_context
)


class _ScanFunction(torch.autograd.Function):
    """The same forward / backward as the ops, without the dispatcher: for eager mode only.

    Through the ops every call also pays the dispatcher, the autograd wrapper's argument
    filling (``fill_defaults`` rebuilds the schema's argument list per argument, ~0.1-0.25 ms for
    16 arguments) and the Dynamo-disable guard; at batch 1 the forward + backward is host-bound,
    so that time is the step time. ``torch.compile`` must see the ops instead (their fake
    implementations), so :func:`mamba3_scan_triton` uses this class only when not compiling."""

    @staticmethod
    def forward(ctx, *args):
        out = _fwd_impl(*args)
        _setup_context(ctx, args, out)
        ctx.mark_non_differentiable(out[3], out[4])
        return out

    @staticmethod
    def backward(ctx, dy, d_tot, d_send, _d_states, _d_ypre):
        return _run_backward(ctx, dy, d_tot, d_send, _bwd_impl)


# ----------------------------------------------------------------------------- frames


def _deinterleave(s: Tensor) -> Tensor:
    """(..., N) with pairs (2j, 2j+1) -> (..., N) as [even columns, odd columns]."""
    return s.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def _interleave(s: Tensor) -> Tensor:
    return s.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)


def _first_last(t: Tensor, cu: Tensor | None) -> tuple[Tensor, Tensor]:
    """Values of ``t`` (B, L, ...) at the first and last token of every sequence (clamped;
    zeros when there are no tokens at all)."""
    if t.shape[1] == 0:
        zero = t.new_zeros(t.shape[0] if cu is None else cu.shape[0] - 1, *t.shape[2:])
        return zero, zero
    if cu is None:
        return t[:, 0], t[:, -1]
    hi = max(t.shape[1] - 1, 0)
    return t[0, cu[:-1].clamp(max=hi)], t[0, (cu[1:] - 1).clamp(min=0, max=hi)]


def _c(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- public API


def mamba3_scan_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adt: Tensor,
    dt: Tensor,
    trap: Tensor | None,
    q_bias: Tensor,
    k_bias: Tensor,
    angles: Tensor | None,
    D: Tensor | None,
    mimo_x: Tensor | None = None,
    *,
    pairing: str = "interleaved",
    initial_state: Mamba3State | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    z: Tensor | None = None,
    fast: bool | None = None,
    return_state: bool = True,
) -> tuple[Tensor, Mamba3State | None]:
    """Mamba-3 SISO scan on Triton; shapes and semantics as the reference scans (R must be 1).

    Returns y (B, L, 1, H, P) in ``v``'s dtype (times ``silu(z)`` when ``z`` (B, L, H, P) is
    given) and the final :class:`Mamba3State` (angle, ssm and k in float32, v in ``v``'s dtype),
    or None with ``return_state=False``: converting the end state to the absolute frame is ~20
    small torch ops, most of the host time of a call (training never reads the state).
    ``fast`` (default: ``v`` is bf16/fp16) selects bf16 tensor-core operands and approximate
    transcendentals.
    """
    if not supports(q, v, mimo_x, pairing):
        raise ValueError(
            "mamba3_scan_triton: needs R = 1, interleaved pairing, no mimo_x, "
            "power-of-two N and P and no float64 inputs"
        )
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"mamba3_scan_triton: chunk_size must be 16/32/64/128, got {chunk_size}")
    B, L, _, G, N = q.shape
    H = v.shape[2]
    if H % G != 0:
        raise ValueError(f"mamba3 scan: nheads ({H}) must be a multiple of ngroups ({G})")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"mamba3 scan: cu_seqlens requires batch size 1, got {B}")
    if angles is not None and 2 * angles.shape[-1] > N:
        raise ValueError("mamba3 scan: interleaved pairing needs 2*S <= N")
    if fast is None:
        fast = v.dtype in (torch.bfloat16, torch.float16)
    f32 = torch.float32
    cu = None if cu_seqlens is None else cu_seqlens.to(device=q.device, dtype=torch.int64)
    nseq = B if cu is None else cu.shape[0] - 1
    # only packed or zero-length calls can hold empty sequences (which keep their state)
    empty = None
    if cu is not None or L == 0:
        lengths = cu[1:] - cu[:-1] if cu is not None else torch.zeros(B, device=q.device)
        empty = (lengths == 0).view(-1, 1, 1)  # (nseq, 1, 1)
    st = initial_state
    rotate = angles is not None

    # initial state -> relative frame, with the first token's trapezoid term of the previous one
    s0 = None
    if st is not None:
        dt0, _ = _first_last(dt.transpose(1, 2), cu)  # (nseq, H)
        lam0 = (
            torch.sigmoid(_first_last(trap.transpose(1, 2), cu)[0].float())
            if trap is not None
            else 1.0
        )
        eta0 = (1.0 - lam0) * dt0.float()
        if empty is not None:
            eta0 = eta0.masked_fill(empty[:, :, 0], 0.0)
        h0 = st.ssm.float() + eta0[..., None, None] * (
            st.v.float()[..., :, None] * st.k[:, 0].float()[..., None, :]
        )
        if rotate:
            h0 = rotate_pairs(h0, -st.angle.float()[:, :, None, :], "interleaved")
        s0 = _deinterleave(h0).contiguous()

    tensors = [q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, s0]
    store = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    op = (
        torch.ops.hybridkit.mamba3_siso_fwd
        if torch.compiler.is_compiling()
        else _ScanFunction.apply
    )
    y, tot, send, _, _ = op(
        _c(q),
        _c(k),
        _c(v),
        adt,
        dt,
        trap,
        q_bias.to(f32).contiguous(),
        k_bias.to(f32).contiguous(),
        _c(angles),
        None if D is None else D.contiguous(),
        _c(z),
        s0,
        cu,
        chunk_size,
        bool(fast),
        bool(store),
    )

    if not return_state:
        return y.unsqueeze(2), None
    # end state -> absolute frame; last key (rotated) and value of every sequence
    ia = st.angle.float() if st is not None else None
    if rotate:
        angle = wrap_angle(tot if ia is None else ia + tot)
    else:
        angle = ia if ia is not None else torch.zeros(nseq, H, 0, dtype=f32, device=q.device)
    ssm = _interleave(send)
    kl = _first_last(k[:, :, 0], cu)[1].float().repeat_interleave(H // G, dim=1)
    kl = kl + k_bias[:, 0].float()
    if rotate:
        ssm = rotate_pairs(ssm, angle[:, :, None, :], "interleaved")
        kl = rotate_pairs(kl, angle, "interleaved")
    vl = _first_last(v, cu)[1]
    if empty is not None and st is not None:
        kl = torch.where(empty, st.k[:, 0].float(), kl)
        vl = torch.where(empty, st.v.to(v.dtype), vl)
        ssm = torch.where(empty[..., None], st.ssm.float(), ssm)
    elif empty is not None:
        kl = kl.masked_fill(empty, 0.0)
        vl = vl.masked_fill(empty, 0.0)
    return y.unsqueeze(2), Mamba3State(angle, ssm, kl.unsqueeze(1), vl)
