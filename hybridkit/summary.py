"""What ``hybridkit show`` reports: per-layer table, parameter totals, state and KV-cache bytes,
and the kernel backend each op would use on this machine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybridkit.cache import kv_capacity
from hybridkit.kernels import attention as attn_ops
from hybridkit.kernels.mamba3 import ops as m3_ops
from hybridkit.layers.attention import Attention
from hybridkit.layers.mamba3 import Mamba3
from hybridkit.model import HybridLM

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


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


def mamba3_state_bytes(layer: Mamba3, act_bytes: int) -> int:
    """Recurrent state per sequence: fp32 angle and ssm, k and v in the activation dtype."""
    shapes = layer.state_shapes(1)
    n = lambda s: int(torch.Size(s).numel())  # noqa: E731
    return 4 * (n(shapes["angle"]) + n(shapes["ssm"])) + act_bytes * (
        n(shapes["k"]) + n(shapes["v"])
    )


def summarize(
    model: HybridLM, *, seq_len: int, act_dtype: str = "bfloat16", device: str = "cpu"
) -> ModelSummary:
    act_bytes = DTYPE_BYTES[act_dtype]
    names = model.spec.layer_names()
    rows, state_bytes, kv_per_token = [], 0, 0
    windows: list[tuple[int, int | None]] = []
    backends: dict[str, str] = {}
    for i, block in enumerate(model.blocks):
        kinds, options = [], []
        params = 0
        for norm, layer in ((block.norm1, block.mixer), (block.norm2, block.mlp)):
            if layer is None:
                continue
            kinds.append(layer.spec.kind)
            if layer.spec.summary():
                options.append(layer.spec.summary())
            params += sum(p.numel() for p in layer.parameters()) + norm.weight.numel()
            if isinstance(layer, Mamba3):
                state_bytes += mamba3_state_bytes(layer, act_bytes)
                for length, label in ((seq_len, "prefill"), (1, "decode")):
                    backends[f"mamba3 {label}"] = m3_ops.resolve_backend(
                        layer.spec.backend, device, length
                    )
            if isinstance(layer, Attention):
                per_tok = 2 * layer.n_kv_heads * layer.head_dim * act_bytes
                kv_per_token += per_tok
                windows.append((per_tok, layer.spec.window))
                backends["attention"] = attn_ops.resolve_backend(layer.spec.backend, device)
        rows.append(LayerRow(i, names[i], " + ".join(kinds), "; ".join(options), params))
    kv_at = {}
    for length in sorted({seq_len, 1024, 4096, 32768} if seq_len else {1024}):
        kv_at[length] = sum(per * kv_capacity(length, w) for per, w in windows)
    counts = model.param_counts()
    return ModelSummary(
        rows=rows,
        param_counts=counts,
        total_params=model.num_params(),
        state_bytes_per_seq=state_bytes,
        kv_bytes_per_token=kv_per_token,
        kv_bytes_at=kv_at,
        backends=backends,
    )


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
