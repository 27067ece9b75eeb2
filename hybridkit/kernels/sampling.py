"""Greedy token selection for the decode step: the argmax of each row of logits, the EOS
rule, and the token written into the output buffer, in one launch.

Why: in a CUDA-graph decode step the torch version is two to four small kernels after the
head (``argmax``, with EOS its ``where`` / ``|=``, ``index_copy_``), and ATen's argmax reduces a
32,000-wide row in a single block of threads that walks it serially: 10.8 us of a 0.74 ms token
on the H100 (``benchmarks/results/decode_profile_h100.md``), about what a whole projection of
the layer takes. Here one program per row loads its logits in one or a few wide tiles and
reduces them across all its warps.

Semantics are ``torch.argmax``'s, so that graph and eager decoding, and this kernel and the
torch path, pick the same tokens: the first index of the largest value, and the first NaN if a
row has one (torch orders NaN above everything).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridkit.compat import interpreting

__all__ = ["greedy_record"]

#: 1 (the default): :func:`greedy_record` runs the Triton kernel on CUDA tensors; 0: the torch
#: ops (``benchmarks/decode.py --launch sampling:GREEDY_KERNEL=0`` times the two; on the H100 the
#: 400M model's batch-1 token took 0.541 against 0.544 ms, ``decode_greedy_kernel_h100.md``).
GREEDY_KERNEL = 1
#: the widest tile one program loads at once, over 1,024 values per warp (32K: 32 warps, 32
#: values per thread; sm_90 compile: 64 registers, no spills, fp32 or bf16 logits; at 16 warps
#: the same tile took 128 registers and spilled)
MAX_BLOCK = 32768


@triton.jit
def _greedy_kernel(
    LOGITS, s_lb, TOKENS, s_tb, COUNT, DONE, NXT, V, eos,
    HAS_EOS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row: the row's argmax (first NaN, else first largest value), then the EOS
    rule and the store of the token at column ``COUNT`` of ``TOKENS``."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    row = LOGITS + b * s_lb
    best_v = float("-inf")
    best_i = 0
    first_nan = V
    for start in range(0, V, BLOCK):
        idx = start + offs
        mask = idx < V
        x = tl.load(row + idx, mask=mask, other=float("-inf")).to(tl.float32)
        nan = x != x
        first_nan = tl.minimum(first_nan, tl.min(tl.where(nan & mask, idx, V), axis=0))
        v, i = tl.max(
            tl.where(nan, float("-inf"), x), axis=0, return_indices=True,
            return_indices_tie_break_left=True,
        )  # fmt: skip
        take = v > best_v  # strictly: an equal value in a later tile is not the first
        best_i = tl.where(take, start + i, best_i)
        best_v = tl.where(take, v, best_v)
    token = tl.where(first_nan < V, first_nan, best_i).to(tl.int64)
    if HAS_EOS:
        done = tl.load(DONE + b) != 0
        token = tl.where(done, eos, token)
        tl.store(DONE + b, (done | (token == eos)).to(tl.uint8))
    tl.store(NXT + b, token)
    tl.store(TOKENS + b * s_tb + tl.load(COUNT), token)


def _torch_greedy(
    logits: Tensor, tokens: Tensor, count: Tensor, done: Tensor | None, eos_id: int | None
) -> Tensor:
    nxt = logits.argmax(dim=-1)
    if eos_id is not None:
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        done |= nxt == eos_id
    tokens.index_copy_(1, count, nxt[:, None])
    return nxt


def greedy_record(
    logits: Tensor,
    tokens: Tensor,
    count: Tensor,
    done: Tensor | None = None,
    eos_id: int | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Greedy next tokens (B,) from ``logits`` (B, V), written also to ``tokens[:, count]``.

    With ``eos_id``, rows whose ``done`` flag is set get ``eos_id`` and ``done`` is updated in
    place (``done |= token == eos_id``), as the decode loop's EOS rule does. ``count`` is a
    one-element int64 device tensor (the column), so a captured graph replays with a new one.
    Same tokens from the kernel and the torch ops. ``backend``: ``auto`` (the kernel for CUDA
    tensors while ``GREEDY_KERNEL`` is 1, outside ``torch.compile``), ``triton`` (the kernel;
    on the CPU under ``TRITON_INTERPRET=1``, as the tests run it) or ``torch``."""
    if logits.dim() != 2 or tokens.dim() != 2 or logits.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"greedy_record: logits (B, V) and tokens (B, n) expected, got "
            f"{tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    if (eos_id is None) != (done is None):
        raise ValueError("greedy_record: pass done and eos_id together")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"greedy_record: backend {backend!r}: allowed auto, triton, torch")
    if backend == "auto":
        kernel = bool(GREEDY_KERNEL) and logits.is_cuda and not torch.compiler.is_compiling()
        backend = "triton" if kernel else "torch"
    if backend == "triton" and not (logits.is_cuda or interpreting()):
        raise ValueError(
            "greedy_record: the triton backend needs CUDA tensors or TRITON_INTERPRET=1"
        )
    if backend == "torch" or logits.shape[1] == 0 or tokens.stride(1) != 1:
        return _torch_greedy(logits, tokens, count, done, eos_id)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    batch, vocab = logits.shape
    nxt = torch.empty(batch, dtype=torch.long, device=logits.device)
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK)
    flags = done.view(torch.uint8) if done is not None else nxt
    _greedy_kernel[(batch,)](
        logits, logits.stride(0), tokens, tokens.stride(0), count, flags, nxt, vocab,
        0 if eos_id is None else int(eos_id),
        HAS_EOS=eos_id is not None, BLOCK=block,
        num_warps=1 if interpreting() else max(1, min(32, block // 1024)),
    )  # fmt: skip
    return nxt
