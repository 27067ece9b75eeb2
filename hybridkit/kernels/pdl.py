"""Programmatic dependent launch (PDL) for the decode step's Triton kernels.

Why: a decode step is a chain of ~170 small kernels (400M hybrid, batch 1) whose own work is a
few microseconds each, mostly reading weights; between two kernels of a CUDA graph the GPU
still drains one grid before it starts the next. With PDL (Hopper and later) a kernel launched
with ``launch_pdl`` may start while its predecessor runs: each of our decode kernels first
lets its successor launch (``gdc_launch_dependents``), then loads what no kernel of the step
writes (its weights), and only then waits for the predecessor (``gdc_wait``) before it reads
activations or state and before it writes anything. The next projection's weights stream in
while the current kernel finishes: the one-row linears load their whole weight tiles into
registers there (``GEMV_PRELOAD``), the others ask L2 for them. With those loads the 400M
model's batch-1 step went from 0.730 to 0.549 ms on an H100 (docs/kernels.md, "Programmatic
dependent launch"), so the setting is on by default.

Why it is safe (docs/kernels.md, "Programmatic dependent launch"):

* nothing before the wait writes memory, and nothing before it reads memory that any kernel of
  the decode step writes: weights only, which no kernel writes during inference (the kernels
  that use this are inference-only). One exception, argued where it is made: the split Mamba-3
  step reads its layer's state early, which only that layer's previous step writes, and a
  kernel launched without PDL always lies between the two
  (``mamba3/step/triton_step.py:_early_state``);
* the wait returns once the predecessor grid has completed and its writes are visible; every
  PDL kernel waits before it completes, so a kernel that completed implies all kernels before
  it completed: waiting on the predecessor covers the whole chain. A kernel launched without
  PDL (a torch op, cuBLAS, attention) starts after its predecessor completes, as always.

Used while the kernel setting ``pdl`` is on (the default), and then only where it can work: a
CUDA device of compute capability 9.0 or later, a Triton with the ``launch_pdl`` option, not the
interpreter, not while ``torch.compile`` traces (Inductor launches the kernels itself).
"""

from __future__ import annotations

import functools

import torch

from hybridkit.compat import interpreting
from hybridkit.kernels.config import current_config


@functools.cache
def _triton_has_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda
    except ImportError:  # a Triton without the NVIDIA backend
        return False
    fields = getattr(CUDAOptions, "__dataclass_fields__", {})
    return "launch_pdl" in fields and hasattr(cuda, "gdc_wait")


@functools.cache
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def unavailable(device: torch.device) -> str | None:
    """Why PDL cannot run on ``device`` (None: it can), ignoring the kernel setting."""
    if device.type != "cuda":
        return "not a CUDA device"
    if interpreting():
        return "the Triton interpreter runs the kernels"
    if not _triton_has_pdl():
        return "this Triton has no launch_pdl option"
    if not _capability_ok(device.index if device.index is not None else 0):
        return "needs compute capability 9.0 or later"
    return None


def use_pdl(x: torch.Tensor) -> bool:
    """Whether a decode kernel on ``x``'s device launches with PDL now: the kernel setting
    ``pdl`` is on, the device supports it, and no ``torch.compile`` trace is running."""
    if torch.compiler.is_compiling() or not current_config().pdl:
        return False
    return unavailable(x.device) is None


def launch_options(enabled: bool) -> dict[str, bool]:
    """The launch keyword for a kernel whose ``USE_PDL`` constexpr is ``enabled`` (nothing
    when off, so a Triton without the option is never passed it)."""
    return {"launch_pdl": True} if enabled else {}
