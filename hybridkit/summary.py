"""What ``hybridkit show`` reports: per-layer table, parameter totals, state and KV-cache bytes,
and the kernel backend each op would use on this machine.

Every number comes from the layers themselves (:class:`hybridkit.layers.base.Layer`'s
questions, which built-in and registered layer kinds answer alike) and every backend from the
kernels' dispatch points through the layers, so nothing here re-implements either.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from hybridkit.kernels.linear import describe_decode
from hybridkit.layers.base import ask
from hybridkit.model import HybridLM


@dataclass
class LayerRow:
    index: int
    template: str
    kinds: str
    options: str
    params: int


@dataclass
class ModelSummary:
    rows: list[LayerRow]
    param_counts: dict[str, int]
    total_params: int
    state_bytes_per_seq: int
    kv_bytes_per_token: int  # while every cache still grows (windowed caches stop at 2 * window)
    kv_bytes_at: dict[int, int]  # allocated KV cache for a sequence of that length
    backends: dict[str, str] = field(default_factory=dict)


def _spec_summary(spec, d_model: int) -> str:
    """The layer spec's table text, given the model width where its ``summary`` takes it (a
    plugin's may not)."""
    if "d_model" in inspect.signature(spec.summary).parameters:
        return spec.summary(d_model=d_model)
    return spec.summary()


def summarize(
    model: HybridLM, *, seq_len: int, act_dtype: str = "bfloat16", device: str = "cpu"
) -> ModelSummary:
    """The report for ``model`` with activations (and k / v caches) in ``act_dtype``."""
    dtype = getattr(torch, act_dtype)
    names = model.spec.layer_names()
    rows, state_bytes, kv_per_token = [], 0, 0
    lengths = sorted({seq_len, 1024, 4096, 32768} if seq_len else {1024})
    kv_at = dict.fromkeys(lengths, 0)
    found: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, block in enumerate(model.blocks):
        kinds, options = [], []
        for layer in (block.mixer, block.mlp):
            if layer is None:
                continue
            kinds.append(layer.spec.kind)
            text = _spec_summary(layer.spec, model.spec.d_model)
            if text:
                options.append(text)
            state = ask(layer, "decode_state_bytes", dtype)
            state_bytes += state
            kv_per_token += ask(layer, "kv_bytes_per_token", dtype)
            for length in lengths:
                kv_at[length] += ask(layer, "cache_bytes", length, dtype) - state
            for label, length in (("prefill", max(seq_len, 2)), ("decode", 1)):
                for op, name in ask(layer, "backends", device, dtype, length).items():
                    found[f"{op} ({label})"][name].append(i)
        rows.append(
            LayerRow(i, names[i], " + ".join(kinds), "; ".join(options), block.num_params())
        )
    if found:  # the layers' projections and the head, in a decode step
        found["linears (decode)"][describe_decode(device, dtype)] = list(range(len(rows)))
    return ModelSummary(
        rows=rows,
        param_counts=model.param_counts(),
        total_params=model.num_params(),
        state_bytes_per_seq=state_bytes,
        kv_bytes_per_token=kv_per_token,
        kv_bytes_at=kv_at,
        backends={op: _join(by_name) for op, by_name in found.items()},
    )


def _join(by_name: dict[str, list[int]]) -> str:
    """One backend name, or each with the layers that run it when layers differ."""
    if len(by_name) == 1:
        return next(iter(by_name))
    return "; ".join(f"{name}: layers {', '.join(map(str, idx))}" for name, idx in by_name.items())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
