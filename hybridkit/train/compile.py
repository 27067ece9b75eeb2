"""How training compiles the model: ``train.compile`` and ``train.compile_mode``.

One place for the trainer and ``hybridkit bench train``, so the benchmark measures what training
runs. ``reduce-overhead`` adds CUDA graphs (torch's cudagraph trees) to Inductor's kernels: the
same kernels, replayed without the host launching each one, which is what a small study model
needs -- its step is host-bound (benchmarks/results/niah_m_train_h200.md: 40 ms compiled for a
few ms of GPU work). It needs fixed shapes (each new shape records another graph) and outputs
that are consumed before the next step, which the training loop guarantees; the step boundary is
marked explicitly (:func:`begin_step`) because a training loop calls forward and backward once
per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import torch

from hybridkit.recipe_sections import CompileMode

#: ``train.compile_mode`` values; ``default`` is torch.compile's default mode.
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


def compile_module(module: torch.nn.Module, mode: str = "default") -> Callable:
    """``torch.compile(module)`` in ``mode`` (one of :data:`COMPILE_MODES`)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; allowed: {', '.join(COMPILE_MODES)}")
    return torch.compile(module, mode=None if mode == "default" else mode)


def begin_step(mode: str) -> None:
    """Tell cudagraph trees a new iteration starts (a no-op unless ``mode`` uses CUDA graphs),
    so the previous iteration's graph outputs may be overwritten."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()
