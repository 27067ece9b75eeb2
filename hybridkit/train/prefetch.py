"""Training batches made ahead of time in a worker process (``train.prefetch``).

Why: the synthetic tasks build every batch in numpy on the host, one ``sample`` call per
distinct length of the curriculum (up to ~160 for parity), which took 5-15 ms per batch on our
CPU machines, while the small study models step in ~15-20 ms on an H200
(``benchmarks/results/state_tracking_gpu_probe.md``). Done inline, that is a third of a run's
time; done ahead in another process it overlaps the GPU step.

Why a process, not a thread: building a batch is many small numpy calls that hold the GIL, and
so does the training loop's Python; a thread would mostly take turns with it.

Correctness does not depend on the worker: a training batch is a function of (task, data seed,
step) alone (:meth:`hybridkit.train.trainer.Trainer.batch_for`), so the worker computes exactly
the batch the loop would, in any order, and a resumed run asks for its next step and gets it.
If the worker fails for any reason the batch is made inline instead: a broken task then raises
its own error in this process, and anything else (a plugin that cannot be imported in a fresh
process) costs speed, with one warning, not the run.
"""

from __future__ import annotations

import multiprocessing
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor

from hybridkit.tasks.base import Batch

_WORKER: dict = {}  # the worker process's task and batch settings (set by _start)


def _start(recipe_data: dict, seed: int, batch_size: int) -> None:
    """Rebuild the task from the recipe's plain data: loading it imports the recipe's plugins
    before their task classes are needed (a pickled task spec of a plugin kind could not even
    be unpickled in a fresh process)."""
    import torch

    from hybridkit.recipe import load_recipe
    from hybridkit.runtime import exit_with_parent

    exit_with_parent(ignore_interrupt=True)  # the loop closes the worker on Ctrl-C
    torch.set_num_threads(1)  # the worker shares the host with the training loop
    _WORKER.update(task=load_recipe(recipe_data).task.build(), seed=seed, batch_size=batch_size)


def _ready() -> None:
    """Submitted at construction: the worker starts (imports, task) while the model is built."""


def _make(step: int) -> Batch:
    task = _WORKER["task"]
    rng = task.train_rng(step, default_seed=_WORKER["seed"])
    return task.train_batch(step, _WORKER["batch_size"], rng)


class BatchPrefetcher:
    """``get(step)`` returns ``inline(step)``, made ``depth`` steps ahead in one worker process.

    ``recipe_data`` (:func:`hybridkit.recipe.recipe_to_dict` of the recipe), ``seed`` (the data
    seed's default, as ``batch_for`` uses it) and ``batch_size`` rebuild the task in the worker;
    ``inline`` is the loop's own ``batch_for`` (the fallback); ``end`` is the last step + 1
    (nothing is made past it)."""

    def __init__(
        self,
        recipe_data: dict,
        seed: int,
        batch_size: int,
        inline: Callable[[int], Batch],
        *,
        end: int,
        depth: int = 2,
    ):
        self.inline, self.end, self.depth = inline, end, depth
        self._pending: dict[int, Future] = {}
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),  # a CUDA parent cannot fork
            initializer=_start,
            initargs=(recipe_data, seed, batch_size),
        )
        self._finalizer = weakref.finalize(self, _shutdown, self._pool)
        try:
            self._pool.submit(_ready)  # start the worker now, not at the first step
        except Exception as error:  # noqa: BLE001 - no worker (e.g. inside a daemon): inline
            warnings.warn(
                f"train.prefetch: no batch worker could start ({type(error).__name__}: "
                f"{error}); making batches inline",
                RuntimeWarning,
                stacklevel=2,
            )
            self.close()

    def get(self, step: int) -> Batch:
        if self._pool is None:
            return self.inline(step)
        for stale in [s for s in self._pending if s < step]:
            self._pending.pop(stale).cancel()
        try:
            for s in range(step, min(step + self.depth, self.end)):
                if s not in self._pending:
                    self._pending[s] = self._pool.submit(_make, s)
            future = self._pending.pop(step, None)
            if future is not None:
                return future.result()
        except Exception as error:  # noqa: BLE001 - any worker failure: make it inline
            batch = self.inline(step)  # a broken task raises its own error here
            warnings.warn(
                f"train.prefetch: the batch worker failed ({type(error).__name__}: "
                f"{error}); making batches inline from step {step} on",
                RuntimeWarning,
                stacklevel=2,
            )
            self.close()
            return batch
        return self.inline(step)  # past ``end``

    def close(self) -> None:
        if self._pool is not None:
            self._finalizer()
            self._pool, self._pending = None, {}


def _shutdown(pool: ProcessPoolExecutor) -> None:
    pool.shutdown(wait=False, cancel_futures=True)
