"""``train.deterministic``: the same recipe and seed give bitwise the same run on the same GPU.

The trainer already makes everything it chooses a function of the seed and the step (batches,
learning rate, initialisation; ``hybridkit/train/trainer.py``). What still differs between two
GPU runs of one recipe is how some kernels add numbers up:

* **Choices made by timing.** Our tuned Triton kernels (``kernels/mamba3/chunkscan/launch.py``)
  and Inductor's reduction kernels pick a launch configuration by timing the candidates, and the
  fastest one depends on what else the GPU is doing (several study runs share it). Candidates
  with other warp counts or block sizes reduce in another order, so their sums differ in the last
  bits, and a run of thousands of steps amplifies that into another sample of the seed's
  outcome: two GPU runs of one NIAH recipe and seed, a day (and some kernel changes) apart,
  scored 89 % and 4 % at 8x the training length (``benchmarks/results/lengthgen_niah``).
* **Atomics.** FlashAttention-4's backward accumulates dQ with atomic adds from several thread
  blocks; some torch ops (``index_add``, ``scatter_add`` and friends) do the same.

The mode turns all of these off: kernel launches from fixed defaults (``KernelConfig``'s
``deterministic``, which also selects FA4's semaphore-ordered backward), Inductor without
on-device benchmarking (``torch._inductor.config.deterministic`` where the installed torch has
it), and ``torch.use_deterministic_algorithms(True)``, strict: in warn-only mode torch keeps
the non-deterministic backward of SDPA's flash and memory-efficient kernels (it only warns), and
SDPA is the attention of every run without FlashAttention-4. An op that has no deterministic
implementation then stops the run; :func:`explain` turns torch's error into one that names
``train.deterministic``. torch's filling of every ``torch.empty`` with NaN in this mode is
turned off (our kernels write all of their outputs, and the fill would cost a pass over every
buffer). It costs speed; ``benchmarks/determinism_check.sh`` measures it and checks that two
runs agree. One cost was out of proportion: a compiled MQAR step on the H100 took 24 ms in the
mode against 5.5 ms without it, which points at Inductor's deterministic fallback for the
embedding's backward (it sums each repeated token id serially);
:mod:`hybridkit.kernels.embedding` keeps ATen's segmented embedding backward there instead,
which brought that step to 12.5 ms (``benchmarks/results/mqar_step_time_h100.md``).

Determinism here means one GPU model, one software stack and one GPU count; no promise across
them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from hybridkit.errors import HybridkitError, RecipeError
from hybridkit.kernels.config import kernel_config

#: cuBLAS keeps its results reproducible across streams only with a fixed workspace
#: configuration; torch's deterministic mode asks for one of these two values.
CUBLAS_WORKSPACE = ":4096:8"


def prepare_process(enabled: bool) -> None:
    """Process-level settings that must precede the first cuBLAS call: the workspace
    configuration (only set when the variable is unset, so a user's choice wins)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Run a block deterministically (see the module docstring); a no-op when not ``enabled``.

    torch's flag and Inductor's setting are process-wide, so they are restored on exit: code
    around the block (another run in the same process, an evaluation) keeps its own settings.
    """
    if not enabled:
        yield
        return
    prepare_process(True)  # torch refuses cuBLAS calls in this mode without the variable
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    fill = _fill_flag()
    was_filling = getattr(fill, "fill_uninitialized_memory", None)
    if was_filling is not None:
        # torch's deterministic mode also fills every torch.empty with NaN; our kernels write
        # all of their (empty-allocated) outputs, and filling the scan's chunk states alone is
        # hundreds of MB per layer and step at the benchmark shapes
        fill.fill_uninitialized_memory = False
    try:
        with _inductor_deterministic(), kernel_config(deterministic=True):
            yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        if was_filling is not None:
            fill.fill_uninitialized_memory = was_filling


def deterministic_kernels(enabled: bool) -> contextlib.AbstractContextManager:
    """The part of :func:`deterministic_mode` an evaluation needs: our kernels without timed
    launch choices. A forward pass has no atomics to order (SDPA's and FA4's forward, cuBLAS
    and our kernels are deterministic once their launch is fixed), and leaving torch's strict
    mode out keeps an op that has no deterministic backward from stopping an evaluation."""
    return kernel_config(deterministic=True) if enabled else contextlib.nullcontext()


def explain(err: Exception) -> HybridkitError | None:
    """A clear error for torch's refusal of an op without a deterministic implementation (or of
    cuBLAS without its workspace setting) under :func:`deterministic_mode`, or a library's
    assertion that it has no deterministic path (FlashAttention-4 versions other than the
    pinned one assert that on some GPUs); None for any other error."""
    text = str(err)
    if "deterministic" not in text:
        return None
    first = text.strip().splitlines()[0]
    return RecipeError(
        "<recipe>",
        [
            (
                "train.deterministic",
                f"true, but an op of this run has no deterministic implementation on this "
                f"device ({first}); allowed: false (runs then differ in their last bits)",
            )
        ],
    )


def _fill_flag():
    """The module holding torch's ``fill_uninitialized_memory`` switch, or None."""
    try:
        import torch.utils.deterministic as fill
    except ImportError:  # pragma: no cover - torch < 2.1
        return None
    return fill


def _inductor_deterministic() -> contextlib.AbstractContextManager:
    """Inductor without timing-based kernel choices, on torch versions that have the switch
    (``torch._inductor.config.deterministic``); elsewhere nothing."""
    try:
        from torch._inductor import config as inductor_config
    except ImportError:  # pragma: no cover - every torch we support has Inductor
        return contextlib.nullcontext()
    if not hasattr(inductor_config, "deterministic"):
        return contextlib.nullcontext()
    return inductor_config.patch(deterministic=True)
