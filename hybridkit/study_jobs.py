"""Several study runs at once, in a pool of worker processes (``hybridkit study --jobs N``).

Why: the models of the synthetic studies are small (1-12 layers, d_model 64-256), so one run
leaves a GPU mostly idle -- its step time is Python and kernel-launch overhead, not GPU work
(``benchmarks/results/niah_m_train_h200.md``). Six parity runs sharing one H200 (16 host cores)
stepped in 16.4 ms (median) against 14.6 ms for one run alone, so six took about the time of
one (``benchmarks/results/state_tracking_gpu_probe.md``).

Runs go to a pool of ``jobs`` worker processes (``spawn``: a CUDA context cannot be forked;
a worker takes the next run when it finishes one), each calling ``worker``: :mod:`hybridkit.study`
passes a function that re-reads the study and brings the one run to finished exactly as its
serial loop does (this module does not import it, so the import graph stays one way). Runs only
share the study folder, whose files are all written atomically, so the processes need no
locking. The scheduler keeps up to ``jobs`` runs going and

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
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from hybridkit.errors import HybridkitError


def _blocked(slot, ahead: Sequence) -> bool:
    """A run at the chosen LR waits while a sweep run of its variant is queued before it or
    still running."""
    return slot.lr is None and any(s.variant == slot.variant and s.lr is not None for s in ahead)


def deferral(
    k: int, total: int, slot, start: float, slowest: float, time_budget: float | None
) -> str | None:
    """The "deferred" line when the run ``k`` of ``total`` would end past ``time_budget``
    (judged by the slowest run so far, none before the first has finished), else None: the
    budget rule of both the serial loop and the scheduler here."""
    elapsed = time.monotonic() - start
    if time_budget is None or not slowest or elapsed + slowest <= time_budget:
        return None
    return (
        f"[study] {k}/{total} deferred: {slot.describe()} (the slowest run took {slowest:.0f} "
        f"s, {time_budget - elapsed:.0f} s of the budget left)"
    )


def _start_worker() -> None:
    from hybridkit.runtime import exit_with_parent

    exit_with_parent()


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
    status_of: Callable[[Any], str],
    worker: Callable[..., tuple[str, float]],
) -> dict[str, int]:
    """Bring the ``todo`` runs to finished with up to ``jobs`` processes; returns the counts
    (``done``, ``ran``, ``waiting``, ``deferred``) the serial loop returns.

    ``status_of(slot)`` is :func:`hybridkit.study.slot_status`'s status: finished runs are
    counted here without a worker, and a run still waiting for its LR choice once nothing ahead
    of it can make that choice is reported as waiting. ``worker(study_path, overrides, plugins,
    slot, out, device, tag, threads)`` runs in a worker process (a module-level function, so
    that it pickles) and returns ``(status, seconds)``.

    A worker process that dies (a crash, the OOM killer) breaks the whole pool, and with it
    the runs beside it, and which of them died cannot be told: each is queued again once (a run
    resumes from its newest checkpoint) and then runs *alone* in the pool, so that a second
    break is its own; a run that was in a broken pool twice counts as failed. (Queued again
    side by side, an innocent run could share the culprit's second break and fail with it.)"""
    counts = {"done": 0, "ran": 0, "waiting": 0, "deferred": 0}
    pending = list(enumerate(todo, 1))
    running: dict[Future, tuple[int, object]] = {}
    failed: list[tuple[object, str]] = []
    broken_in: dict[int, int] = {}  # run number -> broken pools it was in
    slowest = 0.0
    threads = max(1, torch.get_num_threads() // min(jobs, len(todo)))
    pool: ProcessPoolExecutor | None = None
    pool_broken = False
    alone: int | None = None  # a run from a broken pool, running by itself
    try:
        while pending or running:
            while pending and len(running) < jobs and alone is None:
                if pool is not None and pool_broken:
                    if running:
                        break  # the broken pool's other runs are about to fail: count them first
                    pool.shutdown(wait=True)
                    pool, pool_broken = None, False  # a broken pool takes no work: a new one
                ahead = [s for _, s in running.values()]
                pick = None
                for i, (_, slot) in enumerate(pending):
                    if not _blocked(slot, ahead + [s for _, s in pending[:i]]):
                        pick = i
                        break
                if pick is None:
                    break
                if pending[pick][0] in broken_in and running:
                    break  # it runs alone: wait until the pool is empty
                k, slot = pending.pop(pick)
                status = status_of(slot)
                if status == "finished":
                    counts["done"] += 1
                    continue
                if status.startswith("waiting"):
                    print(f"[study] {k}/{len(todo)} waiting: {slot.describe()} needs its LR choice")
                    counts["waiting"] += 1
                    continue
                late = deferral(k, len(todo), slot, start, slowest, time_budget)
                if late is not None:
                    print(late)
                    counts["deferred"] += 1
                    continue
                if pool is None:
                    pool = ProcessPoolExecutor(
                        max_workers=min(jobs, len(todo)),
                        mp_context=multiprocessing.get_context("spawn"),  # CUDA cannot fork
                        initializer=_start_worker,
                    )
                try:
                    future = pool.submit(
                        worker, str(study_path), list(overrides), list(plugins), slot,
                        str(out), device, f"{k}/{len(todo)} ", threads,
                    )  # fmt: skip
                except BrokenProcessPool:
                    pool_broken = True
                    pending.insert(0, (k, slot))
                    break
                running[future] = (k, slot)
                if k in broken_in:
                    alone = k
            if not running:
                break  # every run left is blocked by nothing: cannot happen, but never spin
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                k, slot = running.pop(future)
                if k == alone:
                    alone = None
                try:
                    status, seconds = future.result()
                except BrokenProcessPool:
                    pool_broken = True
                    broken_in[k] = broken_in.get(k, 0) + 1
                    if broken_in[k] == 1:
                        print(f"[study] {k}/{len(todo)} lost with a dead worker: {slot.describe()}"
                              "; queued again")  # fmt: skip
                        pending.insert(0, (k, slot))
                    else:
                        print(f"[study] {k}/{len(todo)} failed: {slot.describe()}: its worker "
                              "process died twice")  # fmt: skip
                        failed.append((slot, "its worker process died twice"))
                    continue
                except Exception as error:  # noqa: BLE001 - reported below, all of them
                    print(f"[study] {k}/{len(todo)} failed: {slot.describe()}: {error}")
                    failed.append((slot, str(error)))
                    continue
                if status == "ran":
                    slowest = max(slowest, seconds)
                counts[status] += 1
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        names = "; ".join(f"{slot.describe()}: {why}" for slot, why in failed)
        raise HybridkitError(f"{len(failed)} study run(s) failed: {names}")
    return counts
