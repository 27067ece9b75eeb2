"""The recurrent state a Mamba-3 layer hands from one call to the next (docs/mamba3.md 4.1)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Mamba3State(NamedTuple):
    """Recurrent state of one Mamba-3 layer after its last processed token.

    * ``angle`` (B, H, S) float32: cumulative rotation angle Theta (mod 2 pi).
    * ``ssm``   (B, H, P, N) float32: the true state h (not the chunk-boundary "pre-added" one).
    * ``k``     (B, R, H, N): the last token's key after BCNorm, bias and rotation, unscaled.
    * ``v``     (B, H, P): the last token's raw x (for MIMO *before* the psi scaling).

    ``k`` and ``v`` exist because the trapezoid term of the next token needs the previous key and
    value with the *next* token's coefficients (docs/mamba3.md 2.3). For varlen calls B is the
    number of sequences.
    """

    angle: torch.Tensor
    ssm: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @staticmethod
    def zeros(
        batch: int,
        nheads: int,
        headdim: int,
        d_state: int,
        n_angles: int,
        rank: int = 1,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Mamba3State:
        """A fresh state (everything zero); ``dtype`` applies to ``k`` and ``v``."""
        f32 = torch.float32 if dtype != torch.float64 else torch.float64
        return Mamba3State(
            angle=torch.zeros(batch, nheads, n_angles, dtype=f32, device=device),
            ssm=torch.zeros(batch, nheads, headdim, d_state, dtype=f32, device=device),
            k=torch.zeros(batch, rank, nheads, d_state, dtype=dtype, device=device),
            v=torch.zeros(batch, nheads, headdim, dtype=dtype, device=device),
        )

    def nbytes(self) -> int:
        """Bytes held by this state (all sequences)."""
        return sum(t.numel() * t.element_size() for t in self)
