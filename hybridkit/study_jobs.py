"""Several study runs at once, each in its own process (``hybridkit study --jobs N``).

Why: the models of the synthetic studies are small (1-12 layers, d_model 64-256), so one run
leaves a GPU mostly idle -- its step time is Python and kernel-launch overhead, not GPU work
(``benchmarks/results/niah_m_train_h200.md``). Six parity runs sharing one H200 (16 host cores)
stepped in 16.4 ms (median) against 14.6 ms for one run alone, so six took about the time of
one (``benchmarks/results/state_tracking_gpu_probe.md``).

Each run is a separate process (``spawn``: a CUDA context cannot be forked) that calls
``worker``: :mod:`hybridkit.study` passes a function that re-reads the study and brings the one
run to finished exactly as its serial loop does (this module does not import it, so the import
graph stays one way). Runs only share the study folder, whose files are all written
atomically, so the processes need no locking. The scheduler keeps up to ``jobs`` runs going and

* holds back a later seed's run while its variant's LR sweep is still queued or running (it
  would otherwise start, find no LR choice and be skipped as "waiting");
* applies the same time budget as the serial loop: no run starts that would end past it, judged
  by the slowest run finished so far;
* lets the other runs finish when one fails, then raises naming every failed run.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from hybridkit.errors import HybridkitError


def _blocked(slot, ahead: Sequence) -> bool:
    """A run at the chosen LR waits while a sweep run of its variant is queued before it or
    still running."""
    return slot.lr is None and any(s.variant == slot.variant and s.lr is not None for s in ahead)


def run_parallel(
    todo: Sequence,
    out: Path,
    *,
    study_path: str | Path,
    overrides: Sequence[str],
    plugins: Sequence[str],
    device: str,
    jobs: int,
    time_budget: float | None,
    start: float,
    skip_finished: Callable[[Any], bool],
    worker: Callable[..., tuple[str, float]],
) -> dict[str, int]:
    """Bring the ``todo`` runs to finished with up to ``jobs`` processes; returns the counts
    (``done``, ``ran``, ``waiting``, ``deferred``) the serial loop returns.

    ``skip_finished(slot)`` is the serial loop's check: true for a run that is finished or
    waiting, which a time budget never defers. ``worker(study_path, overrides, plugins, slot,
    out, device, tag, threads)`` runs in the worker process (a module-level function, so that
    it pickles) and returns ``(status, seconds)``."""
    counts = {"done": 0, "ran": 0, "waiting": 0, "deferred": 0}
    pending = list(enumerate(todo, 1))
    running: dict[Future, tuple[int, object]] = {}
    failed: list[tuple[object, BaseException]] = []
    slowest = 0.0
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context) as pool:
        while pending or running:
            while pending and len(running) < jobs:
                ahead = [s for _, s in running.values()]
                pick = None
                for i, (_, slot) in enumerate(pending):
                    if not _blocked(slot, ahead + [s for _, s in pending[:i]]):
                        pick = i
                        break
                if pick is None:
                    break
                k, slot = pending.pop(pick)
                elapsed = time.monotonic() - start
                late = time_budget is not None and slowest and elapsed + slowest > time_budget
                if late and not skip_finished(slot):
                    print(
                        f"[study] {k}/{len(todo)} deferred: {slot.describe()} (the slowest run "
                        f"took {slowest:.0f} s, {time_budget - elapsed:.0f} s of the budget left)"
                    )
                    counts["deferred"] += 1
                    continue
                future = pool.submit(
                    worker, str(study_path), list(overrides), list(plugins), slot, str(out),
                    device, f"{k}/{len(todo)} ", threads,
                )  # fmt: skip
                running[future] = (k, slot)
            if not running:
                break  # every run left is blocked by nothing: cannot happen, but never spin
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                k, slot = running.pop(future)
                try:
                    status, seconds = future.result()
                except BaseException as error:  # noqa: BLE001 - reported below, all of them
                    print(f"[study] {k}/{len(todo)} failed: {slot.describe()}: {error}")
                    failed.append((slot, error))
                    continue
                if status == "ran":
                    slowest = max(slowest, seconds)
                counts[status] += 1
    if failed:
        names = "; ".join(f"{slot.describe()}: {error}" for slot, error in failed)
        raise HybridkitError(f"{len(failed)} study run(s) failed: {names}") from failed[0][1]
    return counts
