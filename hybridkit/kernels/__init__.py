"""Kernels behind one dispatch point per op.

* :mod:`.mamba3`: the Mamba-3 scan (``ops.py`` dispatches to the float64 reference, the torch
  chunked path or the Triton kernels under ``chunkscan/``);
* :mod:`.attention`: attention (``ops.py`` dispatches to FlashAttention-4, sdpa or the
  reference);
* :mod:`.config`: the launch settings of our Triton kernels.

Layers call the dispatch points only; ``docs/kernels.md`` describes the kernels.
"""
