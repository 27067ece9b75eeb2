"""The chunked Mamba-3 scan on Triton, forward and backward, for SISO and MIMO.

One set of kernels serves every rank R: a chunk of C tokens is processed as C * R rows (one per
token and rank), so SISO is R = 1 and MIMO runs the same algorithm with a block-causal mask (the
R ranks of a token see each other) and per-token sums over ranks (``docs/mamba3.md`` §3.9).

* :mod:`.common`, :mod:`.forward`, :mod:`.backward`: the Triton kernels;
* :mod:`.launch`: launch options (tuned or from :mod:`hybridkit.kernels.config`), chunk plans;
* :mod:`.op`: the ``torch.library`` custom ops, their fake impls and autograd;
* :mod:`.scan`: :func:`mamba3_scan_triton`, the frame conversion around the op.

How the work is split (chunk-parallel everywhere except one element-wise pass over chunks), the
relative rotation frame and what limits the kernels are in ``docs/kernels.md``.
"""

from hybridkit.kernels.mamba3.chunkscan.scan import (
    TRITON_RANKS,
    chunk_height_reason,
    kernel_chunk,
    mamba3_scan_triton,
    supports,
    unsupported_reason,
)

__all__ = [
    "TRITON_RANKS",
    "chunk_height_reason",
    "kernel_chunk",
    "mamba3_scan_triton",
    "supports",
    "unsupported_reason",
]
