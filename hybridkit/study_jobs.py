"""Several study runs at once, each in its own worker process (``hybridkit study --jobs N``).

Why: the models of the synthetic studies are small (1-12 layers, d_model 64-256), so one run
leaves a GPU mostly idle -- its step time is Python and kernel-launch overhead, not GPU work
(``benchmarks/results/niah_m_train_h200.md``). Six parity runs sharing one H200 (16 host cores)
stepped in 16.4 ms (median) against 14.6 ms for one run alone, so six took about the time of
one (``benchmarks/results/state_tracking_gpu_probe.md``).

Each run gets a process of its own (``spawn``: a CUDA context cannot be forked), which calls
``worker``: :mod:`hybridkit.study` passes a function that re-reads the study and brings the one
run to finished exactly as its serial loop does (this module does not import it, so the import
graph stays one way). A process per run rather than a reused pool: a worker that dies (a crash,
the OOM killer) then takes only its own run with it, and the parent always knows which run that
was. (In a ``concurrent.futures`` pool one dead worker breaks the pool and fails every run
beside it.) Starting a process costs a few seconds of imports against runs of minutes. Runs only
share the study folder, whose files are all written atomically, so the processes need no
locking. The scheduler keeps up to ``jobs`` runs going and

* holds back a later seed's run while its variant's LR sweep is still queued or running (it
  would otherwise start, find no LR choice and be skipped as "waiting");
* applies the same time budget as the serial loop: no run starts that would end past it, judged
  by the slowest run finished so far and by the longest finished run of its variant recorded in
  the study folder (``expected``), and a run projected to train past it stops early
  (``deadline``);
* runs fewer at once when runs side by side were too slow: a run stopped by the deadline while
  others ran beside it was judged at a shared GPU's pace (five compiled MQAR runs on one H100
  each took five times as long as one alone, `benchmarks/results/mqar_step_time_h100.md`), so
  the number of runs at a time is halved (down to one) and the run goes back to its place in
  the queue; it resumes from the checkpoint its trainer saved. That happens only while the
  budget left could hold the run alone (its projected time divided by the runs it shared the
  GPU with, the best case), and a run stopped while running alone is final. ``crowd`` is the
  most runs that ran at once during the run's life, not only while it was timed, so a retry
  may be spent on a run that was crowded only while compiling;
* starts a run whose process died once more (it resumes from its newest checkpoint: the death
  may have been the machine's, such as memory taken by the runs beside it), and reports it as
  failed when its process dies again;
* lets the other runs finish when one fails, then raises naming every failed run.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

from hybridkit.errors import HybridkitError

# Seconds a process that was asked to stop (the parent interrupted) gets before it is killed.
STOP_GRACE_S = 10.0


def _blocked(slot, ahead: Sequence) -> bool:
    """A run at the chosen LR waits while a sweep run of its variant is queued before it or
    still running."""
    return slot.lr is None and any(s.variant == slot.variant and s.lr is not None for s in ahead)


def deferral(
    k: int,
    total: int,
    slot,
    start: float,
    slowest: float,
    time_budget: float | None,
    before: float = 0.0,
) -> str | None:
    """The "deferred" line when the run ``k`` of ``total`` would end past ``time_budget``, else
    None: the budget rule of both the serial loop and the scheduler here. A run is expected to
    take the longer of ``slowest`` (this call's slowest finished run) and ``before`` (what its
    variant's finished runs took before this call); with neither known it starts."""
    elapsed = time.monotonic() - start
    expected = max(slowest, before)
    if time_budget is None or not expected or elapsed + expected <= time_budget:
        return None
    why = (
        f"the slowest run took {slowest:.0f} s"
        if slowest >= before
        else f"its variant's finished runs took up to {before:.0f} s"
    )
    return (
        f"[study] {k}/{total} deferred: {slot.describe()} ({why}, "
        f"{time_budget - elapsed:.0f} s of the budget left)"
    )


def _child(worker: Callable[..., tuple[str, float]], args: tuple, conn: Connection) -> None:
    """A worker process's body: run ``worker(*args)``, send back ``("ok", result)`` or
    ``("error", message)``. The message is a plain string: our error classes take several
    constructor arguments and would not unpickle in the parent."""
    from hybridkit.runtime import exit_with_parent

    exit_with_parent(ignore_interrupt=True)  # Ctrl-C goes to the parent, which stops us
    try:
        message: tuple[str, Any] = ("ok", worker(*args))
    except Exception as error:  # noqa: BLE001 - handed to the parent, which reports it
        message = ("error", f"{type(error).__name__}: {error}")
    conn.send(message)
    conn.close()


@dataclass
class _Running:
    """One run's process and the pipe its result comes back on."""

    k: int
    slot: Any
    process: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    message: tuple[str, Any] | None = None
    crowd: int = 1  # the most runs (itself included) that ran at once while it ran


def _died(process) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _finish(process) -> None:
    """Wait for a process that has sent its result (or died) to be gone; one that hangs on its
    way out (a stuck exit handler) is killed after :data:`STOP_GRACE_S`."""
    process.join(STOP_GRACE_S)
    if process.is_alive():
        process.kill()
        process.join()


def _stop(running: Sequence[_Running]) -> None:
    """Stop the processes still running (the parent is leaving early): SIGTERM, then SIGKILL
    after :data:`STOP_GRACE_S`. A run stopped mid-way resumes from its checkpoint next time."""
    for run in running:
        if run.process.is_alive():
            run.process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for run in running:
        run.process.join(max(0.0, deadline - time.monotonic()))
        if run.process.is_alive():
            run.process.kill()
            run.process.join()
        run.conn.close()


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
    expected: Callable[[str, Any], float] | None = None,
    deadline: float | None = None,
) -> dict[str, int]:
    """Bring the ``todo`` runs to finished with up to ``jobs`` processes; returns the counts
    (``done``, ``ran``, ``waiting``, ``deferred``) the serial loop returns.

    ``status_of(slot)`` is :func:`hybridkit.study.slot_status`'s status: finished runs are
    counted here without a worker, and a run still waiting for its LR choice once nothing ahead
    of it can make that choice is reported as waiting. ``worker(study_path, overrides, plugins,
    slot, out, device, tag, threads, deadline)`` runs in the worker process (a module-level
    function, so that it pickles) and returns ``(status, seconds)``. ``expected(status, slot)``:
    the seconds a run is expected to take before this call has timed one (0: unknown).
    ``deadline`` goes to every worker's trainer; a run stopped by it comes back as
    ``("deferred", its projected seconds)``, which then judge the runs after it."""
    counts = {"done": 0, "ran": 0, "waiting": 0, "deferred": 0}
    pending = list(enumerate(todo, 1))
    running: list[_Running] = []
    failed: list[tuple[object, str]] = []
    deaths: dict[int, int] = {}  # run number -> processes of it that died
    slowest = 0.0
    limit = jobs  # runs at a time; halved when runs side by side miss the deadline
    context = multiprocessing.get_context("spawn")  # CUDA cannot fork
    total = len(todo)
    try:
        while pending or running:
            while pending and len(running) < limit:
                ahead = [run.slot for run in running]
                pick = next(
                    (i for i, (_, slot) in enumerate(pending)
                     if not _blocked(slot, ahead + [s for _, s in pending[:i]])),
                    None,
                )  # fmt: skip
                if pick is None:
                    break
                k, slot = pending.pop(pick)
                status = status_of(slot)
                if status == "finished":
                    counts["done"] += 1
                    continue
                if status.startswith("waiting"):
                    print(f"[study] {k}/{total} waiting: {slot.describe()} needs its LR choice")
                    counts["waiting"] += 1
                    continue
                before = expected(status, slot) if expected is not None else 0.0
                late = deferral(k, total, slot, start, slowest, time_budget, before)
                if late is not None:
                    print(late)
                    counts["deferred"] += 1
                    continue
                # host threads per run follow the runs at a time (fewer runs, more each)
                threads = max(1, torch.get_num_threads() // min(limit, len(todo)))
                receive, send = context.Pipe(duplex=False)
                args = (str(study_path), list(overrides), list(plugins), slot, str(out), device,
                        f"{k}/{total} ", threads, deadline)  # fmt: skip
                # not a daemon: a run's trainer starts its own process (batch prefetch on CUDA)
                process = context.Process(
                    target=_child, args=(worker, args, send), name=f"study-run-{k}", daemon=False
                )
                process.start()
                send.close()  # the child holds the other end: its exit ends the pipe
                running.append(_Running(k, slot, process, receive))
                for other in running:
                    other.crowd = max(other.crowd, len(running))
            if not running:
                break  # every run left is blocked by nothing: cannot happen, but never spin
            ready = wait([run.conn for run in running] + [run.process.sentinel for run in running])
            for run in list(running):
                ended = run.process.sentinel in ready
                if run.message is None and run.conn in ready:
                    try:
                        run.message = run.conn.recv()
                    except Exception:  # noqa: BLE001 - the pipe closed mid-message or without one
                        ended = True  # the process is gone or going: it died
                if run.message is None and not ended:
                    continue
                running.remove(run)
                _finish(run.process)
                run.conn.close()
                k, slot = run.k, run.slot
                if run.message is None:
                    deaths[k] = deaths.get(k, 0) + 1
                    why = _died(run.process)
                    if deaths[k] == 1:
                        print(f"[study] {k}/{total} lost with its worker process ({why}): "
                              f"{slot.describe()}; starting it once more")  # fmt: skip
                        pending.insert(0, (k, slot))
                    else:
                        print(f"[study] {k}/{total} failed: {slot.describe()}: its worker "
                              f"process died twice ({why})")  # fmt: skip
                        failed.append((slot, f"its worker process died twice ({why})"))
                    continue
                kind, value = run.message
                if kind == "error":
                    print(f"[study] {k}/{total} failed: {slot.describe()}: {value}")
                    failed.append((slot, str(value)))
                    continue
                status, seconds = value
                # judged at a shared GPU's pace: try it with fewer runs beside it, if alone it
                # could still fit (a run alone at best takes its share of the shared time)
                left = None if time_budget is None else time_budget - (time.monotonic() - start)
                alone = seconds / run.crowd
                if status == "deferred" and run.crowd > 1 and (left is None or alone <= left):
                    limit = max(1, min(limit, run.crowd // 2))
                    print(
                        f"[study] {k}/{total} not final: stopped beside {run.crowd - 1} other "
                        f"run(s) (projected {seconds:.0f} s, at best {alone:.0f} s alone); "
                        f"{slot.describe()} goes back to its place in the queue, to resume with "
                        f"at most {limit} run(s) at a time"
                    )
                    place = next((i for i, (j, _) in enumerate(pending) if j > k), len(pending))
                    pending.insert(place, (k, slot))
                    continue
                if status == "ran":
                    slowest = max(slowest, seconds)
                elif status == "deferred":  # its projected time, at best alone when crowded
                    slowest = max(slowest, alone)
                counts[status] += 1
    finally:
        _stop(running)
    if failed:
        names = "; ".join(f"{slot.describe()}: {why}" for slot, why in failed)
        raise HybridkitError(f"{len(failed)} study run(s) failed: {names}")
    return counts
