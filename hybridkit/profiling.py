"""Where a call's device time goes, by kernel category: the breakdowns of ``hybridkit bench
train`` (one training step) and ``hybridkit bench decode --profile`` (decode steps).

Attribution is by the profiled kernel's (or op's) name against an ordered list of categories,
so it is approximate (a matmul inside the Mamba-3 layer's projections counts as a matmul). On a
GPU only kernel events are summed: the CPU op that launched a kernel (``aten::mm`` for a GEMM)
reports the same time as its own "self device time", and adding both counted every kernel
twice; the GPU-side spans of ``record_function`` ranges (user annotations, e.g. torch.compile's
"Torch-Compiled Region" or the optimizer step) are left out for the same reason. Kernels
replayed from a CUDA graph are reported one by one like launched ones. On a CPU
the top-level ops' self time is summed instead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "TOP_KERNELS",
    "Categories",
    "KernelProfile",
    "categorize",
    "profile_kernels",
    "sum_events",
    "top_kernels_table",
]

#: ``(category, name fragments)``, matched in order against lower-cased kernel names
Categories = Sequence[tuple[str, Sequence[str]]]


def categorize(name: str, categories: Categories) -> str:
    """The first category one of whose fragments occurs in ``name`` (case-insensitive), else
    ``other``."""
    lower = name.lower()
    for category, keys in categories:
        if any(key in lower for key in keys):
            return category
    return "other"


#: how many of the longest kernels a profile keeps by name by default (:attr:`KernelProfile.top`)
TOP_KERNELS = 25


@dataclass
class KernelProfile:
    """Device milliseconds and kernel launches per category of one profiled call (CPU: op
    milliseconds and op calls), and the longest kernels by name (``top``: dicts of ``name``,
    ``category``, ``ms``, ``count``, longest first): a category says where the time goes, the
    names say which fusion or launch to work on (an Inductor kernel's name lists the ops it
    fused)."""

    ms: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    top: list[dict] = field(default_factory=list)


def profile_kernels(
    fn: Callable[[], object],
    device: torch.device,
    categories: Categories,
    *,
    top: int = TOP_KERNELS,
) -> KernelProfile:
    """Run ``fn`` once under the torch profiler; its time and kernel count per category,
    largest first, and its ``top`` longest kernels by name."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return sum_events(list(prof.key_averages()), device, categories, top=top)


def sum_events(
    events: Sequence, device: torch.device, categories: Categories, *, top: int = TOP_KERNELS
) -> KernelProfile:
    """Per-category time and count of profiler events (``prof.key_averages()``), each kernel
    once: on a GPU only the device's kernel events, never the CPU ops that launched them nor
    the GPU-side spans of ``record_function`` ranges (user annotations: torch.compile's
    compiled regions, the optimizer's step), which cover many kernels each and would count
    them again (torch's own summary table leaves them out for the same reason)."""
    from torch.autograd import DeviceType

    kernels_only = device.type == "cuda" and any(
        getattr(e, "device_type", None) == DeviceType.CUDA for e in events
    )
    ms: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    by_name: dict[str, list] = {}
    for event in events:
        if device.type == "cuda":
            if kernels_only and getattr(event, "device_type", None) != DeviceType.CUDA:
                continue  # a CPU op: its kernels are listed as events of their own
            if getattr(event, "is_user_annotation", False):
                continue  # a range around kernels listed on their own
            us = getattr(event, "self_device_time_total", None)
            if us is None:
                us = getattr(event, "self_cuda_time_total", 0.0)
        else:
            us = event.self_cpu_time_total
        if us > 0:
            category = categorize(event.key, categories)
            ms[category] += us / 1e3
            count[category] += int(event.count)
            entry = by_name.setdefault(event.key, [category, 0.0, 0])
            entry[1] += us / 1e3
            entry[2] += int(event.count)
    order = sorted(ms, key=lambda c: -ms[c])
    longest = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    named = [{"name": k, "category": c, "ms": t, "count": n} for k, (c, t, n) in longest]
    return KernelProfile({c: ms[c] for c in order}, {c: count[c] for c in order}, named)


def top_kernels_table(top: Sequence[dict], total_ms: float, *, rows: int = 15) -> list[str]:
    """Markdown lines of the longest kernels (:attr:`KernelProfile.top`), with each one's share
    of ``total_ms`` (4 significant digits: per-token decode times are microseconds); names cut to
    80 characters (Inductor's list every fused op)."""
    lines = ["| kernel | category | ms | launches | share |", "|---|---|---|---|---|"]
    for k in top[:rows]:
        name = k["name"] if len(k["name"]) <= 80 else k["name"][:77] + "..."
        name = name.replace("|", "\\|")
        share = k["ms"] / total_ms if total_ms else 0.0
        ms, count = f"{k['ms']:.4g}", f"{k['count']:.4g}"
        lines.append(f"| `{name}` | {k['category']} | {ms} | {count} | {share:.0%} |")
    return lines
