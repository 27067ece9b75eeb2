"""Tile sizes of the MIMO output kernels, importable without Triton (the dispatch point asks
whether a call fits before any kernel module is loaded)."""

from __future__ import annotations

#: (tokens x R x channels) elements of the forward's tile, and the most one token's R x group
#: channels may take for the kernels to run a call (the launches: ``triton_kernels``)
TILE_ELEMENTS = 2048


def tile(rank: int, group_size: int, elements: int = TILE_ELEMENTS) -> tuple[int, int] | None:
    """(tokens, channels) of a kernel tile of about ``elements`` for this rank and group (at
    least one token), or None when the kernels cannot run it (rank not a power of two, or one
    token's R x group wider than ``TILE_ELEMENTS``)."""
    if rank < 1 or rank & (rank - 1) or group_size < 1:
        return None
    block_n = 1 << (group_size - 1).bit_length()
    if rank * block_n > TILE_ELEMENTS:
        return None
    return max(1, elements // (rank * block_n)), block_n
