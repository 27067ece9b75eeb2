"""Mamba-3 SISO chunked scan on Triton (forward and backward).

* :mod:`.common`, :mod:`.forward`, :mod:`.backward`: the Triton kernels;
* :mod:`.launch`: launch options (tuned or from :mod:`hybridkit.kernels.config`), chunk plans;
* :mod:`.op`: the ``torch.library`` custom ops, their fake impls and autograd;
* :mod:`.scan`: :func:`mamba3_scan_triton`, the frame conversion around the op.

How the work is split (chunk-parallel everywhere except one element-wise pass over chunks), the
relative rotation frame and what limits the kernels are in ``docs/kernels.md``.
"""

from hybridkit.kernels.mamba3.siso.scan import mamba3_scan_triton, supports, unsupported_reason

__all__ = ["mamba3_scan_triton", "supports", "unsupported_reason"]
