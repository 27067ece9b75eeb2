"""Kernels behind one dispatch point per op (``ops.py`` for Mamba-3, ``attention.py``)."""
