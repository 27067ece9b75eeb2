"""The token embedding's lookup, with a backward that stays fast under compiled deterministic
training: the one embedding dispatch point.

Why: Inductor lowers the embedding's backward to ``index_put_(accumulate=True)``. With
``torch.use_deterministic_algorithms(True)`` (``train.deterministic``) it hands that op to
ATen's sort-based CUDA kernel, in which one warp adds up *every* occurrence of a token id one
after the other. A batch in which one id dominates then serialises: MQAR's filler id 0 fills
91 % of its 32,768 positions per step at D 8 (29,696), and a compiled deterministic MQAR step
took 24 ms on the H100 against 5.5 ms without the mode, the same ~18 ms for the attention-only
and the Mamba-3-only model (benchmarks/results/mqar_step_time_h100.md). Autograd's own
``embedding_dense_backward`` (what eager mode runs) is deterministic by construction and splits a
long run of one id into segments of a few rows summed in parallel; only the segments' partial
sums are then added in turn (about 3,000 for MQAR's filler id instead of 29,696 rows). With it
the compiled deterministic MQAR step took 12.5 ms (attention) and 15.0 ms (Mamba-3) instead of
24.0 and 29.6 (H100, same file).

So under ``torch.compile`` *and* deterministic mode the lookup is an opaque custom op whose
backward is another custom op calling ``embedding_dense_backward``: the compiled graph keeps
the eager kernel. Everywhere else the lookup is the plain ``F.embedding`` (in a compiled
non-deterministic graph Inductor's atomic scatter is fast), so nothing else changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["embedding_lookup"]


@torch.library.custom_op("hybridkit::embedding_fwd", mutates_args=())
def _fwd_op(ids: Tensor, weight: Tensor) -> Tensor:
    return F.embedding(ids, weight)


@_fwd_op.register_fake
def _(ids, weight):
    return weight.new_empty((*ids.shape, weight.shape[1]))


@torch.library.custom_op("hybridkit::embedding_bwd", mutates_args=())
def _bwd_op(grad: Tensor, ids: Tensor, num_rows: int) -> Tensor:
    # padding_idx -1 (none) and no frequency scaling: nn.Embedding's defaults, which the model
    # uses
    return torch.ops.aten.embedding_dense_backward(grad, ids, num_rows, -1, False)


@_bwd_op.register_fake
def _(grad, ids, num_rows):
    return grad.new_empty((num_rows, grad.shape[-1]))


def _setup_context(ctx, inputs, output) -> None:
    ids, weight = inputs
    ctx.save_for_backward(ids)
    ctx.num_rows = weight.shape[0]


def _backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    return None, torch.ops.hybridkit.embedding_bwd(grad.contiguous(), ids, ctx.num_rows)


torch.library.register_autograd("hybridkit::embedding_fwd", _backward, setup_context=_setup_context)


def embedding_lookup(ids: Tensor, weight: Tensor) -> Tensor:
    """``weight[ids]`` with the gradient of ``F.embedding`` (module docstring: which path runs
    when). Dynamo reads the deterministic flag while tracing and guards on it, so a change of
    mode recompiles instead of reusing the other mode's graph."""
    if torch.compiler.is_compiling() and torch.are_deterministic_algorithms_enabled():
        return torch.ops.hybridkit.embedding_fwd(ids, weight)
    return F.embedding(ids, weight)
