"""AdamW with the usual exemptions from weight decay, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from hybridkit.recipe_sections import TrainSpec


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases, embeddings, 1-D parameters and those a layer flags
    (``_no_weight_decay``: Mamba-3's dt_bias, D, B/C biases) are not decayed: shrinking them
    towards zero changes what the layer computes rather than regularising it."""
    return (
        getattr(param, "_no_weight_decay", False)
        or param.dim() < 2
        or "embedding" in name
        or "norm" in name.lower()
        or name.endswith(".bias")
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups; each carries the parameter names (``names``) for checkpointing."""
    decay, plain = {"params": [], "names": []}, {"params": [], "names": []}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        group = plain if no_decay(name, param) else decay
        group["params"].append(param)
        group["names"].append(name)
    decay["weight_decay"], plain["weight_decay"] = weight_decay, 0.0
    return [g for g in (decay, plain) if g["params"]]


def build_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.AdamW:
    """AdamW; the fused CUDA implementation when every parameter lives on a GPU."""
    groups = param_groups(model, spec.weight_decay)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, **kwargs)


def lr_at(step: int, spec: TrainSpec) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then the schedule.

    ``cosine`` decays from ``lr`` to ``lr * min_lr_ratio`` over the remaining steps; ``wsd``
    (warmup-stable-decay) holds ``lr`` and decays linearly over the last ``decay_fraction`` of
    the steps; ``constant`` holds it. A pure function of the step, so resuming needs no state.
    """
    peak, floor = spec.lr, spec.lr * spec.min_lr_ratio
    warmup = spec.resolved_warmup()
    if step < warmup:
        return peak * (step + 1) / warmup
    if spec.schedule == "constant":
        return peak
    if spec.schedule == "cosine":
        progress = (step - warmup) / max(1, spec.steps - warmup)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = spec.steps - int(round(spec.decay_fraction * spec.steps))
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, spec.steps - decay_start)
    return peak + (floor - peak) * min(1.0, progress)
