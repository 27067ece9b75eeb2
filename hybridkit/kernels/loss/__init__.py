"""Cross-entropy of a linear head without the (tokens x vocab) logits: the one loss dispatch point.

Why: at 4 x 4096 tokens and a 32k vocabulary the plain path keeps bf16 logits (1 GB), their
fp32 copy (2 GB) and the fp32 gradient of the logits (2 GB) alive around the backward; that is
most of the difference between the measured 33 GB and the 35 GB target, and their reads and
writes are pure memory traffic. :func:`linear_cross_entropy` computes the same loss from the
final hidden states and the head weight, ``chunk_tokens`` rows at a time: each chunk's logits
live only inside the chunk (in the matmul dtype, their log-sum-exp in float32), and while they
exist the forward also forms the chunk's ``softmax - target`` and adds its products with the
weight and the hidden rows to the two gradients of the summed loss. The backward scales those
by the incoming gradient: no head matmul is recomputed and no (tokens x vocab) tensor outlives
its chunk. (Until 2026-12-07 the backward recomputed each chunk's logits, one extra head
matmul; under ``torch.compile`` that recompute merged with the forward's matmul and the chunks'
buffers were saved between the passes instead.) A forward without gradients (``no_grad``, or
inputs that do not require them) skips the gradient work.

Numerics match ``F.cross_entropy((hidden @ weight.T).float(), ...)`` with ``reduction="sum"``
(``ignore_index`` rows contribute nothing; ``label_smoothing`` as torch defines it); the
precision of the logits is the caller's: under CUDA autocast the chunks are computed in the
autocast dtype, exactly as ``lm_head`` would have produced them.

``backend`` decides who does each chunk's element-wise work between its matmuls: ``torch``
(ATen ops over a float32 copy of the chunk, or, traced by ``torch.compile``, an expression
Inductor fuses), ``triton`` (:mod:`.triton_kernels`: one pass over the chunk's logits forward,
one in place backward), or ``auto``: ``triton`` for CUDA tensors in eager mode and inside the
``loss_op`` custom ops (unless the kernel setting ``loss_kernels`` is off), ``torch`` on the CPU,
for float64 and where the Function is traced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from hybridkit.compat import HAVE_TRITON, interpreting, trace_constant
from hybridkit.kernels.config import loss_kernels_enabled, loss_op_enabled

__all__ = [
    "BACKENDS",
    "cross_entropy_sum",
    "linear_cross_entropy",
    "resolve_backend",
    "scored_rows",
]

BACKENDS = ("auto", "torch", "triton")


@trace_constant
def _interpreting() -> bool:
    """:func:`interpreting`, a trace-time constant under ``torch.compile``."""
    return interpreting()


def resolve_backend(backend: str, hidden: Tensor, dtype: torch.dtype) -> str:
    """The backend that runs for ``backend`` on ``hidden`` with logits of ``dtype`` (module
    docstring); ``triton`` where Triton cannot run is an error, not a silent fallback."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown loss backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    runs = HAVE_TRITON and (hidden.is_cuda or _interpreting()) and dtype != torch.float64
    if backend == "auto":
        return "triton" if runs and hidden.is_cuda and loss_kernels_enabled() else "torch"
    if backend == "triton" and not runs:
        raise ValueError(
            "loss backend 'triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1) and "
            f"logits other than float64; got {hidden.device.type} / {dtype}"
        )
    return backend


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``hidden @ weight.T`` would run in at this point (autocast included)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_stats(
    logits: Tensor, targets: Tensor, ignore_index: int, smoothing: float, backend: str
) -> tuple[Tensor, Tensor]:
    """Per-row (loss, log-sum-exp) of one chunk's logits, in float32 (or float64)."""
    if backend == "triton":
        from hybridkit.kernels.loss.triton_kernels import ce_forward

        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        ce_forward(logits, targets, loss, lse, ignore_index, smoothing)
        return loss, lse
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lf = logits.to(acc)
    lse = torch.logsumexp(lf, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    target_logit = lf.gather(1, safe[:, None])[:, 0]
    loss = lse - target_logit
    if smoothing:
        loss = (1.0 - smoothing) * loss + smoothing * (lse - lf.mean(dim=-1))
    return torch.where(valid, loss, torch.zeros_like(loss)), lse


def _chunk_grad(
    logits: Tensor,
    t_c: Tensor,
    lse_c: Tensor,
    scale: Tensor,
    ignore_index: int,
    smoothing: float,
    backend: str,
) -> Tensor:
    """d loss / d logits of one chunk = scale * (softmax - (1 - s) onehot(target) - s / V),
    zero on ignored rows, in the logits' dtype (``logits`` may be overwritten)."""
    if backend == "triton":  # in place, one pass
        from hybridkit.kernels.loss.triton_kernels import ce_backward_

        return ce_backward_(logits, t_c, lse_c, scale.reshape(1), ignore_index, smoothing)
    vocab, acc = logits.shape[1], lse_c.dtype
    valid = t_c != ignore_index
    safe = torch.where(valid, t_c, torch.zeros_like(t_c))
    row_scale = (valid.to(acc) * scale)[:, None]
    if torch.compiler.is_compiling():
        # one element-wise expression: Inductor fuses it into one pass from the logits to
        # the gradient in the matmul dtype. The eager form's in-place scatter_add_ is a
        # mutation it does not fuse, so the float32 gradient was written and read back
        # (two 786 MB passes per 4,096-token chunk of a 32k vocabulary,
        # benchmarks/results/train_kernels_h100.md)
        cols = torch.arange(vocab, device=logits.device)
        onehot = torch.where(cols[None, :] == safe[:, None], smoothing - 1.0, 0.0)
        grad = torch.exp(logits.to(acc) - lse_c[:, None]) + onehot.to(acc)
        if smoothing:
            grad = grad - smoothing / vocab
        return (grad * row_scale).to(logits.dtype)
    # in place in one float32 chunk buffer: no temporaries of its size
    grad = logits.to(acc)
    grad.sub_(lse_c[:, None]).exp_()
    grad.scatter_add_(1, safe[:, None], torch.full_like(grad[:, :1], smoothing - 1.0))
    if smoothing:
        grad.sub_(smoothing / vocab)
    return grad.mul_(row_scale).to(logits.dtype)


def _forward_impl(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_tokens: int,
    ignore_index: int,
    smoothing: float,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The summed loss and the gradients of that sum with respect to ``hidden`` (in its dtype)
    and ``weight`` (float32, float64 for float64), chunk by chunk; a gradient not needed is an
    empty tensor. Why the gradients here: the loss is the graph's last node, so its backward
    always runs with the logits the forward just had, and each chunk's gradient needs nothing
    but them and the chunk's log-sum-exp. Formed while the logits exist, there is no second head
    matmul to recompute them and nothing of (tokens x vocab) size outlives its chunk; the
    backward only scales the two sums by the incoming gradient."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    total = hidden.new_zeros((), dtype=acc)
    grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    if need_weight:
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    else:
        grad_weight = weight.new_empty(0, dtype=acc)
    one = hidden.new_ones((), dtype=acc)
    rows = zip(
        hidden.split(chunk_tokens),
        targets.split(chunk_tokens),
        grad_hidden.split(chunk_tokens) if need_hidden else hidden.split(chunk_tokens),
    )
    for h_c, t_c, gh_c in rows:
        logits = h_c @ weight.t()
        loss, lse = _chunk_stats(logits, t_c, ignore_index, smoothing, backend)
        total = total + loss.sum()
        if need_hidden or need_weight:
            grad = _chunk_grad(logits, t_c, lse, one, ignore_index, smoothing, backend)
            if need_hidden:
                gh_c.copy_(grad @ weight)
            if need_weight:
                grad_weight += (grad.t() @ h_c).to(acc)
    return total, grad_hidden, grad_weight


def _scaled(grad_total: Tensor, grad: Tensor, dtype: torch.dtype, needed: bool) -> Tensor | None:
    """``grad_total * grad`` in ``dtype`` (computed in ``grad``'s precision or float32)."""
    if not needed:
        return None
    acc = torch.promote_types(grad.dtype, torch.float32)
    return (grad.to(acc) * grad_total.to(acc)).to(dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` computed chunk by chunk (module docstring).

    ``hidden`` (T, D) and ``weight`` (V, D) arrive already in the matmul dtype, so the forward
    runs the matmuls autocast would; it also forms both gradients (:func:`_forward_impl`).
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, targets, chunk_tokens, ignore_index, smoothing, backend, nh, nw
    ):  # fmt: skip
        total, grad_hidden, grad_weight = _forward_impl(
            hidden, weight, targets, chunk_tokens, ignore_index, smoothing, backend, nh, nw
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.grad_info = (hidden.dtype, weight.dtype, nh, nw)
        return total

    @staticmethod
    @once_differentiable  # the saved gradients are constants: a second derivative is an error
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        h_dtype, w_dtype, nh, nw = ctx.grad_info
        return (
            _scaled(grad_total, grad_hidden, h_dtype, nh),
            _scaled(grad_total, grad_weight, w_dtype, nw),
            *([None] * 7),
        )


# Under torch.compile the Function above is traced into the joint graph (the default), where
# Inductor fuses each chunk's element-wise work in torch. With the kernel setting ``loss_op``
# the same forward runs as one opaque custom op instead (the chunk kernels inside it, and a
# graph that cannot reorganise the chunks); its outputs' gradients are plain torch products.
_fwd_op = torch.library.custom_op("hybridkit::linear_ce_fwd", _forward_impl, mutates_args=())


@_fwd_op.register_fake
def _(hidden, weight, targets, chunk_tokens, ignore_index, smoothing, backend, nh, nw):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grad_hidden = torch.empty_like(hidden) if nh else hidden.new_empty(0)
    grad_weight = torch.empty(weight.shape if nw else (0,), dtype=acc, device=weight.device)
    return hidden.new_empty((), dtype=acc), grad_hidden, grad_weight


def _setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1], output[2])  # the gradients only feed the backward
    ctx.save_for_backward(output[1], output[2])
    ctx.grad_info = (inputs[0].dtype, inputs[1].dtype, inputs[7], inputs[8])


def _backward(ctx, grad_total, _grad_hidden, _grad_weight):
    return _LinearCrossEntropy.backward(ctx, grad_total)


torch.library.register_autograd("hybridkit::linear_ce_fwd", _backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_tokens: int,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Summed cross-entropy of the logits ``hidden @ weight.T`` (never materialised in full).

    ``hidden`` (..., D), ``weight`` (V, D), ``targets`` (...) integer; returns a float32 scalar
    (float64 for float64 inputs), the sum over rows whose target is not ``ignore_index``.
    Eager: an autograd.Function; under ``torch.compile``: that Function traced into the graph
    (its chunks' element-wise work then always in torch, for Inductor to fuse), or with the
    kernel setting ``loss_op`` the same code as a pair of opaque custom ops (``fullgraph``
    holds), so the compiled graph cannot keep the chunks' logits. ``backend``: the module
    docstring.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    dtype = _matmul_dtype(hidden, weight)
    backend = resolve_backend(backend, hidden, dtype)
    ops = torch.compiler.is_compiling() and loss_op_enabled()
    if torch.compiler.is_compiling() and not ops:
        backend = "torch"  # traced: Inductor fuses the torch expression
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    device_type = hidden.device.type
    # the Function casts explicitly; autocast inside it would only re-cast the same tensors
    args = (
        h,
        weight.to(dtype),
        targets.reshape(-1),
        int(chunk_tokens),
        int(ignore_index),
        float(label_smoothing),
        backend,
        torch.is_grad_enabled() and h.requires_grad,
        torch.is_grad_enabled() and weight.requires_grad,
    )
    with torch.autocast(device_type, enabled=False):
        if ops:
            return torch.ops.hybridkit.linear_ce_fwd(*args)[0]
        return _LinearCrossEntropy.apply(*args)


def cross_entropy_sum(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_tokens: int | None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Summed cross-entropy of a linear head: chunked when ``chunk_tokens`` is set, else the
    plain ``F.cross_entropy`` over the full float32 logits (the reference, and the CPU default)."""
    if chunk_tokens is not None:
        return linear_cross_entropy(
            hidden,
            weight,
            targets,
            chunk_tokens=chunk_tokens,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
    logits = F.linear(hidden, weight)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


def scored_rows(targets: Tensor, ignore_index: int = -100, multiple: int = 1024) -> Tensor | None:
    """Flat indices of the positions of ``targets`` (any shape) that a loss scores, for
    gathering those rows before the final norm, the head and the loss; None when more than half
    of the positions are scored (then every row goes, as language modelling needs).

    Why: the synthetic tasks score only their answers (MQAR at D 8: 8 of 256 tokens), yet the
    head's matmuls and the (rows x vocab) float32 softmax work ran over every position. The
    summed loss is the same; an unscored row contributes nothing to it or to any gradient.

    The count is rounded up to a multiple of ``multiple`` (at most all positions) with further
    *unscored* positions, each index once: a task that scores the same number of positions in
    every batch (MQAR at one D) gives ``torch.compile`` one static shape, and distinct indices
    keep the gather's backward free of repeated rows (which a deterministic scatter would add
    up serially). Computed on the host from the batch's targets, before they move to the GPU.
    """
    flat = targets.reshape(-1)
    keep = flat != ignore_index
    n = int(keep.sum())
    if 2 * n > flat.numel():
        return None
    rows = torch.nonzero(keep).squeeze(1)
    size = min(-(-n // multiple) * multiple, flat.numel())
    if size > n:
        rows = torch.cat([rows, torch.nonzero(~keep).squeeze(1)[: size - n]])
    return rows
