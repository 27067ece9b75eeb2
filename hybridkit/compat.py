"""What differs between the torch and Triton versions we support (torch >= 2.5, Triton >= 3.6).

Kept in one place so that each workaround says once which version needs it and why, and can go
when that version is no longer supported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

#: the oldest Triton the kernels were checked on: the GPU machine's 3.6 (every GPU test)
MIN_TRITON = (3, 6)
#: the oldest Triton whose interpreter (``TRITON_INTERPRET=1``, the CPU tests) runs them: 3.7.1
#: passes every Triton test on the CPU; 3.6 and 3.4 fail in most kernels ("only 0-dimensional
#: arrays can be converted to Python scalars", first seen at a loop whose bound is a loaded
#: value), 3.2 also lacks the PDL intrinsics and dots under 16 rows, and 3.1 (the one torch 2.5
#: pins) fails at every kernel's first ``tl.arange`` ("arange's arguments must be of type
#: tl.constexpr")
MIN_TRITON_INTERPRETER = (3, 7)


#: (major, minor) of the torch in use
TORCH_VERSION: tuple[int, int] = tuple(int(x) for x in torch.__version__.split(".")[:2])  # type: ignore[assignment]


def fsdp_on_cpu_problem() -> str | None:
    """Why FSDP2 cannot shard a model on the CPU with this torch, else None: torch 2.5's
    ``fully_shard`` creates CUDA streams ("FSDP requires CUDA for streams"); 2.6 runs on gloo."""
    if TORCH_VERSION < (2, 6):
        return f"FSDP2 on the CPU needs torch >= 2.6 (this is {torch.__version__})"
    return None


def trace_constant(fn: F) -> F:
    """``torch.compiler.assume_constant_result(fn)``: under ``torch.compile`` Dynamo calls ``fn``
    once at trace time and bakes its result into the graph (for settings read from a
    ``ContextVar``, which Dynamo cannot trace, and for device queries).

    Why not the decorator alone: torch 2.5's Dynamo stores the result as a global of the
    compiled frame's module under the function's code name, so ``from ... import flag`` in that
    module became ``flag = True`` and the next eager call failed with "'bool' object is not
    callable". Giving the code a name no module uses keeps that store out of the way (newer
    versions do not store it; the name only shows in Dynamo's own logs)."""
    fn.__code__ = fn.__code__.replace(co_name=f"_hybridkit_constant_{fn.__code__.co_name}")
    return torch.compiler.assume_constant_result(fn)


def _triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton from its package metadata (importing Triton takes
    a second, and every command asks), None where it is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        text = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # a build installed under another name
        import triton

        text = triton.__version__
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``; Triton also
    reads ``true`` / ``on`` / ``yes`` / ``y`` in any case as on, and so does this)."""
    value = os.environ.get("TRITON_INTERPRET", "").strip().lower()
    return value in ("1", "true", "on", "yes", "y")


def _why_triton_unusable(version: tuple[int, int] | None, interpreting: bool) -> str | None:
    if version is None:
        return "Triton is not installed"
    need = MIN_TRITON_INTERPRETER if interpreting else MIN_TRITON
    if version < need:
        have, want = ".".join(map(str, version)), ".".join(map(str, need))
        oldest = "whose interpreter runs the kernels" if interpreting else "the kernels run on"
        return f"Triton {have} is older than {want}, the oldest {oldest}"
    return None


#: why our Triton kernels cannot run in this process (not installed, or older than
#: :data:`MIN_TRITON`: torch 2.5 pins Triton 3.1, so there the torch paths run), else None;
#: fixed per process, asked by every dispatch point
TRITON_UNUSABLE: str | None = _why_triton_unusable(_triton_version(), interpreting())
HAVE_TRITON: bool = TRITON_UNUSABLE is None
