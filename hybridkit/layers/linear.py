"""``Linear``: ``torch.nn.Linear`` whose forward goes through the linear dispatch point.

Same parameters, names, initialisation and state dict as ``nn.Linear`` (it is one); only the
product may run elsewhere: calls of at most 16 rows at inference (a decode step's projections
and head) can run our Triton kernel when the kernel setting ``skinny_linear`` is on
(:mod:`hybridkit.kernels.linear`). Training, prefill and ``torch.compile`` always run
``torch.nn.functional.linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridkit.kernels.linear import linear
from hybridkit.layers.norm import PendingNorm


class Linear(nn.Linear):
    """``nn.Linear`` through :func:`hybridkit.kernels.linear.linear`; its input may also be a
    :class:`~hybridkit.layers.norm.PendingNorm` (a block's add + pre-norm, folded into this
    product's launch where the kernel setting ``norm_linear`` allows)."""

    def forward(self, x: torch.Tensor | PendingNorm) -> torch.Tensor:
        if isinstance(x, PendingNorm):
            return x.project(self.weight, self.bias)
        return linear(x, self.weight, self.bias)
