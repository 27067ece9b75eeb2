"""The one dispatch point for the Mamba-3 scan and decode step: layers call these, never a
kernel directly.

Tensor layout (docs/mamba3.md 3.2, with an explicit rank axis R so SISO is simply R = 1):

* ``q``, ``k``: (B, L, R, G, N), BCNorm applied, bias not yet added, unrotated;
* ``v``: (B, L, H, P); ``adt``, ``dt``, ``trap``: (B, H, L); biases (H, R, N);
* ``angles``: (B, L, H, S) raw angle projection (None: no rotation); ``D``: (H,);
* ``mimo_x``: (H, R, P) element-wise scaling of x per rank (None: ones).

Every backend returns ``y`` (B, L, R, H, P), the per-rank SSM output including the D skip and
before gating, and the final :class:`Mamba3State`. New backends (Triton, CuTe) are added here
and nowhere else, so layers never change when a kernel does.

The decode step (:func:`mamba3_step`, one token per sequence, state updated in place) has its
own plan (:func:`plan_step`): the fused Triton kernel of :mod:`.step.triton_step` on CUDA, the
torch definition of :mod:`.step.reference` elsewhere and in float64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from hybridkit.compat import HAVE_TRITON, TRITON_UNUSABLE, interpreting
from hybridkit.errors import HybridkitError
from hybridkit.kernels.mamba3 import chunked, reference
from hybridkit.kernels.mamba3.state import Mamba3State
from hybridkit.kernels.mamba3.step import StepInputs, StepWeights, mamba3_step_reference

BACKENDS = ("auto", "reference", "chunked", "triton", "cute")

ScanFn = Callable[..., tuple[torch.Tensor, Mamba3State]]


class ScanPlan(NamedTuple):
    """What a scan call runs: the backend, the chunk it uses, and why ``auto`` chose it."""

    backend: str
    chunk_size: int
    reason: str = ""

    def describe(self) -> str:
        """``triton``, ``triton (chunk 32)`` when narrower than asked, ``chunked (why)``."""
        text = self.backend
        if self.backend in ("triton", "chunked") and self.reason:
            text += f" ({self.reason})"
        return text


def _require_triton() -> None:
    """An explicit ``mixer.backend: triton`` where the kernels cannot run: say why, by name."""
    if TRITON_UNUSABLE:
        raise HybridkitError(
            f"mixer.backend 'triton': {TRITON_UNUSABLE}; allowed here: auto, chunked, reference"
        )


def plan_scan(
    backend: str,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype,
    length: int,
    rank: int,
    d_state: int,
    headdim: int,
    chunk_size: int,
    pairing: str = "interleaved",
    has_mimo_x: bool = False,
) -> ScanPlan:
    """The implementation ``backend`` runs for a call with these static properties.

    ``auto``: one token (decode) goes through the sequential recurrence, which is exactly the
    single-step update; longer inputs on a CUDA device through the Triton kernels when they
    cover the call (SISO or MIMO rank 2 / 4 / 8, no float64, power-of-two sizes, chunk x rank
    a configured chunk height), everything else through the chunked torch path. Layers and
    ``hybridkit show`` ask this function, so what they report is what runs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown Mamba-3 backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    fast = dtype in (torch.bfloat16, torch.float16)
    if backend == "cute":  # a decode-step backend only: the scan picks as for auto
        backend = "auto"
    if backend == "triton":
        from hybridkit.kernels.mamba3.chunkscan import kernel_chunk

        where = torch.device(device).type if device is not None else None
        if where not in (None, "cuda", "meta") and not interpreting():
            raise HybridkitError(
                f"mixer.backend 'triton' runs on a CUDA device (or on the CPU through the Triton "
                f"interpreter, TRITON_INTERPRET=1), not on {where}; allowed here: auto, chunked, "
                "reference"
            )
        _require_triton()

        return ScanPlan(backend, kernel_chunk(chunk_size, rank, d_state, headdim, fast))
    if backend != "auto":
        return ScanPlan(backend, chunk_size)
    if length == 1:
        return ScanPlan("reference", chunk_size, "one token")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if not on_cuda:
        return ScanPlan("chunked", chunk_size)
    if TRITON_UNUSABLE:
        return ScanPlan("chunked", chunk_size, TRITON_UNUSABLE)
    from hybridkit.kernels.mamba3.chunkscan import (
        chunk_height_reason,
        kernel_chunk,
        unsupported_reason,
    )

    why = unsupported_reason(rank, d_state, headdim, dtype, True, pairing)
    if why is None and has_mimo_x and rank == 1:
        why = "mimo_x scaling with rank 1"
    if why is None:
        why = chunk_height_reason(chunk_size, rank)
    if why is not None:
        return ScanPlan("chunked", chunk_size, why)
    chunk = kernel_chunk(chunk_size, rank, d_state, headdim, fast)
    return ScanPlan("triton", chunk, f"chunk {chunk}" if chunk != chunk_size else "")


def mamba3_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    adt: torch.Tensor,
    dt: torch.Tensor,
    trap: torch.Tensor | None,
    q_bias: torch.Tensor,
    k_bias: torch.Tensor,
    angles: torch.Tensor | None,
    D: torch.Tensor | None,
    mimo_x: torch.Tensor | None = None,
    *,
    pairing: str = "interleaved",
    initial_state: Mamba3State | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
    return_state: bool = True,
) -> tuple[torch.Tensor, Mamba3State | None]:
    """Run the Mamba-3 SSM core (see the module docstring for shapes).

    ``return_state=False`` returns None instead of the final state (every backend), which lets
    the Triton path skip the end-state conversion when nothing reads it (training)."""
    dtype = torch.float64 if torch.float64 in (q.dtype, v.dtype) else v.dtype
    plan = plan_scan(
        backend,
        device=q.device,
        dtype=dtype,
        length=q.shape[1],
        rank=q.shape[2],
        d_state=q.shape[-1],
        headdim=v.shape[-1],
        chunk_size=chunk_size,
        pairing=pairing,
        has_mimo_x=mimo_x is not None,
    )
    kwargs = dict(pairing=pairing, initial_state=initial_state, cu_seqlens=cu_seqlens)
    args = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, mimo_x)
    if plan.backend == "reference":
        y, state = reference.mamba3_scan_sequential(*args, **kwargs)
    elif plan.backend == "triton":
        from hybridkit.kernels.mamba3.chunkscan import mamba3_scan_triton

        return mamba3_scan_triton(*args, **kwargs, chunk_size=chunk_size, return_state=return_state)
    else:
        y, state = chunked.mamba3_scan_chunked(*args, **kwargs, chunk_size=chunk_size)
    return y, (state if return_state else None)


STEP_BACKENDS = ("reference", "triton", "cute")


class StepPlan(NamedTuple):
    """What a decode step runs and, when it is not what was asked for, why."""

    backend: str
    reason: str = ""

    def describe(self) -> str:
        return f"{self.backend} ({self.reason})" if self.reason else self.backend


@functools.cache
def cute_unavailable() -> str | None:
    """Why the CuTe DSL step cannot be imported here (None when it can). Imports ``cutlass``
    only when asked, so CPU CI and ``hybridkit show`` never pay for it."""
    try:
        import cutlass.cute  # noqa: F401
    except Exception as exc:  # ImportError, or a broken wheel raising anything else
        return f"nvidia-cutlass-dsl not importable: {type(exc).__name__}"
    return None


def plan_step(
    backend: str, *, device: torch.device | str | None, dtype: torch.dtype, rank: int = 1
) -> StepPlan:
    """The decode-step implementation for a layer's ``backend`` setting on ``device``.

    ``auto`` and ``triton`` run the fused Triton kernel on CUDA for bf16/fp16/fp32 models (an
    explicit ``triton`` also on the CPU, through the interpreter, for tests); ``cute`` runs the
    CuTe DSL state update (SISO, CUDA, the library importable; else the Triton step, with the
    reason); float64 models, CPUs and the ``reference`` / ``chunked`` settings run the torch
    reference step, which is exactly one token of the sequential recurrence."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown Mamba-3 backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend in ("reference", "chunked") or dtype == torch.float64:
        return StepPlan("reference")
    if backend == "triton":
        _require_triton()
        return StepPlan("triton")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if not (on_cuda and HAVE_TRITON):
        return StepPlan("reference")
    if backend == "cute":
        why = "cute step is SISO only" if rank != 1 else cute_unavailable()
        return StepPlan("triton", why) if why else StepPlan("cute")
    return StepPlan("triton")


def mamba3_step(
    inputs: StepInputs, state: Mamba3State, weights: StepWeights, *, backend: str = "auto"
) -> torch.Tensor:
    """One decode step of a Mamba-3 layer, ``state`` updated in place.

    Shapes and outputs are those of :func:`.step.reference.mamba3_step_reference`: the gated
    (B, H, P) output, or y per rank (B, R, H, P) when ``inputs.z`` is None."""
    x = inputs.x
    dtype = torch.float64 if torch.float64 in (x.dtype, state.ssm.dtype) else x.dtype
    plan = plan_step(backend, device=x.device, dtype=dtype, rank=inputs.bk.shape[1])
    if plan.backend == "triton":
        from hybridkit.kernels.mamba3.step.triton_step import mamba3_step_triton

        return mamba3_step_triton(inputs, state, weights)
    if plan.backend == "cute":
        from hybridkit.kernels.mamba3.step.cute_step import mamba3_step_cute

        return mamba3_step_cute(inputs, state, weights)
    return mamba3_step_reference(inputs, state, weights)
