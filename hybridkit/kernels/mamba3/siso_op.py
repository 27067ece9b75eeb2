"""Mamba-3 SISO chunked scan on Triton, as ``torch.library`` custom ops with registered autograd.

Public entry point: :func:`mamba3_scan_triton` (same signature and results as the other scan
backends, plus an optional fused SiLU(z) gate). Two opaque custom ops carry the work:

* ``hybridkit::mamba3_siso_fwd`` returns the output, the final state and, when a backward will
  follow, the per-chunk start states and angles (the only activations the backward re-reads);
* ``hybridkit::mamba3_siso_bwd`` returns the gradient of every input.

Both have fake (meta) implementations, so a model using them compiles with
``torch.compile(fullgraph=True)``; shapes depend only on static sizes (for packed batches the
per-chunk buffers have the static upper bound ``L // C + nseq`` slots). The backward reads
``ctx.saved_tensors`` exactly once, so non-reentrant activation checkpointing works.

Precision: ``fast=True`` (default for bf16/fp16 ``v``) uses bf16 tensor-core operands with fp32
accumulation and PTX approximations of tanh/sin/cos, and saves the per-chunk states in bf16;
``fast=False`` is fp32 throughout with exact ``ieee`` dots (the float64-checked mode).
"""

from __future__ import annotations

import os

import torch
import triton
from torch import Tensor

from hybridkit.kernels.mamba3 import triton_siso as K
from hybridkit.kernels.mamba3.state import Mamba3State

__all__ = ["mamba3_scan_triton", "supports"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_KEYS = ["C", "P", "N2", "LOCAL", "HAS_TRAP", "HAS_ANG", "HAS_D", "HAS_Z", "HAS_INIT", "VARLEN"]


def _tuned(fn, keys: list[str], warps: tuple[int, ...]):
    """Autotune over warps x stages on a GPU (keys never include batch or length).

    ``HYBRIDKIT_MAMBA3_AUTOTUNE=0`` (read at import) uses one fixed config instead (tests).
    """
    if _INTERPRET or os.environ.get("HYBRIDKIT_MAMBA3_AUTOTUNE", "1") == "0":
        return fn
    # num_stages stays 1: on the H100 (Triton 3.6) a pipelined config (2 or 3 stages) made an
    # illegal memory access at N = 64 / chunk 128; only 1-stage configs are verified by the tests
    configs = [triton.Config({}, num_warps=w, num_stages=1) for w in warps]
    # configs that need more shared memory than the GPU has are pruned by the autotuner
    return triton.autotune(configs=configs, key=keys)(fn)


_FWD = _tuned(K._siso_fwd_kernel, _KEYS + ["STORE", "FAST"], (4, 8))
_BWD = _tuned(K._siso_bwd_kernel, _KEYS + ["FAST"], (4, 8))


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
    """How the (sequence, chunk) grid is cut into segments; host-side, deterministic."""

    def __init__(self, B, L, H, C, cu: Tensor | None, seg_chunks: int, device):
        self.varlen = cu is not None
        self.segtab = self.seqtab = self.chtab = None
        if cu is None:
            self.nseq = B
            nc = max(1, -(-L // C))
            self.NC = nc
            sc = seg_chunks if seg_chunks > 0 else self._auto(B * H, nc, device)
            sc = min(sc, nc)
            self.NSEG = -(-nc // sc)
            self.SEG_CH = sc
            self.nsegs = B * self.NSEG
            self.nchunks = B * nc
            self.multi = self.NSEG > 1
            self.empty: list[int] = []
            return
        bounds = [int(b) for b in cu.tolist()]
        lens = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        self.nseq = len(lens)
        max_nc = max([-(-n // C) for n in lens] + [1])
        sc = seg_chunks if seg_chunks > 0 else self._auto(self.nseq * H, max_nc, device)
        self.NC, self.NSEG, self.SEG_CH = 1, 1, sc
        segs, seqs, chs = [], [], []
        cbase = 0
        self.empty = [i for i, n in enumerate(lens) if n == 0]
        self.chunk_seq: list[int] = []
        self.seq_cbase: list[int] = []
        self.seq_cend: list[int] = []
        for i, (s0, n) in enumerate(zip(bounds[:-1], lens, strict=True)):
            nc = -(-n // C)
            nseg = -(-nc // sc) if nc else 0
            seqs.append([len(segs), nseg, s0, s0 + n])
            self.seq_cbase.append(cbase)
            for j in range(nseg):
                t0 = s0 + j * sc * C
                t1 = min(t0 + sc * C, s0 + n)
                segs.append(
                    [i, t0, t1, s0, s0 + n, cbase + j * sc, int(j == 0), int(j == nseg - 1)]
                )
            for c in range(nc):
                chs.append([i, s0 + c * C, min(s0 + (c + 1) * C, s0 + n), s0])
                self.chunk_seq.append(i)
            cbase += nc
            self.seq_cend.append(cbase)
        self.nsegs = len(segs)
        self.nchunks = cbase
        self.multi = any(r[1] > 1 for r in seqs)

        def tab(rows, width):
            t = torch.tensor(rows if rows else [[0] * width], dtype=torch.int64)
            return t.to(device)

        self.segtab, self.seqtab, self.chtab = tab(segs, 8), tab(seqs, 4), tab(chs, 4)

    @staticmethod
    def _auto(bh: int, nc: int, device) -> int:
        """Chunks per segment: one segment per sequence when (batch x heads) fills the GPU."""
        if device.type == "cuda":
            target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        else:
            target = 8
        if bh * 4 >= target * 3:
            return nc
        nseg = min(nc, -(-target // bh))
        return -(-nc // nseg)


def _slots(B: int, L: int, C: int, nseq: int, varlen: bool) -> int:
    return (L // C + nseq) if varlen else B * max(1, -(-L // C))


def _nang(angles: Tensor | None, ia: Tensor | None) -> int:
    if angles is not None:
        return angles.shape[-1]
    return ia.shape[-1] if ia is not None else 0


def _strides3(t: Tensor | None, dims=(0, 1, 2)) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else tuple(t.stride(d) for d in dims)


def _common_args(q, k, v, adt, dt, trap, angles, z, out):
    return (
        *_strides3(q, (0, 1, 3)),
        *_strides3(k, (0, 1, 3)),
        *_strides3(v),
        *_strides3(adt),
        *_strides3(dt),
        *_strides3(trap),
        *_strides3(angles),
        *_strides3(z),
        *_strides3(out),
    )


def _kw(launch_fn, **kw):
    if not hasattr(launch_fn, "configs"):
        kw.setdefault("num_warps", 8)
        kw.setdefault("num_stages", 1)
    return kw


# ----------------------------------------------------------------------------- forward


def _fwd_impl(
    q,
    k,
    v,
    adt,
    dt,
    trap,
    q_bias,
    k_bias,
    angles,
    D,
    z,
    ia,
    issm,
    ik,
    iv,
    cu,
    chunk_size: int,
    seg_chunks: int,
    fast: bool,
    store: bool,
):
    B, L, _, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    C = chunk_size
    dev = q.device
    plan = _Plan(B, L, H, C, cu, seg_chunks, dev)
    nseq, S = plan.nseq, _nang(angles, ia)
    f32 = torch.float32
    out = torch.empty(B, L, H, P, dtype=v.dtype, device=dev)
    if plan.empty:
        fa = ia.clone() if ia is not None else torch.zeros(nseq, H, S, dtype=f32, device=dev)
        fs = issm.clone() if issm is not None else torch.zeros(nseq, H, P, N, dtype=f32, device=dev)
        fk = (
            ik.float().clone()
            if ik is not None
            else torch.zeros(nseq, 1, H, N, dtype=f32, device=dev)
        )
        fv = (
            iv.to(v.dtype).clone()
            if iv is not None
            else torch.zeros(nseq, H, P, dtype=v.dtype, device=dev)
        )
    else:
        fa = torch.empty(nseq, H, S, dtype=f32, device=dev)
        fs = torch.empty(nseq, H, P, N, dtype=f32, device=dev)
        fk = torch.empty(nseq, 1, H, N, dtype=f32, device=dev)
        fv = torch.empty(nseq, H, P, dtype=v.dtype, device=dev)
    slots = _slots(B, L, C, nseq, plan.varlen)
    st_dtype = torch.bfloat16 if fast else f32
    if store:
        stc = torch.empty(slots, H, P, N, dtype=st_dtype, device=dev)
        thc = torch.empty(slots, H, S, dtype=f32, device=dev)
    else:
        stc = torch.empty(0, dtype=st_dtype, device=dev)
        thc = torch.empty(0, dtype=f32, device=dev)
    if L == 0 or plan.nsegs == 0:
        return out, fa, fs, fk, fv, stc, thc
    dummy = out
    segtab = plan.segtab if plan.varlen else dummy
    has = dict(
        HAS_TRAP=trap is not None,
        HAS_ANG=angles is not None,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_INIT=issm is not None,
        VARLEN=plan.varlen,
    )
    strides = _common_args(q, k, v, adt, dt, trap, angles, z, out)
    sizes = (L, H, H // G, S, plan.NSEG, plan.SEG_CH, plan.NC)
    opt = lambda t: dummy if t is None else t  # noqa: E731
    if plan.multi:
        sloc = torch.empty(plan.nsegs, H, P, N, dtype=f32, device=dev)
        sega = torch.empty(plan.nsegs, H, dtype=f32, device=dev)
        segom = torch.empty(plan.nsegs, H, max(S, 1), dtype=f32, device=dev)
        sstart = torch.empty(plan.nsegs, H, P, N, dtype=f32, device=dev)
        thstart = torch.empty(plan.nsegs, H, max(S, 1), dtype=f32, device=dev)
    else:
        sstart = thstart = sloc = sega = segom = dummy
    args = (
        q,
        k,
        v,
        adt,
        dt,
        opt(trap),
        q_bias,
        k_bias,
        opt(angles),
        opt(D),
        opt(z),
        out,
        segtab,
        sstart,
        thstart,
        opt(issm),
        opt(ia),
        opt(ik),
        opt(iv),
        fs,
        fa,
        fk,
        fv,
        stc,
        thc,
        sloc,
        sega,
        segom,
    )

    def launch(local: bool) -> None:
        # The local pass (segment end states from zero) and the main pass share every argument.
        _FWD[(plan.nsegs * H,)](
            *args,
            *strides,
            *sizes,
            C=C,
            P=P,
            N2=N // 2,
            LOCAL=local,
            STORE=store and not local,
            FAST=fast,
            **_kw(_FWD, **has),
        )

    if plan.multi:
        launch(True)
        K._siso_fwd_chain_kernel[(nseq * H,)](
            plan.seqtab if plan.varlen else dummy,
            sloc,
            sega,
            segom,
            sstart,
            thstart,
            opt(issm),
            opt(ia),
            opt(ik),
            opt(iv),
            dt,
            opt(trap),
            *_strides3(dt),
            *_strides3(trap),
            H,
            S,
            plan.NSEG,
            P=P,
            N2=N // 2,
            HAS_TRAP=has["HAS_TRAP"],
            HAS_INIT=has["HAS_INIT"],
            VARLEN=plan.varlen,
            HAS_ANG=has["HAS_ANG"],
            num_warps=4,
        )
    launch(False)
    return out, fa, fs, fk, fv, stc, thc


# ----------------------------------------------------------------------------- backward


def _bwd_impl(
    dout,
    dfa,
    dfs,
    dfk,
    dfv,
    q,
    k,
    v,
    adt,
    dt,
    trap,
    q_bias,
    k_bias,
    angles,
    D,
    z,
    ia,
    issm,
    ik,
    iv,
    cu,
    stc,
    thc,
    chunk_size: int,
    seg_chunks: int,
    fast: bool,
):
    B, L, _, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    C = chunk_size
    dev = q.device
    f32 = torch.float32
    plan = _Plan(B, L, H, C, cu, seg_chunks, dev)
    nseq, S = plan.nseq, _nang(angles, ia)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dfs = (
        torch.zeros(nseq, H, P, N, dtype=f32, device=dev)
        if dfs is None
        else dfs.float().contiguous()
    )
    dfk = torch.zeros(nseq, 1, H, N, dtype=f32, device=dev) if dfk is None else dfk.contiguous()
    dfv = torch.zeros(nseq, H, P, dtype=f32, device=dev) if dfv is None else dfv.contiguous()
    dfa = torch.zeros(nseq, H, S, dtype=f32, device=dev) if dfa is None else dfa.float()

    # per-head dq / dk before the sum over the heads of a group (bf16 in fast mode: bytes)
    dh_dtype = torch.bfloat16 if fast else f32
    dqh = torch.empty(B, L, H, N, dtype=dh_dtype, device=dev)
    dkh = torch.empty(B, L, H, N, dtype=dh_dtype, device=dev)
    dx = torch.empty_like(v, memory_format=torch.contiguous_format)
    dz = torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else None
    dadt = torch.empty(B, H, L, dtype=f32, device=dev)
    dkap = torch.empty(B, H, L, dtype=f32, device=dev)
    dgam = torch.empty(B, H, L, dtype=f32, device=dev)
    slots = _slots(B, L, C, nseq, plan.varlen)
    dth = torch.empty(B, L, H, S, dtype=f32, device=dev)
    dthtot = torch.zeros(slots, H, S, dtype=f32, device=dev)
    nsg = max(plan.nsegs, 1)
    dqbp = torch.zeros(nsg, H, N, dtype=f32, device=dev)
    dkbp = torch.zeros(nsg, H, N, dtype=f32, device=dev)
    ddp = torch.zeros(nsg, H, dtype=f32, device=dev)
    dh0 = torch.zeros(nseq, H, P, N, dtype=f32, device=dev)
    dkprev = torch.zeros(nseq, 1, H, N, dtype=f32, device=dev)
    dvprev = torch.zeros(nseq, H, P, dtype=f32, device=dev)
    deta0 = torch.zeros(nseq, H, dtype=f32, device=dev)
    ddt = torch.zeros(B, H, L, dtype=f32, device=dev)
    dtrap = torch.zeros(B, H, L, dtype=f32, device=dev)
    dang = torch.zeros(B, L, H, S, dtype=angles.dtype, device=dev) if angles is not None else None

    if L > 0 and plan.nsegs > 0:
        dummy = dqh
        opt = lambda t: dummy if t is None else t  # noqa: E731
        segtab = plan.segtab if plan.varlen else dummy
        has = dict(
            HAS_TRAP=trap is not None,
            HAS_ANG=angles is not None,
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_INIT=issm is not None,
            VARLEN=plan.varlen,
        )
        strides = _common_args(q, k, v, adt, dt, trap, angles, z, dout)
        sizes = (L, H, H // G, S, plan.NSEG, plan.SEG_CH, plan.NC)

        def bwd_args(dstate_in, gloc, sega):
            # The local pass (no incoming state gradient) and the main pass share the rest.
            return (
                q,
                k,
                v,
                adt,
                dt,
                opt(trap),
                q_bias,
                k_bias,
                opt(angles),
                opt(D),
                opt(z),
                dout,
                segtab,
                stc,
                thc,
                dstate_in,
                opt(ia),
                opt(ik),
                opt(iv),
                dfk,
                dfv,
                dqh,
                dkh,
                dx,
                opt(dz),
                dadt,
                dkap,
                dgam,
                dth,
                dthtot,
                dqbp,
                dkbp,
                ddp,
                dh0,
                dkprev,
                dvprev,
                deta0,
                gloc,
                sega,
            )

        def launch(dstate_in, gloc, sega, local: bool, full: bool) -> None:
            _BWD[(plan.nsegs * H,)](
                *bwd_args(dstate_in, gloc, sega),
                *strides,
                *sizes,
                C=C,
                P=P,
                N2=N // 2,
                LOCAL=local,
                FAST=fast,
                FULL=full,
                **_kw(_BWD, **has),
            )

        if plan.multi or plan.varlen:
            gloc = torch.zeros(plan.nsegs, H, P, N, dtype=f32, device=dev)
            sega = torch.zeros(plan.nsegs, H, dtype=f32, device=dev)
            dsend = torch.empty(plan.nsegs, H, P, N, dtype=f32, device=dev)
            if plan.multi:
                launch(dummy, gloc, sega, local=True, full=z is not None)
            K._siso_bwd_chain_kernel[(nseq * H,)](
                plan.seqtab if plan.varlen else dummy,
                gloc,
                sega,
                dfs,
                dsend,
                H,
                plan.NSEG,
                P=P,
                N2=N // 2,
                VARLEN=plan.varlen,
                num_warps=4,
            )
        else:
            dsend = dfs
            gloc = sega = dummy
        launch(dsend, gloc, sega, local=False, full=True)

        # angle-gradient carry per chunk: sum of dTheta over all later tokens of the sequence
        if angles is not None:
            tot = dthtot[: plan.nchunks].double()
            if not plan.varlen:
                t4 = tot.view(B, plan.NC, H, S)
                rc = t4.flip(1).cumsum(1).flip(1)
                carry = (rc - t4 + dfa.double()[:, None]).reshape(plan.nchunks, H, S)
                dth0 = rc[:, 0] + dfa.double()
            else:
                rc = tot.flip(0).cumsum(0).flip(0)
                rce = torch.cat((rc, rc.new_zeros(1, H, S)))
                cs_ = torch.tensor(plan.chunk_seq, dtype=torch.int64, device=dev)
                ends = torch.tensor(plan.seq_cend, dtype=torch.int64, device=dev)
                starts = torch.tensor(plan.seq_cbase, dtype=torch.int64, device=dev)
                carry = rc - tot - rce[ends[cs_]] + dfa.double()[cs_]
                dth0 = rce[starts] - rce[ends] + dfa.double()
            carry = carry.float().contiguous()
        else:
            carry = dummy
            dth0 = dfa
        K._siso_bwd_gates_kernel[(plan.nchunks * H,)](
            opt(angles),
            dt,
            opt(trap),
            dkap,
            dgam,
            deta0,
            dth,
            carry,
            plan.chtab if plan.varlen else dummy,
            opt(dang),
            ddt,
            dtrap,
            *_strides3(dt),
            *_strides3(trap),
            *_strides3(angles),
            L,
            H,
            S,
            plan.NC,
            C=C,
            N2=triton.next_power_of_2(max(S, 1)),
            HAS_TRAP=has["HAS_TRAP"],
            HAS_ANG=has["HAS_ANG"],
            HAS_INIT=has["HAS_INIT"],
            VARLEN=plan.varlen,
            FAST=fast,
            num_warps=4,
        )
    else:
        dth0 = dfa

    hpg = H // G
    dq = dqh.view(B, L, G, hpg, N).sum(3, dtype=f32).unsqueeze(2).to(q.dtype)
    dk = dkh.view(B, L, G, hpg, N).sum(3, dtype=f32).unsqueeze(2).to(k.dtype)
    dqb = dqbp.sum(0).view(H, 1, N).to(q_bias.dtype)
    dkb = dkbp.sum(0).view(H, 1, N).to(k_bias.dtype)
    dD = ddp.sum(0).to(D.dtype) if D is not None else None
    dia = dth0.float() if angles is not None else dfa.clone()
    if plan.empty:
        idx = torch.tensor(plan.empty, dtype=torch.int64, device=dev)
        dh0[idx] = dfs[idx]
        dkprev[idx] = dfk[idx].float()
        dvprev[idx] = dfv[idx].float()
        dia = dia.clone()
        dia[idx] = dfa[idx]
    grads = [
        dq,
        dk,
        dx,
        dadt.to(adt.dtype),
        ddt.to(dt.dtype),
        dtrap.to(trap.dtype) if trap is not None else None,
        dqb,
        dkb,
        dang,
        dD,
        dz,
        dia if ia is not None else None,
        dh0 if issm is not None else None,
        dkprev.to(ik.dtype) if ik is not None else None,
        dvprev.to(iv.dtype) if iv is not None else None,
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
    init_angle: Tensor | None,
    init_ssm: Tensor | None,
    init_k: Tensor | None,
    init_v: Tensor | None,
    cu_seqlens: Tensor | None,
    chunk_size: int,
    seg_chunks: int,
    fast: bool,
    store: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fwd_impl(
        q,
        k,
        v,
        adt,
        dt,
        trap,
        q_bias,
        k_bias,
        angles,
        D,
        z,
        init_angle,
        init_ssm,
        init_k,
        init_v,
        cu_seqlens,
        chunk_size,
        seg_chunks,
        fast,
        store,
    )


@_fwd_op.register_fake
def _(
    q,
    k,
    v,
    adt,
    dt,
    trap,
    q_bias,
    k_bias,
    angles,
    D,
    z,
    init_angle,
    init_ssm,
    init_k,
    init_v,
    cu_seqlens,
    chunk_size,
    seg_chunks,
    fast,
    store,
):
    B, L, _, _, N = q.shape
    H, P = v.shape[2], v.shape[3]
    varlen = cu_seqlens is not None
    nseq = cu_seqlens.shape[0] - 1 if varlen else B
    S = _nang(angles, init_angle)
    f32 = torch.float32
    slots = (L // chunk_size + nseq) if varlen else B * ((L + chunk_size - 1) // chunk_size)
    st_dtype = torch.bfloat16 if fast else f32
    new = q.new_empty
    return (
        new(B, L, H, P, dtype=v.dtype),
        new(nseq, H, S, dtype=f32),
        new(nseq, H, P, N, dtype=f32),
        new(nseq, 1, H, N, dtype=f32),
        new(nseq, H, P, dtype=v.dtype),
        new(slots, H, P, N, dtype=st_dtype) if store else new(0, dtype=st_dtype),
        new(slots, H, S, dtype=f32) if store else new(0, dtype=f32),
    )


@torch.library.custom_op("hybridkit::mamba3_siso_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor,
    d_angle: Tensor | None,
    d_ssm: Tensor | None,
    d_k: Tensor | None,
    d_v: Tensor | None,
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
    init_angle: Tensor | None,
    init_ssm: Tensor | None,
    init_k: Tensor | None,
    init_v: Tensor | None,
    cu_seqlens: Tensor | None,
    states: Tensor,
    chunk_angles: Tensor,
    chunk_size: int,
    seg_chunks: int,
    fast: bool,
) -> list[Tensor]:
    return _bwd_impl(
        dout,
        d_angle,
        d_ssm,
        d_k,
        d_v,
        q,
        k,
        v,
        adt,
        dt,
        trap,
        q_bias,
        k_bias,
        angles,
        D,
        z,
        init_angle,
        init_ssm,
        init_k,
        init_v,
        cu_seqlens,
        states,
        chunk_angles,
        chunk_size,
        seg_chunks,
        fast,
    )


@_bwd_op.register_fake
def _(
    dout,
    d_angle,
    d_ssm,
    d_k,
    d_v,
    q,
    k,
    v,
    adt,
    dt,
    trap,
    q_bias,
    k_bias,
    angles,
    D,
    z,
    init_angle,
    init_ssm,
    init_k,
    init_v,
    cu_seqlens,
    states,
    chunk_angles,
    chunk_size,
    seg_chunks,
    fast,
):
    like = lambda t: torch.empty_like(t) if t is not None else q.new_empty(0)  # noqa: E731
    dia = (
        q.new_empty(init_angle.shape, dtype=torch.float32)
        if init_angle is not None
        else q.new_empty(0)
    )
    dis = (
        q.new_empty(init_ssm.shape, dtype=torch.float32) if init_ssm is not None else q.new_empty(0)
    )
    return [
        like(q),
        like(k),
        like(v),
        like(adt),
        like(dt),
        like(trap),
        like(q_bias),
        like(k_bias),
        like(angles),
        like(D),
        like(z),
        dia,
        dis,
        like(init_k),
        like(init_v),
    ]


_N_TENSOR_IN = 16  # q ... cu_seqlens


def _setup_context(ctx, inputs, output):
    tensors = list(inputs[:_N_TENSOR_IN])
    ctx.present = [t is not None for t in tensors]
    ctx.chunk_size, ctx.seg_chunks, ctx.fast = inputs[16], inputs[17], inputs[18]
    ctx.save_for_backward(*tensors, output[5], output[6])


def _backward(ctx, dy, d_angle, d_ssm, d_k, d_v, _d_states, _d_chunk_angles):
    saved = ctx.saved_tensors  # read exactly once (activation checkpointing)
    tensors, states, chunk_angles = saved[:_N_TENSOR_IN], saved[-2], saved[-1]
    grads = torch.ops.hybridkit.mamba3_siso_bwd(
        dy,
        d_angle,
        d_ssm,
        d_k,
        d_v,
        *tensors,
        states,
        chunk_angles,
        ctx.chunk_size,
        ctx.seg_chunks,
        ctx.fast,
    )
    out = [g if present else None for g, present in zip(grads, ctx.present[:15], strict=True)]
    return (*out, None, None, None, None, None)


torch.library.register_autograd(
    "hybridkit::mamba3_siso_fwd", _backward, setup_context=_setup_context
)


# ----------------------------------------------------------------------------- public API


def _c(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


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
    seg_chunks: int = 0,
) -> tuple[Tensor, Mamba3State]:
    """Mamba-3 SISO scan on Triton; shapes and semantics as the reference scans (R must be 1).

    Returns y (B, L, 1, H, P) in ``v``'s dtype (times ``silu(z)`` when ``z`` (B, L, H, P) is
    given) and the final :class:`Mamba3State` (angle, ssm and k in float32, v in ``v``'s dtype).
    ``fast`` (default: ``v`` is bf16/fp16) selects bf16 tensor-core operands and approximate
    transcendentals; ``seg_chunks`` (0 = automatic) is the number of chunks one program walks.
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
    ia = issm = ik = iv = None
    if initial_state is not None:
        ia = initial_state.angle.float().contiguous()
        issm = initial_state.ssm.float().contiguous()
        ik = initial_state.k.contiguous()
        iv = initial_state.v.contiguous()
    f32 = torch.float32
    tensors = [q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, ia, issm, ik, iv]
    store = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, fa, fs, fk, fv, _, _ = torch.ops.hybridkit.mamba3_siso_fwd(
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
        ia,
        issm,
        ik,
        iv,
        None if cu_seqlens is None else cu_seqlens.to(torch.int64),
        chunk_size,
        seg_chunks,
        bool(fast),
        bool(store),
    )
    return y.unsqueeze(2), Mamba3State(fa, fs, fk, fv)
