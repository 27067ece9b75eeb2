"""The one dispatch point for the Mamba-3 scan: layers call these, never a kernel directly.

Tensor layout (spec 3.2, with an explicit rank axis R so SISO is simply R = 1):

* ``q``, ``k``: (B, L, R, G, N), BCNorm applied, bias not yet added, unrotated;
* ``v``: (B, L, H, P); ``adt``, ``dt``, ``trap``: (B, H, L); biases (H, R, N);
* ``angles``: (B, L, H, S) raw angle projection (None: no rotation); ``D``: (H,);
* ``mimo_x``: (H, R, P) element-wise scaling of x per rank (None: ones).

Every backend returns ``y`` (B, L, R, H, P), the per-rank SSM output including the D skip and
before gating, and the final :class:`Mamba3State`. New backends (Triton, CuTe) are added here
and nowhere else, so layers never change when a kernel does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybridkit.kernels.mamba3 import chunked, reference
from hybridkit.kernels.mamba3.state import Mamba3State

BACKENDS = ("auto", "reference", "chunked", "triton")

ScanFn = Callable[..., tuple[torch.Tensor, Mamba3State]]


def resolve_backend(
    backend: str,
    device: torch.device | str | None = None,
    length: int = 2,
    rank: int = 1,
    triton_ok: bool = True,
) -> str:
    """Name of the implementation ``backend`` runs for a call of ``length`` tokens on ``device``.

    ``auto``: one token (decode) goes through the sequential recurrence, which is exactly the
    single-step update; longer SISO inputs (``rank == 1``) on a CUDA device through the Triton
    kernels (when ``triton_ok``: no float64, no mimo_x, power-of-two sizes), everything else
    through the chunked path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown Mamba-3 backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        if length == 1:
            return "reference"
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return "triton" if (on_cuda and rank == 1 and triton_ok) else "chunked"
    return backend


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
    triton_ok = True
    if backend == "auto" and q.device.type == "cuda":
        from hybridkit.kernels.mamba3 import siso_op

        triton_ok = siso_op.supports(q, v, mimo_x, pairing) and chunk_size in (16, 32, 64, 128)
    name = resolve_backend(backend, q.device, q.shape[1], q.shape[2], triton_ok)
    kwargs = dict(pairing=pairing, initial_state=initial_state, cu_seqlens=cu_seqlens)
    args = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, mimo_x)
    if name == "reference":
        y, state = reference.mamba3_scan_sequential(*args, **kwargs)
    elif name == "triton":
        from hybridkit.kernels.mamba3.siso_op import mamba3_scan_triton

        return mamba3_scan_triton(*args, **kwargs, chunk_size=chunk_size, return_state=return_state)
    else:
        y, state = chunked.mamba3_scan_chunked(*args, **kwargs, chunk_size=chunk_size)
    return y, (state if return_state else None)
