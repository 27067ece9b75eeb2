"""The chunked Mamba-3 scan (SISO, and MIMO as R rows per token) as two ``torch.library``
custom ops with registered autograd and fake impls.

* ``hybridkit::mamba3_scan_fwd`` returns the output, the sequence's total angle, the end state
  in the relative frame and the per-chunk start states (the only activation the backward
  re-reads);
* ``hybridkit::mamba3_scan_bwd`` returns the gradient of every input.

Both have fake implementations whose shapes and strides are the real ones (every output is a
fresh contiguous tensor), so a model using them compiles with ``torch.compile(fullgraph=True)``;
shapes depend only on static sizes (packed batches use the static slot bound of
:func:`.launch.state_slots`). The backward reads ``ctx.saved_tensors`` exactly once, so
non-reentrant activation checkpointing works. In eager mode :class:`ScanFunction` runs the same
code without the dispatcher (see its docstring).

The backward launches with the kernel settings in force when its forward ran
(:func:`backward_settings`): on a GPU autograd runs the backward in a worker thread of its own,
where a :func:`~hybridkit.kernels.config.kernel_config` block around the forward and backward
calls is not in force (a ``ContextVar`` does not follow work into another thread).
"""

from __future__ import annotations

import typing
from typing import NamedTuple

import torch
from torch import Tensor

from hybridkit.kernels.config import current_config, kernel_config
from hybridkit.kernels.mamba3.chunkscan import backward as K_bwd
from hybridkit.kernels.mamba3.chunkscan import forward as K_fwd
from hybridkit.kernels.mamba3.chunkscan.launch import (
    BWD_DSTATE,
    FWD_OUT,
    FWD_STATE,
    ChunkPlan,
    angle_width,
    angles_tokens_last,
    backward_chunk_options,
    launch_options,
    qk_heads_per_program,
    state_slots,
    strides,
)


class ScanInputs(NamedTuple):
    """The tensor inputs of the op, in its argument order (optional ones may be None).

    ``init_state`` is the initial state already in the kernels' relative, de-interleaved frame
    (sequences, H, P, N) float32; ``cu_seqlens`` int64 on the device."""

    q: Tensor
    k: Tensor
    v: Tensor
    adt: Tensor
    dt: Tensor
    trap: Tensor | None
    q_bias: Tensor
    k_bias: Tensor
    angles: Tensor | None
    D: Tensor | None
    psi: Tensor | None  # (H, R, P) MIMO's per-rank x scaling; None for SISO
    init_state: Tensor | None
    cu_seqlens: Tensor | None


class _Sizes(NamedTuple):
    B: int
    L: int
    R: int
    G: int
    N: int
    H: int
    P: int
    S: int

    @staticmethod
    def of(x: ScanInputs) -> _Sizes:
        B, L, R, G, N = x.q.shape
        S = x.angles.shape[-1] if x.angles is not None else 0
        return _Sizes(B, L, R, G, N, x.v.shape[2], x.v.shape[3], S)


# ----------------------------------------------------------------------------- forward


def scan_forward(
    x: ScanInputs, C: int, fast: bool, halves: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y (B, L, R, H, P), total angle (seqs, H, S), end state (seqs, H, P, N) relative frame,
    chunk states)."""
    z = _Sizes.of(x)
    dev, f32 = x.q.device, torch.float32
    plan = ChunkPlan(z.B, z.L, C, x.cu_seqlens, dev)
    out = torch.empty(z.B, z.L, z.R, z.H, z.P, dtype=x.v.dtype, device=dev)
    # ``_fwd_pass`` writes every sequence's total angle; with no chunk it stays zero
    alloc = torch.empty if plan.nchunks > 0 else torch.zeros
    total_angle = alloc(plan.nseq, z.H, z.S, dtype=f32, device=dev)
    slots = state_slots(z.B, z.L, C, plan.nseq, plan.varlen)
    chunk_states = torch.empty(
        slots, z.H, z.P, z.N, dtype=torch.bfloat16 if fast else f32, device=dev
    )
    if plan.nchunks == 0:
        s0 = x.init_state
        end = s0.clone() if s0 is not None else out.new_zeros(plan.nseq, z.H, z.P, z.N, dtype=f32)
        return out, total_angle, end, chunk_states
    end_state = torch.empty(plan.nseq, z.H, z.P, z.N, dtype=f32, device=dev)
    chunk_decay = torch.empty(plan.nchunks, z.H, dtype=f32, device=dev)  # A_c
    chunk_angle = torch.empty(plan.nchunks, z.H, max(z.S, 1), dtype=f32, device=dev)  # Omega_c
    # per-token gamma, kappa and in-chunk cumsum of adt, written by ``_fwd_state`` for
    # ``_fwd_out`` (3 x 4 B per token and head)
    token_gates = torch.empty(z.B, z.H, 3, z.L, dtype=f32, device=dev)
    opt = lambda t: out if t is None else t  # noqa: E731  (absent inputs: any pointer)
    chunk_table = plan.chunk_table if plan.varlen else out
    angt, angle_strides = angles_tokens_last(x.angles)
    flags = dict(C=C, P=z.P, N2=z.N // 2, HAS_ANG=x.angles is not None)
    flags.update(VARLEN=plan.varlen, FAST=fast, NA=angle_width(z.N // 2, z.S), R=z.R)
    flags.update(HALVES=halves)
    sizes = (z.L, z.H, z.H // z.G, z.S, plan.chunks_per_seq)
    grid = (plan.nchunks * z.H,)
    FWD_STATE[grid](
        x.k, x.v, opt(x.psi), x.adt, x.dt, opt(x.trap), x.k_bias, opt(angt), chunk_table,
        chunk_states, chunk_decay, chunk_angle, token_gates,
        *strides(x.k, (0, 1, 2, 3)), *strides(x.v), *strides(x.adt), *strides(x.dt),
        *strides(x.trap), *angle_strides, *sizes,
        HAS_TRAP=x.trap is not None, **flags,
    )  # fmt: skip
    nt = plan.row_tiles(z.H, z.N, z.P, dev)
    K_fwd._fwd_pass_kernel[(plan.nseq * z.H * nt,)](
        chunk_states, chunk_decay, chunk_angle, opt(x.init_state), end_state, total_angle,
        plan.seq_table if plan.varlen else out, z.H, z.S, plan.chunks_per_seq, nt,
        P=z.P, N2=z.N // 2, PB=z.P // nt, HAS_INIT=x.init_state is not None,
        HAS_ANG=x.angles is not None, VARLEN=plan.varlen, **launch_options(4),
    )  # fmt: skip
    FWD_OUT[grid](
        x.q, x.k, x.v, opt(x.psi), token_gates, x.dt, x.q_bias, x.k_bias, opt(angt), opt(x.D),
        out, chunk_table, chunk_states,
        *strides(x.q, (0, 1, 2, 3)), *strides(x.k, (0, 1, 2, 3)), *strides(x.v), *strides(x.dt),
        *angle_strides, *strides(out, (0, 1, 2, 3)), *sizes,
        HAS_D=x.D is not None, **flags,
    )  # fmt: skip
    return out, total_angle, end_state, chunk_states


# ----------------------------------------------------------------------------- backward


class _Grads(NamedTuple):
    """Gradient buffers the backward kernels write (per head / per chunk where noted)."""

    dq_heads: Tensor  # (B, L, R, H / hs, N): summed over each group's slots afterwards
    dk_heads: Tensor
    dx: Tensor
    dadt: Tensor
    dkappa: Tensor  # (B, H, L) gradients of the per-token gates, folded into dt / trap
    dgamma: Tensor
    ddt: Tensor
    dtrap: Tensor | None
    dangles: Tensor | None
    dq_bias_part: Tensor  # (chunks, H, R, N): partial sums over each chunk's tokens
    dk_bias_part: Tensor
    dD_part: Tensor  # (chunks, H)
    dpsi_part: Tensor | None  # (chunks, H, R, P), MIMO only
    dinit: Tensor  # (seqs, H, P, N) gradient of the initial state (relative frame)


def _grad_buffers(
    x: ScanInputs, plan: ChunkPlan, dsend: Tensor | None, fast: bool, hs: int
) -> _Grads:
    """``hs``: heads per program of the q / k kernels (:func:`.launch.qk_heads_per_program`),
    which share one fp32 slot of the dq / dk buffers."""
    z = _Sizes.of(x)
    dev, f32 = x.q.device, torch.float32
    # packed batches may leave tokens outside every sequence: zero-fill only there
    new = torch.zeros if plan.varlen else torch.empty
    # per-head (hs 1) or per-slot (hs heads added in fp32) dq / dk before the group sum
    heads = torch.bfloat16 if fast and hs == 1 else f32
    # written by ``_bwd_gates`` (zeros where there is no chunk)
    gnew = new if plan.nchunks > 0 else torch.zeros
    # per-(chunk, head) partial sums: every slot is written when there is a chunk
    nparts = max(plan.nchunks, 1)
    part = torch.empty if plan.nchunks > 0 else torch.zeros
    return _Grads(
        dq_heads=new(z.B, z.L, z.R, z.H // hs, z.N, dtype=heads, device=dev),
        dk_heads=new(z.B, z.L, z.R, z.H // hs, z.N, dtype=heads, device=dev),
        dx=new(z.B, z.L, z.H, z.P, dtype=x.v.dtype, device=dev),
        dadt=new(z.B, z.H, z.L, dtype=f32, device=dev),
        dkappa=new(z.B, z.H, z.L, dtype=f32, device=dev),
        dgamma=new(z.B, z.H, z.L, dtype=f32, device=dev),
        ddt=gnew(z.B, z.H, z.L, dtype=x.dt.dtype, device=dev),
        dtrap=None if x.trap is None else gnew(z.B, z.H, z.L, dtype=x.trap.dtype, device=dev),
        dangles=None
        if x.angles is None
        else new(z.B, z.L, z.H, z.S, dtype=x.angles.dtype, device=dev),
        dq_bias_part=part(nparts, z.H, z.R, z.N, dtype=f32, device=dev),
        dk_bias_part=part(nparts, z.H, z.R, z.N, dtype=f32, device=dev),
        dD_part=part(nparts, z.H, dtype=f32, device=dev),
        dpsi_part=None if x.psi is None else part(nparts, z.H, z.R, z.P, dtype=f32, device=dev),
        # the reverse pass writes it; with no chunk it is the end state's gradient
        dinit=torch.empty(plan.nseq, z.H, z.P, z.N, dtype=f32, device=dev)
        if plan.nchunks > 0
        else dsend.clone(),
    )


def backward_settings() -> list[int]:
    """The kernel settings the backward launches with, read when the forward runs:
    ``[bwd_warps, bwd_x_warps or 0, bwd_maxnreg or 0, tunes, qk_heads]`` (ints, so that they pass
    through the backward op's schema and are constants of a compiled graph; ``tunes`` is
    ``autotune`` unless ``deterministic`` turns the timing off)."""
    cfg = current_config()
    return [cfg.bwd_warps, cfg.bwd_x_warps or 0, cfg.bwd_maxnreg or 0, int(cfg.tunes), cfg.qk_heads]


def scan_backward(
    dout: Tensor,
    dtotal: Tensor | None,
    dsend: Tensor | None,
    x: ScanInputs,
    chunk_states: Tensor,
    C: int,
    fast: bool,
    halves: bool,
    settings: typing.List[int],  # noqa: UP006 - torch 2.5's schema inference knows no list[int]
) -> typing.List[Tensor]:  # noqa: UP006 - nor list[Tensor]
    """Gradients of every input of ``x`` (empty tensors for absent ones), in its order;
    kernels launched with ``settings`` (:func:`backward_settings` of the forward)."""
    z = _Sizes.of(x)
    dev = x.q.device
    plan = ChunkPlan(z.B, z.L, C, x.cu_seqlens, dev)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    # unused end-state outputs (training) arrive as None: the kernels then read no gradient
    # for them (``HAS_DSEND`` / ``HAS_DTOT``) instead of zero-filled buffers
    if dsend is not None:
        dsend = dsend.float().contiguous()
    elif plan.nchunks == 0:
        dsend = torch.zeros(plan.nseq, z.H, z.P, z.N, dtype=torch.float32, device=dev)
    dtotal = dtotal.float().contiguous() if dtotal is not None else None
    warps, x_warps, maxnreg, autotune, qk_heads = settings
    launch = dict(bwd_warps=warps, bwd_x_warps=x_warps or None, bwd_maxnreg=maxnreg or None)
    with kernel_config(**launch, autotune=bool(autotune), qk_heads=qk_heads):
        hs = qk_heads_per_program(z.H // z.G)
        g = _grad_buffers(x, plan, dsend, fast, hs)
        if plan.nchunks > 0:
            _launch_backward(dout, dtotal, dsend, x, chunk_states, g, plan, z, C, fast, halves, hs)
    return _reduce(x, g, z, hs)


def _launch_backward(
    dout, dtotal, dsend, x: ScanInputs, chunk_states, g: _Grads, plan, z, C, fast, halves, hs
):
    dev, f32 = x.q.device, torch.float32
    opt = lambda t: g.dq_heads if t is None else t  # noqa: E731  (absent inputs: any pointer)
    chunk_table = plan.chunk_table if plan.varlen else g.dq_heads
    seq_table = plan.seq_table if plan.varlen else g.dq_heads
    dstate = torch.empty(plan.nchunks, z.H, z.P, z.N, dtype=chunk_states.dtype, device=dev)
    chunk_decay = torch.empty(plan.nchunks, z.H, dtype=f32, device=dev)
    chunk_angle = torch.empty(plan.nchunks, z.H, max(z.S, 1), dtype=f32, device=dev)
    angt, angle_strides = angles_tokens_last(x.angles)
    na = angle_width(z.N // 2, z.S)
    sizes = (z.L, z.H, z.H // z.G, z.S, plan.chunks_per_seq)
    grid = (plan.nchunks * z.H,)
    # gamma, kappa, in-chunk cumsum of adt: written by ``_bwd_dstate``, loaded by q / k / x
    token_gates = torch.empty(z.B, z.H, 3, z.L, dtype=f32, device=dev)
    # cos / sin of the in-chunk angles, written once by ``_bwd_dstate`` and loaded by the
    # q / k / x kernels (fp16 in fast mode: 2^-11 next to the bf16 operands they rotate)
    cs_dtype = torch.float16 if fast else f32
    cos_sin = (
        torch.empty(z.B, z.H, 2 * z.S, z.L, dtype=cs_dtype, device=dev)
        if x.angles is not None
        else g.dq_heads
    )
    has = dict(HAS_TRAP=x.trap is not None, HAS_ANG=x.angles is not None)
    rank = dict(R=z.R, HALVES=halves)
    dout_strides = strides(dout, (0, 1, 2, 3))
    BWD_DSTATE[grid](
        x.q, x.adt, x.dt, opt(x.trap), x.q_bias, opt(angt), dout, chunk_table, dstate,
        chunk_decay, chunk_angle, cos_sin, token_gates,
        *strides(x.q, (0, 1, 2, 3)), *strides(x.adt), *strides(x.dt), *strides(x.trap),
        *angle_strides, *dout_strides, *sizes,
        C=C, P=z.P, N2=z.N // 2, NA=na, VARLEN=plan.varlen, FAST=fast, **has, **rank,
    )  # fmt: skip
    nt = plan.row_tiles(z.H, z.N, z.P, dev)
    K_bwd._bwd_pass_kernel[(plan.nseq * z.H * nt,)](
        dstate, chunk_decay, chunk_angle, opt(dsend), g.dinit, seq_table, z.H, z.S,
        plan.chunks_per_seq, nt, P=z.P, N2=z.N // 2, PB=z.P // nt, HAS_ANG=x.angles is not None,
        HAS_DSEND=dsend is not None, VARLEN=plan.varlen, **launch_options(4),
    )  # fmt: skip
    # d cs through exp(cs) q~ S~ (``_bwd_q`` -> ``_bwd_x``) and d u per token (k -> x)
    dcs_state = torch.empty(z.B, z.H, z.L * z.R, dtype=f32, device=dev)  # per (token, rank)
    du = torch.empty_like(dcs_state)
    # per-token d theta (q and k shares, tokens last) and each chunk's d Omega_c, finished by
    # ``_bwd_gates``
    dtheta = (
        torch.empty(z.B, z.H, z.S, z.L, dtype=f32, device=dev)
        if x.angles is not None
        else opt(None)
    )
    domega = torch.empty(plan.nchunks, z.H, max(z.S, 1), dtype=f32, device=dev)
    common = (
        *strides(x.q, (0, 1, 2, 3)), *strides(x.k, (0, 1, 2, 3)), *strides(x.v), *dout_strides,
        *sizes,
    )  # fmt: skip
    flags = dict(C=C, P=z.P, N2=z.N // 2, NA=na, HAS_ANG=x.angles is not None)
    flags.update(HAS_D=x.D is not None, VARLEN=plan.varlen, FAST=fast, **rank)
    inputs = (x.q, x.k, x.v, opt(x.psi), token_gates, chunk_decay, x.q_bias, x.k_bias, cos_sin)
    qk_grid = (plan.nchunks * z.H // hs,)  # a program per (chunk, hs heads of one group)
    K_bwd._bwd_q_kernel[qk_grid](
        *inputs, dout, chunk_table, chunk_states, g.dq_heads, g.dq_bias_part, dtheta, dcs_state,
        *common, HS=hs, **flags, **backward_chunk_options("qk"),
    )  # fmt: skip
    K_bwd._bwd_k_kernel[qk_grid](
        *inputs, dout, chunk_table, dstate, opt(dtotal), dtheta, domega, g.dk_heads,
        g.dk_bias_part, du, *common, HAS_DTOT=dtotal is not None, HS=hs, **flags,
        **backward_chunk_options("qk"),
    )  # fmt: skip
    K_bwd._bwd_x_kernel[grid](
        *inputs, opt(x.D), dout, chunk_table, dstate, dcs_state, du, chunk_states, domega, g.dx,
        g.dadt, g.dkappa, g.dgamma, g.dD_part, opt(g.dpsi_part), *common, **flags,
        **backward_chunk_options("x"),
    )  # fmt: skip
    K_bwd._bwd_gates_kernel[grid](
        opt(angt), x.dt, opt(x.trap), dtheta, domega, chunk_table, seq_table, g.dgamma,
        g.dkappa, opt(g.dangles), g.ddt, opt(g.dtrap), *angle_strides, *strides(x.dt),
        *strides(x.trap), z.L, z.H, z.S, plan.chunks_per_seq,
        C=C, NA=na, VARLEN=plan.varlen, FAST=fast, **has, **launch_options(4),
    )  # fmt: skip


def _reduce(x: ScanInputs, g: _Grads, z: _Sizes, hs: int) -> list[Tensor]:
    """Sum the per-head (or per-slot of ``hs`` heads) and per-chunk partials and cast to the
    inputs' dtypes."""
    slots = z.H // z.G // hs  # per group
    # sums over the group's heads accumulate in fp32 also for bf16 buffers (torch's reduction
    # accumulator), so the result is rounded once, as with an fp32 sum and a cast
    dq = g.dq_heads.view(z.B, z.L, z.R, z.G, slots, z.N).sum(4).to(x.q.dtype)
    dk = g.dk_heads.view(z.B, z.L, z.R, z.G, slots, z.N).sum(4).to(x.k.dtype)
    grads = [
        dq,
        dk,
        g.dx,
        g.dadt.to(x.adt.dtype),
        g.ddt,
        g.dtrap,
        g.dq_bias_part.sum(0).to(x.q_bias.dtype),
        g.dk_bias_part.sum(0).to(x.k_bias.dtype),
        g.dangles,
        g.dD_part.sum(0).to(x.D.dtype) if x.D is not None else None,
        g.dpsi_part.sum(0).to(x.psi.dtype) if x.psi is not None else None,
        g.dinit if x.init_state is not None else None,
    ]
    return [torch.empty(0, device=x.q.device) if t is None else t for t in grads]


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("hybridkit::mamba3_scan_fwd", mutates_args=())
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
    psi: Tensor | None,
    init_state: Tensor | None,
    cu_seqlens: Tensor | None,
    chunk_size: int,
    fast: bool,
    halves: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = ScanInputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, psi, init_state, cu_seqlens)
    return scan_forward(x, chunk_size, fast, halves)


@_fwd_op.register_fake
def _(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, psi, init_state, cu_seqlens,
      chunk_size, fast, halves):  # fmt: skip
    z = _Sizes.of(ScanInputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, psi, None, None))
    varlen = cu_seqlens is not None
    nseq = cu_seqlens.shape[0] - 1 if varlen else z.B
    f32 = torch.float32
    slots = state_slots(z.B, z.L, chunk_size, nseq, varlen)
    return (
        q.new_empty(z.B, z.L, z.R, z.H, z.P, dtype=v.dtype),
        q.new_empty(nseq, z.H, z.S, dtype=f32),
        q.new_empty(nseq, z.H, z.P, z.N, dtype=f32),
        q.new_empty(slots, z.H, z.P, z.N, dtype=torch.bfloat16 if fast else f32),
    )


@torch.library.custom_op("hybridkit::mamba3_scan_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor,
    d_total_angle: Tensor | None,
    d_end_state: Tensor | None,
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
    psi: Tensor | None,
    init_state: Tensor | None,
    cu_seqlens: Tensor | None,
    chunk_states: Tensor,
    chunk_size: int,
    fast: bool,
    halves: bool,
    settings: typing.List[int],  # noqa: UP006 - torch 2.5's schema inference knows no list[int]
) -> typing.List[Tensor]:  # noqa: UP006 - nor list[Tensor]
    x = ScanInputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, psi, init_state, cu_seqlens)
    return scan_backward(
        dout, d_total_angle, d_end_state, x, chunk_states, chunk_size, fast, halves, settings
    )


@_bwd_op.register_fake
def _(dout, d_total_angle, d_end_state, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, psi,
      init_state, cu_seqlens, chunk_states, chunk_size, fast, halves, settings):  # fmt: skip
    # the real gradients are fresh contiguous tensors whatever the inputs' strides (a
    # transposed dt / adt view included), so the fake ones are too; an absent input's place
    # is an empty float32 tensor, as the real op returns there
    def like(t: Tensor | None) -> Tensor:
        return q.new_empty(0, dtype=torch.float32) if t is None else t.new_empty(t.shape)

    inputs = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, psi, init_state)
    grads = [like(t) for t in inputs]
    if angles is not None:  # angles shared over heads (B, L, 1, S) get a gradient per head
        grads[8] = angles.new_empty(*angles.shape[:2], v.shape[2], angles.shape[3])
    return grads


_N_INPUTS = len(ScanInputs._fields)


def _setup_context(ctx, inputs, output) -> None:
    tensors = list(inputs[:_N_INPUTS])
    ctx.present = [t is not None for t in tensors[:-1]]  # cu_seqlens gets no gradient
    ctx.chunk_size, ctx.fast, ctx.halves = inputs[_N_INPUTS : _N_INPUTS + 3]
    ctx.settings = backward_settings()
    ctx.save_for_backward(*tensors, output[3])
    # unused outputs get None, not zeros: autograd would otherwise fill a zero gradient for the
    # saved chunk states (268 MB at B 8, L 4096, H 32) every step
    ctx.set_materialize_grads(False)


def _run_backward(ctx, dy, d_total, d_end, backward_fn):
    saved = ctx.saved_tensors  # read exactly once (activation checkpointing)
    if dy is None:  # only the final state was used
        dy = saved[2].new_zeros(saved[2].shape)
    grads = backward_fn(
        dy, d_total, d_end, *saved, ctx.chunk_size, ctx.fast, ctx.halves, ctx.settings
    )
    out = [g if present else None for g, present in zip(grads, ctx.present, strict=True)]
    return (*out, None, None, None, None)


def _backward(ctx, dy, d_total, d_end, _d_states):
    return _run_backward(ctx, dy, d_total, d_end, torch.ops.hybridkit.mamba3_scan_bwd)


torch.library.register_autograd(
    "hybridkit::mamba3_scan_fwd", _backward, setup_context=_setup_context
)


def _backward_eager(dout, d_total, d_end, *saved_and_options):
    *tensors, chunk_states, chunk_size, fast, halves, settings = saved_and_options
    x = ScanInputs(*tensors)
    return scan_backward(dout, d_total, d_end, x, chunk_states, chunk_size, fast, halves, settings)


class ScanFunction(torch.autograd.Function):
    """The same forward / backward as the ops, without the dispatcher: for eager mode only.

    Through the ops every call also pays the dispatcher, the autograd wrapper's argument
    filling (~0.1-0.25 ms for 14 arguments) and the Dynamo-disable guard; at batch 1 the
    forward + backward is host-bound, so that time is the step time. ``torch.compile`` must
    see the ops instead (their fake implementations)."""

    @staticmethod
    def forward(ctx, *args):
        *tensors, chunk_size, fast, halves = args
        out = scan_forward(ScanInputs(*tensors), chunk_size, fast, halves)
        _setup_context(ctx, args, out)
        ctx.mark_non_differentiable(out[3])
        return out

    @staticmethod
    def backward(ctx, dy, d_total, d_end, _d_states):
        return _run_backward(ctx, dy, d_total, d_end, _backward_eager)


def scan_op(*args):
    """The forward op as ``torch.compile`` must see it, else the cheaper eager Function."""
    if torch.compiler.is_compiling():
        return torch.ops.hybridkit.mamba3_scan_fwd(*args)
    return ScanFunction.apply(*args)
