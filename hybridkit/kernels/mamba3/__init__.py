"""Mamba-3 scan kernels: float64 reference, torch chunked path, and the dispatch point (ops)."""

from hybridkit.kernels.mamba3.state import Mamba3State

__all__ = ["Mamba3State"]
