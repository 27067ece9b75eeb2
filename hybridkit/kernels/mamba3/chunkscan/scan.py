"""The public entry of the Triton Mamba-3 scan (SISO and MIMO): frame conversion around the
custom op.

:func:`mamba3_scan_triton` has the signature and results of the other scan backends. The
conversion between the absolute-frame :class:`Mamba3State` and the kernels' relative frame
(rotate the initial state by ``-angle``, add the first token's trapezoid term of the previous
token; rotate the end state by the final angle, pick the last key / value) is plain torch on
(sequences, H, P, N) tensors here, so autograd differentiates it and the kernels never see the
initial angle, key or value (``docs/mamba3.md`` section 3.2).

Precision: ``fast=True`` (default for bf16/fp16 ``v``) uses bf16 tensor-core operands with fp32
accumulation, PTX approximations of tanh / sin / cos and bf16 per-chunk state buffers;
``fast=False`` is fp32 throughout with exact ``ieee`` dots (the float64-checked mode).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybridkit.kernels.config import triton_chunk, triton_chunk_sizes
from hybridkit.kernels.mamba3.chunkscan.op import scan_op
from hybridkit.kernels.mamba3.reference import rotate_pairs, wrap_angle
from hybridkit.kernels.mamba3.state import Mamba3State

#: MIMO ranks the kernels run (R rows per token; C * R must stay a power of two).
TRITON_RANKS = (1, 2, 4, 8)


def unsupported_reason(
    rank: int, d_state: int, headdim: int, dtype: torch.dtype, on_gpu: bool, pairing: str
) -> str | None:
    """Why the Triton path cannot run a call with these static properties (None: it can)."""
    if rank not in TRITON_RANKS:
        return f"rank {rank}: the Triton kernels run ranks {TRITON_RANKS}"
    if pairing not in ("interleaved", "halves"):
        return f"unknown rotary pairing {pairing!r}"
    if dtype == torch.float64:
        return "float64 inputs"
    # on a GPU tl.dot needs every dimension >= 16 (N/2); headdim 16 gave wrong outputs in the
    # GPU fuzz (Triton 3.6, bf16, N 128), so the GPU path starts at 32
    lo = 32 if on_gpu else 4
    pow2 = lambda x: x >= 1 and (x & (x - 1)) == 0  # noqa: E731
    if not (pow2(d_state) and d_state >= lo and pow2(headdim) and headdim >= lo):
        return f"d_state {d_state} / headdim {headdim}: needs powers of two, both >= {lo}"
    return None


def supports(q: Tensor, v: Tensor, mimo_x: Tensor | None, pairing: str) -> bool:
    """Whether the Triton path handles this call (else use the chunked torch path)."""
    if q.dim() != 5 or (mimo_x is not None and q.shape[2] == 1):
        return False
    dtype = torch.float64 if torch.float64 in (q.dtype, v.dtype) else v.dtype
    reason = unsupported_reason(q.shape[2], q.shape[-1], v.shape[-1], dtype, q.is_cuda, pairing)
    return reason is None


# ----------------------------------------------------------------------------- frames


def _deinterleave(s: Tensor, pairing: str) -> Tensor:
    """(..., N) -> the kernels' column order [first of each pair, second of each pair]: for
    pairs (2j, 2j+1) the even then the odd columns; "halves" pairs (j, j + N/2) already are."""
    if pairing == "halves":
        return s
    return s.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def _interleave(s: Tensor, pairing: str) -> Tensor:
    if pairing == "halves":
        return s
    return s.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)


def chunk_height_reason(chunk_size: int, rank: int) -> str | None:
    """Why the kernels cannot run ``chunk_size`` tokens at ``rank`` (None: they can): the
    chunk's C x R rows must be a configured chunk height; MIMO chunks taller than the largest
    are narrowed (:func:`kernel_chunk`), SISO chunks are not."""
    allowed = triton_chunk_sizes()
    rows = chunk_size * rank
    if rows in allowed or (rank > 1 and rows > allowed[-1]):
        return None
    return f"chunk_size {chunk_size} x rank {rank} not among the Triton chunk heights {allowed}"


def kernel_chunk(chunk_size: int, rank: int, d_state: int, headdim: int, fast: bool) -> int:
    """Tokens per chunk the kernels run: the chunk's C * R rows (one per token and rank) are
    the tile height, narrowed like a SISO chunk (:func:`triton_chunk`); at least 16 rows."""
    tallest = triton_chunk_sizes()[-1]
    rows = triton_chunk(min(chunk_size * rank, tallest), d_state, headdim, fast)
    return max(rows // rank, 16 // rank, 1)


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
    """``t`` with a unit last stride (the kernels load whole rows)."""
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
    fast: bool | None = None,
    return_state: bool = True,
) -> tuple[Tensor, Mamba3State | None]:
    """Mamba-3 scan on Triton, SISO or MIMO (rank R in 1, 2, 4, 8); shapes and semantics as the
    reference scans.

    Returns y (B, L, R, H, P) in ``v``'s dtype and the final :class:`Mamba3State` (angle, ssm
    and k in float32, v in ``v``'s dtype), or None with ``return_state=False``: converting the
    end state to the absolute frame is ~20 small torch ops, most of the host time of a call
    (training never reads the state). ``fast`` (default: ``v`` is bf16/fp16) selects bf16
    tensor-core operands and approximate transcendentals. The kernels may run a narrower chunk
    than ``chunk_size`` (:func:`hybridkit.kernels.config.triton_chunk`); the result is the same.
    """
    if not supports(q, v, mimo_x, pairing):
        dtype = torch.float64 if torch.float64 in (q.dtype, v.dtype) else v.dtype
        if q.dim() != 5:
            why = f"q must be (B, L, R, G, N), got shape {tuple(q.shape)}"
        else:
            why = unsupported_reason(
                q.shape[2], q.shape[-1], v.shape[-1], dtype, q.is_cuda, pairing
            )
            if why is None:  # the one rule supports() adds
                why = "mimo_x scaling needs rank > 1"
        raise ValueError(
            f"mamba3_scan_triton (backend triton) cannot run this call: {why}; backend auto "
            "falls back to the torch path where the kernels cannot run"
        )
    B, L, R, G, N = q.shape
    why = chunk_height_reason(chunk_size, R)
    if why is not None:
        raise ValueError(f"mamba3_scan_triton: {why}")
    H = v.shape[2]
    if H % G != 0:
        raise ValueError(f"mamba3 scan: nheads ({H}) must be a multiple of ngroups ({G})")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"mamba3 scan: cu_seqlens requires batch size 1, got {B}")
    if angles is not None and 2 * angles.shape[-1] > N:
        raise ValueError(f"mamba3 scan: {pairing} pairing needs 2*S <= N")
    psi = None
    if R > 1:  # the kernels always scale x per rank for MIMO (ones when not given)
        psi = mimo_x if mimo_x is not None else v.new_ones(H, R, v.shape[-1], dtype=torch.float32)
        psi = psi.contiguous()
    if fast is None:
        fast = v.dtype in (torch.bfloat16, torch.float16)
    cu = None if cu_seqlens is None else cu_seqlens.to(device=q.device, dtype=torch.int64)
    # only packed or zero-length calls can hold empty sequences (which keep their state)
    empty = None
    if cu is not None or L == 0:
        lengths = cu[1:] - cu[:-1] if cu is not None else torch.zeros(B, device=q.device)
        empty = (lengths == 0).view(-1, 1, 1)  # (nseq, 1, 1)
    s0 = None
    if initial_state is not None:
        s0 = _relative_initial_state(
            initial_state, dt, trap, angles is not None, cu, empty, psi, pairing
        )
    y, total_angle, end_state, _ = scan_op(
        _c(q),
        _c(k),
        _c(v),
        adt,
        dt,
        trap,
        q_bias.to(torch.float32).contiguous(),
        k_bias.to(torch.float32).contiguous(),
        _c(angles),
        None if D is None else D.contiguous(),
        psi,
        s0,
        cu,
        kernel_chunk(chunk_size, R, N, v.shape[-1], bool(fast)),
        bool(fast),
        pairing == "halves",
    )
    if not return_state:
        return y, None
    state = _absolute_end_state(
        total_angle, end_state, k, v, k_bias, angles is not None, initial_state, cu, empty, G,
        pairing,
    )  # fmt: skip
    return y, state


def _relative_initial_state(
    st: Mamba3State, dt: Tensor, trap: Tensor | None, rotate: bool, cu, empty, psi, pairing
) -> Tensor:
    """The initial state in the kernels' frame: the first token's trapezoid term of the
    previous token added (the "pre-added" state), rotated back by the initial angle,
    de-interleaved; (sequences, H, P, N) float32."""
    dt0, _ = _first_last(dt.transpose(1, 2), cu)  # (nseq, H)
    lam0 = (
        torch.sigmoid(_first_last(trap.transpose(1, 2), cu)[0].float()) if trap is not None else 1.0
    )
    eta0 = (1.0 - lam0) * dt0.float()
    if empty is not None:
        eta0 = eta0.masked_fill(empty[:, :, 0], 0.0)
    if psi is None:
        kv = st.v.float()[..., :, None] * st.k[:, 0].float()[..., None, :]
    else:  # sum_r (v psi_r) k_r^T
        kv = torch.einsum("shp,hrp,srhn->shpn", st.v.float(), psi.float(), st.k.float())
    h0 = st.ssm.float() + eta0[..., None, None] * kv
    if rotate:
        h0 = rotate_pairs(h0, -st.angle.float()[:, :, None, :], pairing)
    return _deinterleave(h0, pairing).contiguous()


def _absolute_end_state(
    total_angle,
    end_state,
    k,
    v,
    k_bias,
    rotate: bool,
    st: Mamba3State | None,
    cu,
    empty,
    G: int,
    pairing: str,
) -> Mamba3State:
    """The end state back in the absolute frame, with every sequence's last key (biased,
    rotated) and value; empty packed sequences keep their initial state."""
    nseq, H = end_state.shape[0], end_state.shape[1]
    f32 = torch.float32
    ia = st.angle.float() if st is not None else None
    if rotate:
        angle = wrap_angle(total_angle if ia is None else ia + total_angle)
    else:
        angle = ia if ia is not None else torch.zeros(nseq, H, 0, dtype=f32, device=k.device)
    ssm = _interleave(end_state, pairing)
    # the last token's key per rank, biased and rotated: (seqs, R, H, N)
    kl = _first_last(k, cu)[1].float().repeat_interleave(H // G, dim=2)
    kl = kl + k_bias.float().transpose(0, 1)
    if rotate:
        ssm = rotate_pairs(ssm, angle[:, :, None, :], pairing)
        kl = rotate_pairs(kl, angle[:, None], pairing)
    vl = _first_last(v, cu)[1]
    if empty is not None and st is not None:
        kl = torch.where(empty[:, None], st.k.float(), kl)
        vl = torch.where(empty, st.v.to(v.dtype), vl)
        ssm = torch.where(empty[..., None], st.ssm.float(), ssm)
    elif empty is not None:
        kl = kl.masked_fill(empty[:, None], 0.0)
        vl = vl.masked_fill(empty, 0.0)
    return Mamba3State(angle, ssm, kl, vl)
