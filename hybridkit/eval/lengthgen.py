"""Evaluate a model on a task's fixed evaluation sets at many lengths.

Every length is scored through the same code path as training (a full chunked forward over the
whole sequence). A small subset is *also* run through incremental inference -- a prefill up to
the first scored position, then one ``step`` per token -- to catch state hand-off or chunk-boundary
bugs that a full forward would never exercise (docs/tasks.md section 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hybridkit.runtime import autocast_for
from hybridkit.tasks.base import IGNORE_INDEX, Batch, Task
from hybridkit.tasks.metrics import Metrics, score

DEPTH_BINS = 10


@torch.no_grad()
def predict(model: torch.nn.Module, inputs: torch.Tensor, precision: str) -> torch.Tensor:
    """Argmax predictions (B, L) of a full forward pass."""
    device = next(model.parameters()).device
    with autocast_for(device, precision):
        return model(inputs.to(device)).argmax(-1).cpu()


@torch.no_grad()
def predict_incremental(model, inputs: torch.Tensor, start: int, precision: str) -> torch.Tensor:
    """Argmax predictions at positions >= ``start`` via prefill(inputs[:, :start]) + steps.

    The steps are generation's (:class:`~hybridkit.generation.DecodeRunner`, teacher-forced):
    static cache, and on CUDA one captured step replayed per token with no host sync, so this
    subset checks the decode path that ``generate`` runs. Autocast keeps no cache of cast
    weights here: a graph captured after the cache was filled would replay without the casts
    and read cast copies freed when the context ends."""
    from hybridkit.generation import DecodeRunner, Sampling

    device = next(model.parameters()).device
    inputs = inputs.to(device)
    b, length = inputs.shape
    preds = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    if start >= length:
        return preds
    with autocast_for(device, precision, cache=False):
        greedy = Sampling(temperature=0.0)
        runner = DecodeRunner(model, b, length, length - start, greedy, forced=True)
        runner.prefill(inputs[:, :start])
        preds[:, start:] = runner.force(inputs[:, start:]).cpu()
    return preds


def _row_exact(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    scored = targets != IGNORE_INDEX
    return ((preds == targets) | ~scored).all(dim=1) & scored.any(dim=1)


def depth_bins(depth) -> torch.Tensor:
    """Each needle depth's bin of ``DEPTH_BINS`` equal ones (1.0 in the last). The depths come
    as float32: 0.7 is 0.69999999, which fell into bin 6 with 0.6 and left bin 7 empty, so a
    depth within 1e-6 below a bin edge counts as on it."""
    depth = torch.as_tensor(depth, dtype=torch.float64)
    return torch.clamp((depth * DEPTH_BINS + 1e-6).floor().long(), min=0, max=DEPTH_BINS - 1)


def evaluate_length(
    model: torch.nn.Module,
    task: Task,
    length: int,
    *,
    batch_size: int = 64,
    precision: str = "auto",
    decode_examples: int = 8,
    decode_max_length: int = 1024,
) -> dict:
    """Metrics of one evaluation length (see :func:`evaluate_lengths`)."""
    data = task.eval_set(length)
    total = Metrics()
    preds_all = []
    for part in data.split(batch_size):
        preds = predict(model, part.inputs, precision)
        preds_all.append(preds)
        total = total + score(preds, part)
    preds = torch.cat(preds_all)
    result = {
        "length": length,
        "tokens": int(data.inputs.shape[1]),
        **total.as_dict(task.chance),
    }
    if "depth" in data.meta:
        exact = _row_exact(preds, data.targets)
        bins = depth_bins(data.meta["depth"])
        result["depth_ex_match"] = [
            float(exact[bins == i].double().mean()) if (bins == i).any() else None
            for i in range(DEPTH_BINS)
        ]
    n_dec = min(decode_examples, len(data))
    if n_dec and data.inputs.shape[1] <= decode_max_length:
        sub: Batch = data.select(slice(0, n_dec))
        scored_cols = (sub.targets != IGNORE_INDEX).any(dim=0).nonzero()
        start = int(scored_cols.min()) if len(scored_cols) else sub.inputs.shape[1]
        dec = predict_incremental(model, sub.inputs, start, precision)
        m = score(dec, sub)
        mask = sub.targets != IGNORE_INDEX
        agree = (dec[mask] == preds[:n_dec][mask]).double().mean().item() if mask.any() else 1.0
        result["decode"] = {
            "examples": n_dec,
            **m.as_dict(task.chance),
            "agree_with_forward": agree,
        }
    return result


def evaluate_lengths(
    model: torch.nn.Module,
    task: Task,
    lengths: Sequence[int],
    *,
    batch_size: int = 64,
    precision: str = "auto",
    decode_examples: int = 8,
    decode_max_length: int = 1024,
    on_length: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Evaluate at each length; returns one dict per length (metrics, decode subset, depth bins)."""
    was_training = model.training
    model.eval()
    results = []
    try:
        for length in lengths:
            res = evaluate_length(
                model,
                task,
                length,
                batch_size=batch_size,
                precision=precision,
                decode_examples=decode_examples,
                decode_max_length=decode_max_length,
            )
            results.append(res)
            if on_length is not None:
                on_length(res)
    finally:
        model.train(was_training)
    return results
