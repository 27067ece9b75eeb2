"""Where and in which precision a model runs: device names and the autocast context.

Training, evaluation, studies and the CLI all turn a user's ``device`` string into a
``torch.device`` and wrap forwards in the same autocast policy. Those callers sit at different
levels (``eval`` must not import ``train``; see ``tests/test_imports.py``), so the shared rules
live down here, next to nothing but torch and the error types.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from hybridkit.errors import HybridkitError

__all__ = ["autocast_for", "elapsed_s", "exit_with_parent", "resolve_device", "timer_start"]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto | cpu | cuda | cuda:N`` -> a device that exists on this machine.

    ``auto`` prefers the GPU; a bare ``cuda`` means this process's GPU under ``torchrun``
    (``local_rank``), so every rank of a data-parallel run gets its own. Asking for CUDA on a
    machine without one is a user error with a fix, not a crash deep inside the first ``.to()``.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    # torch also parses meta, mps, xla, ...: models cannot run there (a traceback at the first
    # forward or .to()), so only the kinds hybridkit runs on are accepted
    if device is None or device.type not in ("cpu", "cuda"):
        raise HybridkitError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HybridkitError(
            f"device {name!r} asks for CUDA but no GPU is available; use cpu or auto"
        )
    return device


def autocast_for(
    device: torch.device, precision: str, *, cache: bool = True
) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``precision`` is ``bf16`` or ``auto``; nothing otherwise.

    CPUs run fp32 under ``auto`` because bf16 matmuls there are slower and the tiny CPU recipes
    are meant to match a reference run closely; ``fp32`` forces full precision everywhere.
    ``cache=False`` recasts weights at every use (needed around a CUDA-graph capture).
    """
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def timer_start(device: torch.device) -> torch.cuda.Event | float:
    """A start mark for :func:`elapsed_s`: a recorded CUDA event on a GPU, else a clock."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed_s(device: torch.device, start: torch.cuda.Event | float) -> float:
    """Seconds since ``start`` (device time on CUDA, after a synchronisation). Shared by the
    training and decoding benchmarks, which sit at different import levels."""
    if device.type == "cuda":
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return time.perf_counter() - start


def exit_with_parent(*, ignore_interrupt: bool = False) -> None:
    """Make this worker process exit as soon as the process that started it is gone.

    For the helper processes of the trainer (batch prefetch) and of ``study --jobs``: a parent
    killed without a chance to clean up (``kill``, the OOM killer, a scheduler's signal to one
    process) would otherwise leave them waiting for work forever, on a GPU machine holding
    memory. A daemon thread waits on the parent's sentinel and ends the process.
    ``ignore_interrupt``: leave Ctrl-C to the parent (which closes the worker itself)."""
    import multiprocessing
    import os
    import signal
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return
    if ignore_interrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory of ``device`` in bytes: the GPU's (``cudaMemGetInfo``) or the machine's
    available RAM (Linux ``MemAvailable``: free pages plus the page cache the kernel can
    reclaim; ``sysconf``'s free pages alone would refuse work that fits); None where it cannot
    be asked."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
