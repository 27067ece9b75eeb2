"""FLOPs per trained token and the device's peak: the two numbers behind every MFU we report.

One module so that ``hybridkit bench train``, the benchmark scripts and the trainer's
``metrics.jsonl`` divide the same numerator by the same denominator.

FLOPs per token use the usual dense-model count, printed with every result so it can be
checked: ``6 * N`` for the parameters that multiply activations (every weight matrix, the
output head once; the embedding lookup does none) plus, per attention layer,
``12 * heads * head_dim * seq_len`` (QK^T and PV, forward and backward, not halved for the
causal mask). Mamba-3 scans are not counted (they are a few percent of the matmul FLOPs at
the paper's sizes), so MFU slightly understates the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkit.model import HybridLM

__all__ = [
    "DATASHEET_BF16_TFLOPS",
    "DevicePeak",
    "FlopCount",
    "datasheet_peak",
    "flops_per_token",
    "throughput",
]

#: Dense bf16 tensor-core peak by device name (datasheet, TFLOP/s); MFU's usual denominator.
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


@dataclass
class FlopCount:
    per_token: float
    formula: str


def flops_per_token(model: HybridLM, seq_len: int) -> FlopCount:
    """Training FLOPs per token by the dense-model formula (see the module docstring)."""
    matmul_params = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() >= 2 and "embedding" not in name
    )
    if model.spec.tie_embeddings:
        matmul_params += model.embedding.weight.numel()  # the tied head still multiplies
    attn = 0
    for block in model.blocks:
        layer = block.mixer
        if layer is not None and layer.spec.kind == "attention":
            attn += 12 * layer.n_heads * layer.head_dim * seq_len
    return FlopCount(
        per_token=6.0 * matmul_params + attn,
        formula=f"6 x {matmul_params:,} matmul parameters + {attn:,} attention (12 h d L per "
        "attention layer); Mamba-3 scans not counted",
    )


@dataclass(frozen=True)
class DevicePeak:
    """The bf16 datasheet peak of a device in TFLOP/s, or None and why there is none."""

    name: str
    tflops: float | None
    reason: str = ""


def datasheet_peak(device: torch.device) -> DevicePeak:
    """The dense bf16 peak of ``device`` from :data:`DATASHEET_BF16_TFLOPS` (matched by name).

    A CPU or an unlisted GPU has none: an MFU against a made-up peak would be a number that
    looks comparable and is not, so callers report None with ``reason`` instead."""
    if device.type != "cuda":
        return DevicePeak(device.type, None, f"no datasheet bf16 peak for a {device.type} device")
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    reason = "" if peak else f"{name} is not in DATASHEET_BF16_TFLOPS (hybridkit/train/flops.py)"
    return DevicePeak(name, peak, reason)


def throughput(
    count: FlopCount, tokens: int, seconds: float, peak: DevicePeak, devices: int = 1
) -> dict[str, float | str | None]:
    """``tokens_per_s`` (all devices), ``tflops`` and ``mfu`` (per device) of ``tokens``
    processed in ``seconds`` by ``devices`` data-parallel devices; ``mfu`` is None on a device
    without a datasheet peak and ``mfu_note`` then says why."""
    tflops = count.per_token * tokens / seconds / devices / 1e12
    record: dict[str, float | str | None] = {
        "tokens_per_s": tokens / seconds,
        "tflops": tflops,
        "mfu": tflops / peak.tflops if peak.tflops else None,
    }
    if not peak.tflops:
        record["mfu_note"] = peak.reason
    return record
