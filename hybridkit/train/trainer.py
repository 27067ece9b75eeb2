"""One trainer for every task: synthetic tasks and plain next-token LM alike.

Determinism is by construction: the training batch of step ``s`` is drawn from a generator seeded
with ``(data seed, s)`` and nothing else, the learning rate is a pure function of ``s``, and a
checkpoint stores weights, AdamW moments and RNG states. Resuming from the checkpoint at step
``s`` therefore replays exactly the steps an uninterrupted run would have taken.

Loss: cross-entropy summed over the scored positions of the global batch and divided by their
count, so gradient accumulation and data-parallel ranks (each summing its own slice, divided by
the *global* count) give the same gradient as one big batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

from hybridkit.build import build_model
from hybridkit.errors import CheckpointError, HybridkitError, RecipeError, RunWouldNotFinish
from hybridkit.eval.lengthgen import evaluate_lengths
from hybridkit.footprint import check_eval_lengths, check_training
from hybridkit.fsutil import DirLock, atomic_write_bytes, atomic_write_text
from hybridkit.kernels.config import scored_rows_enabled
from hybridkit.kernels.loss import scored_rows
from hybridkit.recipe import RecipeSpec, digest, dump_recipe, load_recipe, recipe_to_dict
from hybridkit.runtime import autocast_for, resolve_device
from hybridkit.tasks.base import IGNORE_INDEX, Task, check_model_vocab
from hybridkit.train import distributed as dist_utils
from hybridkit.train.checkpoint import newest_valid_checkpoint, read_checkpoint, write_checkpoint
from hybridkit.train.compile import begin_step, compile_module
from hybridkit.train.determinism import (
    deterministic_kernels,
    deterministic_mode,
    explain,
    prepare_process,
)
from hybridkit.train.flops import FlopCount, datasheet_peak, flops_per_token, throughput
from hybridkit.train.metrics import MetricsLog
from hybridkit.train.optim import build_optimizer, lr_at
from hybridkit.train.prefetch import BatchPrefetcher
from hybridkit.train.resume_check import trajectory_changes
from hybridkit.train.sharded_checkpoint import load_sharded, write_sharded_checkpoint
from hybridkit.weights import latest_checkpoint, save_weights

#: what the trainer writes into a run directory: path -> whether it is a directory
RUN_DIR_LAYOUT = {
    "checkpoints": True,
    "checkpoints/latest": False,
    "recipe.yaml": False,
    "metrics.jsonl": False,
    "model.safetensors": False,
    "final.json": False,
}


#: files in a run folder that describe the weights it had: the final weights and summary (the
#: trainer), ``eval.*`` and the NIAH heat map (``hybridkit eval`` of the run, possibly of a
#: checkpoint) and ``heldout.json`` (a study's held-out score); removed when the run trains on
STALE_WHEN_TRAINING = (
    "final.json",
    "model.safetensors",
    "eval.json",
    "eval.md",
    "eval.png",
    "niah_heatmap.png",
    "heldout.json",
)

#: a study's record of a run in its folder (``hybridkit/study.py``: ``RESULT_FILE``); collected
#: records alone may sit in a folder the study then trains in
STUDY_RECORD = "result.json"

#: the folder an earlier run is moved to when a run starts over: ``RUN_DIR/earlier-<k>``
EARLIER_PREFIX = "earlier"

#: what a run leaves in its folder, moved aside together when a run starts over there
EARLIER_RUN: tuple[str, ...] = (
    "checkpoints",
    "metrics.jsonl",
    "recipe.yaml",
    "tb",
    *STALE_WHEN_TRAINING,
)

#: names that make a folder a run folder (anything else non-hidden in it: refused as -o)
RUN_MARKERS = frozenset((*EARLIER_RUN, STUDY_RECORD))


def _set_aside_earlier_run(run_dir: Path) -> Path | None:
    """Starting over (``--resume none``) where a run trained before: move its checkpoints,
    metrics, weights and recipe to ``run_dir/earlier-<k>`` (nothing is deleted), so that a later
    ``--resume auto`` can never pick up the earlier run's checkpoints (the new run's first
    checkpoint may be far off) and nothing of the two runs mixes. None if there was no run."""
    checkpoints = run_dir / "checkpoints"
    trained = any((run_dir / n).exists() for n in ("final.json", "model.safetensors")) or any(
        p.name == "latest" or p.name.startswith("step_") for p in checkpoints.glob("*")
    )
    if not trained:  # at most the torn records or temporary folders of a killed start
        return None
    k = 1
    while (aside := run_dir / f"{EARLIER_PREFIX}-{k}").exists():
        k += 1
    aside.mkdir()
    for name in EARLIER_RUN:
        if (run_dir / name).exists():
            os.replace(run_dir / name, aside / name)
    return aside


def training_run_at(path: Path) -> Path | None:
    """The training run folder that is ``path`` or holds it, if any: a folder with its
    recipe.yaml and its metrics.jsonl or checkpoints. A run's folder belongs to that run, so no
    other run or study is written into it (``-o runs/ref/x`` mixed a new run's files into the
    tree of runs/ref, and a study's ``-o runs/ref`` its variants)."""
    for folder in (path, *path.resolve().parents):
        has_record = (folder / "metrics.jsonl").is_file() or (folder / "checkpoints").is_dir()
        if (folder / "recipe.yaml").is_file() and has_record:
            return folder
    return None


def _check_run_dir(run_dir: Path) -> None:
    """A folder where the trainer writes a file (or a file where it makes a folder) is refused
    before any work: it used to surface as an ``IsADirectoryError`` / ``FileExistsError``
    traceback, for ``model.safetensors`` only after the whole run had trained. So is a
    non-empty folder that holds no run (``-o docs`` dropped checkpoints and weights among the
    documents)."""
    entries = [p.name for p in run_dir.iterdir() if not p.name.startswith(".")]
    is_run = any(n in RUN_MARKERS or n.startswith(f"{EARLIER_PREFIX}-") for n in entries)
    if entries and not is_run:
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise HybridkitError(
            f"{run_dir} holds files but no training run ({shown}; a run folder has recipe.yaml, "
            "metrics.jsonl or checkpoints); pass a new or empty folder as -o/--out"
        )
    for name, is_dir in RUN_DIR_LAYOUT.items():
        path = run_dir / name
        if path.exists() and path.is_dir() != is_dir:
            found, needed = (
                ("a directory", "a file") if path.is_dir() else ("a file", "a directory")
            )
            raise HybridkitError(
                f"{path} is {found}, but the trainer writes {needed} there; move it aside or "
                "pass another -o/--out"
            )


class TrainingDiverged(HybridkitError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


def model_fingerprint(recipe: RecipeSpec) -> str:
    """Hash of the model section: a checkpoint only loads into the architecture that wrote it."""
    return digest(recipe.model.model_dump(mode="json"))


def _eval_record(step: int, results: list[dict]) -> dict:
    """The metrics.jsonl line of one evaluation: ex_match per length under ``eval`` (what the
    plots and summaries read) and token accuracy under ``eval_tok_acc``: on tasks with many
    answers per example (MQAR's D queries) ex_match stays near 0 long after tok_acc moves, so
    learning would be invisible in ex_match alone."""
    return {
        "step": step,
        "eval": {str(r["length"]): r["ex_match"] for r in results},
        "eval_tok_acc": {str(r["length"]): r["tok_acc"] for r in results},
    }


class Trainer:
    """Train ``recipe`` into ``run_dir``: the object behind ``hybridkit train`` and the Python
    API (README "Python API").

    ``resume`` is ``"auto"`` (continue from the newest intact checkpoint in ``run_dir``, if
    any), ``None`` (start over) or a checkpoint directory. ``fit()`` trains to
    ``train.steps`` (or ``stop_after``) and returns the last metrics record: ``step``,
    ``loss``, ``lr``, ``grad_norm``, ..., plus, once the run is complete, ``final_eval`` (one
    dict per length: ``ex_match``, ``tok_acc``, ``scaled_acc``, ...) and ``wall_time_s``. The
    run directory then holds ``recipe.yaml`` (with its plugins), ``metrics.jsonl``,
    checkpoints, ``model.safetensors`` and ``final.json``; ``trainer.model`` is the trained
    model. Problems with the recipe, the task or a checkpoint raise
    :class:`~hybridkit.errors.HybridkitError` subclasses with a message naming what is wrong.

    ``deadline`` (a ``time.time()`` value; one process): a run whose first timed steps project
    its training to end after it saves a checkpoint and raises
    :class:`~hybridkit.errors.RunWouldNotFinish` (:meth:`_check_deadline`). Studies on machines
    lent by the call use it, so a run that cannot finish stops within a minute instead of
    holding the GPU until the call ends and losing the work anyway.
    """

    def __init__(
        self,
        recipe: RecipeSpec,
        run_dir: str | Path,
        *,
        resume: str | None = "auto",
        progress: bool = True,
        stop_after: int | None = None,
        deadline: float | None = None,
    ):
        if recipe.task is None:
            raise RecipeError(
                "<recipe>", [("task", "training needs a task section (e.g. kind: mqar)")]
            )
        # resolved once: refused now if the run folder could not read it back, written below
        recipe_text = dump_recipe(recipe)
        self.recipe, self.spec = recipe, recipe.train
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.stop_after = stop_after
        self.deadline = deadline
        self.seed = self.spec.seed if self.spec.seed is not None else recipe.seed
        prepare_process(self.spec.deterministic)  # before anything touches cuBLAS
        probe = resolve_device(self.spec.device)
        self.dist = dist_utils.init_distributed(probe.type)
        self.device = resolve_device(self.spec.device, self.dist.local_rank)
        self.task: Task = recipe.task.build()
        self.task.check_attributes()
        check_model_vocab(self.task, recipe.model.vocab_size, recipe.task.kind)
        per_rank = self.spec.batch_size // self.spec.grad_accum
        if per_rank % self.dist.world_size:
            raise RecipeError(
                "<recipe>",
                [
                    (
                        "train.batch_size",
                        f"{self.spec.batch_size} examples do not split over "
                        f"{self.spec.grad_accum} micro-batches x {self.dist.world_size} ranks",
                    )
                ],
            )
        self.micro_size = per_rank // self.dist.world_size
        # Before the model exists: a step or the in-training evaluation past the free memory
        # ends in the OOM killer's silence (on the CPU) or an opaque allocator error.
        check_training(
            recipe.model, recipe.task, self.spec.batch_size, self.micro_size, self.device
        )
        check_eval_lengths(
            recipe.model, recipe.task, [recipe.task.seq_len], recipe.eval.batch_size,
            recipe.task.eval_examples, self.device, lengths_key="task.seq_len",
        )  # fmt: skip
        unreached = recipe.task.unreached_curriculum(self.spec.steps)
        if unreached and self.dist.is_main:  # allowed (a short trial), but never silent
            print(f"warning: {unreached}", file=sys.stderr)
        self.model = build_model(recipe, seed=self.seed).to(self.device)
        self.model.activation_checkpointing = self.spec.activation_checkpointing
        self.model.loss_chunk_tokens = self.spec.resolved_loss_chunk(self.device.type)
        param_dtype = dist_utils.fsdp_param_dtype(
            self.spec.fsdp_mixed_precision, self.device, self.spec.precision
        )
        self.module = dist_utils.wrap_model(
            self.model, self.dist, self.spec.parallel, self.device, param_dtype
        )
        self.forward = self.module
        if self.spec.compile:
            self.forward = compile_module(self.module, self.spec.compile_mode)
        self._batches = (
            BatchPrefetcher(
                recipe_to_dict(recipe),
                self.seed,
                self.spec.batch_size,
                self.batch_for,
                end=self.spec.steps,
            )  # fmt: skip
            if self.spec.resolved_prefetch(self.device.type)
            else None
        )
        self.optimizer = build_optimizer(self.model, self.spec)
        self.peak = datasheet_peak(self.device)
        self._flops: dict[int, FlopCount] = {}  # per sequence length (attention grows with it)
        self.step = 0
        self._saved_step = -1  # step of the newest checkpoint on disk (written or resumed)
        # Steps between two synchronised ones (see train_step's ``sync``): a device flag set
        # by any non-finite loss or gradient norm among them, the first of them, and the clock
        # when it began.
        self._unchecked: torch.Tensor | None = None
        self._interval_first = 0
        self._interval_start: float | None = None
        self._t_start = time.time()
        self.elapsed = 0.0  # training wall time of earlier (interrupted) sessions
        self.history: list[dict] = []
        self._lock: DirLock | None = None
        if self.dist.is_main:
            owner = training_run_at(self.run_dir.parent)
            if owner is not None:
                raise HybridkitError(
                    f"{self.run_dir} lies inside the folder of the training run {owner}; pass a "
                    "-o/--out outside it"
                )
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _check_run_dir(self.run_dir)
        self._hold_run_dir()
        try:
            if resume is None and self.dist.is_main:
                aside = _set_aside_earlier_run(self.run_dir)
                if aside is not None:
                    print(f"starting over: the earlier run in {self.run_dir} moved to {aside}")
            dist_utils.barrier(self.dist)
            self.log = MetricsLog(
                self.run_dir, enabled=self.dist.is_main, tensorboard=self.spec.tensorboard
            )
            if resume is not None:
                self._resume(resume)
            # Records past the starting step come from an interrupted session (possibly killed
            # before its first checkpoint) and are about to be replayed: drop them.
            self.log.truncate_after(self.step)
            if self.dist.is_main:
                atomic_write_text(self.run_dir / "recipe.yaml", recipe_text)
        except BaseException:
            self.release()
            raise

    def _hold_run_dir(self) -> None:
        """Lock the run folder until fit() ends (main rank): a second trainer there is refused
        instead of interleaving its metrics and checkpoints with this one's."""
        if self.dist.is_main and self._lock is None:
            self._lock = DirLock(self.run_dir, "a training run")

    def release(self) -> None:
        """Let another trainer use the run folder (fit() does this when it returns)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- checkpoints ----------------------------------------------------------------------------
    def _state_dicts(self) -> tuple[dict, dict]:
        """Full (unsharded) weights and optimizer moments keyed by parameter name."""
        if self.dist.enabled and self.spec.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=opts)
            # With cpu_offload only rank 0 receives the full state; the others get empty dicts.
            flat = {
                f"{name}/{k}": v
                for name, st in optim_sd.get("state", {}).items()
                for k, v in st.items()
            }
            return model_sd, flat
        flat = {}
        state = self.optimizer.state
        for group in self.optimizer.param_groups:
            for name, p in zip(group["names"], group["params"]):
                for k, v in state.get(p, {}).items():
                    flat[f"{name}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        return self.model.state_dict(), flat

    def _load_state_dicts(self, model_sd: dict, optim_flat: dict) -> None:
        by_name: dict[str, dict] = {}
        for key, value in optim_flat.items():
            name, _, k = key.rpartition("/")
            by_name.setdefault(name, {})[k] = value
        if self.dist.enabled and self.spec.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            groups = [
                {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
            ]
            for g, src in zip(groups, self.optimizer.param_groups):
                g["params"] = list(src["names"])
            opts = StateDictOptions(full_state_dict=True)
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=model_sd,
                optim_state_dict={"state": by_name, "param_groups": groups},
                options=opts,
            )
            return
        missing = [k for k in self.model.state_dict() if k not in model_sd]
        if missing and missing != ["lm_head.weight"]:
            raise CheckpointError(f"checkpoint lacks weights for {missing[:3]}")
        self.model.load_state_dict(model_sd, strict=False)
        for group in self.optimizer.param_groups:
            for name, p in zip(group["names"], group["params"]):
                if name in by_name:
                    self.optimizer.state[p] = {k: v.to(p.device) for k, v in by_name[name].items()}

    def _resume(self, resume: str) -> None:
        """Continue from ``resume``: a checkpoint directory, or ``"auto"`` for the newest intact
        checkpoint of this run (a damaged newer one is skipped with a warning)."""
        if resume == "auto":
            found = newest_valid_checkpoint(self.run_dir, warn=self.dist.is_main)
            if found is None:
                return
            path, (model_sd, optim_flat, state) = found
        else:
            path = Path(resume)
            model_sd, optim_flat, state = read_checkpoint(path)
        if int(state["step"]) > self.spec.steps:
            raise CheckpointError(
                f"{path} is at step {state['step']}, past train.steps {self.spec.steps}: there is "
                "nothing left to train; raise train.steps to continue it, or use a new run "
                "directory"
            )
        if state.get("model_fingerprint") != model_fingerprint(self.recipe):
            raise CheckpointError(
                f"{path} was written by a different model architecture; refusing to resume "
                "(use the same recipe, --resume none to start this run over, or a new run "
                "directory)"
            )
        own = path.resolve().parent == (self.run_dir / "checkpoints").resolve()
        if own:
            self._refuse_changed_trajectory(path)
        if model_sd is None:  # a sharded checkpoint: loaded straight into the (sharded) model
            load_sharded(path, self.model, self.optimizer)
        else:
            self._load_state_dicts(model_sd, optim_flat)
        self.step = int(state["step"])
        if own:
            self._saved_step = self.step
            latest = self.run_dir / "checkpoints" / "latest"
            named = latest.read_bytes() if latest.is_file() else None
            if named != path.name.encode() and self.dist.is_main:
                # An explicit older checkpoint of this run, or the intact one `auto` fell back
                # to: the metrics past it are dropped below, so `latest` must name it too, or
                # `--resume auto` would jump back to the abandoned (or damaged) newer one.
                atomic_write_bytes(latest, path.name.encode())
        self.history = list(state.get("history", []))
        self.elapsed = float(state.get("elapsed_s", 0.0))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}")

    def _refuse_changed_trajectory(self, path: Path) -> None:
        """Refuse to continue this run's checkpoint under a recipe that changes its data, model
        or optimisation (``hybridkit/train/resume_check.py``): the run folder would describe
        training that never happened. Raising ``train.steps`` and execution settings may
        change."""
        try:
            # resolved again by this version, so that keys added since it was written compare
            # as their defaults instead of as changes
            earlier = load_recipe(self.run_dir / "recipe.yaml")
        except (OSError, UnicodeDecodeError, HybridkitError):
            return  # nothing this version can read to compare against
        changes = trajectory_changes(recipe_to_dict(earlier), recipe_to_dict(self.recipe))
        if changes:
            listed = "; ".join(changes[:8]) + ("; ..." if len(changes) > 8 else "")
            raise CheckpointError(
                f"{path} belongs to a run trained with another recipe ({listed}); resuming "
                "may change only train.steps and execution settings (device, compile, "
                "parallel, checkpoint / log / eval cadence, eval). Use --resume none to start "
                "this run over (the earlier run is moved aside) or a new run directory"
            )

    def _diverged(self, what: str) -> NoReturn:
        last = latest_checkpoint(self.run_dir)
        raise TrainingDiverged(
            f"training diverged {what}. "
            f"The last good checkpoint is {last or 'none (no checkpoint was written yet)'}; "
            "lower train.lr or raise train.warmup_steps and resume from it."
        )

    def _weights_finite(self) -> bool:
        """All parameters finite on every rank (one reduction, no per-tensor sync)."""
        flags = []
        for p in self.model.parameters():
            local = p.detach()
            local = local.to_local() if hasattr(local, "to_local") else local  # FSDP shard
            flags.append(~torch.isfinite(local).all())
        bad = torch.stack(flags).sum().to(torch.float64)
        return dist_utils.all_reduce_sum(bad, self.dist).item() == 0

    def save_checkpoint(self) -> None:
        if self._saved_step == self.step:
            # Already on disk (saved in the loop, or the resumed run had finished): rewriting it
            # would delete the directory `latest` names before its replacement is in place.
            return
        if not self._weights_finite():
            # A finite loss can still be followed by an update that overflows the weights;
            # never let such a checkpoint replace the last good one.
            self._diverged(f"by step {self.step}: the weights hold NaN/inf")
        state = {
            "format": "hybridkit-1",
            "step": self.step,
            "model_fingerprint": model_fingerprint(self.recipe),
            "torch_rng": torch.get_rng_state().tolist(),
            "history": self.history[-50:],
            "elapsed_s": self.elapsed + time.time() - self._t_start,
            "time": time.time(),
        }
        keep = self.spec.keep_checkpoints
        if self.spec.resolved_checkpoint_format() == "sharded":
            write_sharded_checkpoint(
                self.run_dir, self.step, self.model, self.optimizer, state, keep, self.dist
            )
        else:
            model_sd, optim_flat = self._state_dicts()
            if self.dist.is_main:
                write_checkpoint(self.run_dir, self.step, model_sd, optim_flat, state, keep)
        self._saved_step = self.step
        dist_utils.barrier(self.dist)

    # --- one step -------------------------------------------------------------------------------
    def batch_for(self, step: int):
        """The global batch of ``step``: a function of (data seed, step) only.

        The data seed is ``task.seed`` when the recipe sets it, else the init seed
        (``train.seed``, else the recipe's ``seed``); see :meth:`Task.train_rng`.
        """
        rng = self.task.train_rng(step, default_seed=self.seed)
        return self.task.train_batch(step, self.spec.batch_size, rng)

    def train_step(self, sync: bool = True) -> dict:
        """One optimizer step; returns its metrics record.

        ``sync=False`` leaves the loss and gradient norm on the device: no host synchronisation,
        so the host queues the next step while the GPU runs this one (a small model's step is
        host-bound, and under several runs sharing a GPU the waits add up). A non-finite value
        in such a step is kept in a device flag and reported by the next synchronised step,
        which also times the whole interval: :meth:`fit` synchronises only the steps it logs,
        evaluates or checkpoints (a checkpoint is never written past a non-finite step). The
        record of an unsynchronised step holds only ``step`` and ``lr``.

        With ``train.deterministic`` the step runs in :func:`deterministic_mode`.
        """
        with deterministic_mode(self.spec.deterministic):
            try:
                return self._train_step(sync)
            except (RuntimeError, AssertionError) as err:
                clear = explain(err) if self.spec.deterministic else None
                if clear is None:
                    raise
                raise clear from err

    def _train_step(self, sync: bool) -> dict:
        spec, step = self.spec, self.step
        if self._interval_start is None:
            self._interval_start, self._interval_first = time.perf_counter(), step
        lr = lr_at(step, spec)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self._batches.get(step) if self._batches is not None else self.batch_for(step)
        n_scored = int((batch.targets != IGNORE_INDEX).sum())
        if n_scored == 0:
            raise HybridkitError(
                f"the task produced a batch without scored positions at step {step}"
            )
        rank_rows = batch.select(
            slice(
                self.dist.rank * self.micro_size * spec.grad_accum,
                (self.dist.rank + 1) * self.micro_size * spec.grad_accum,
            )
        )
        scale = self.dist.world_size / n_scored
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for micro, part in enumerate(rank_rows.split(self.micro_size)):
            rows = scored_rows(part.targets, IGNORE_INDEX) if scored_rows_enabled() else None
            if rows is not None:
                rows = rows.to(self.device)
            inputs, targets = part.inputs.to(self.device), part.targets.to(self.device)
            last_micro = micro == spec.grad_accum - 1
            ctx = (
                self.module.no_sync()
                if (self.dist.enabled and not last_micro and hasattr(self.module, "no_sync"))
                else contextlib.nullcontext()
            )
            with ctx:
                if spec.compile:
                    begin_step(spec.compile_mode)
                with autocast_for(self.device, spec.precision):
                    loss = self.forward(
                        inputs, targets=targets, ignore_index=IGNORE_INDEX, scored=rows
                    )
                (loss * scale).backward()
            loss_sum += loss.detach().double()
        loss_sum = dist_utils.all_reduce_sum(loss_sum, self.dist)
        if spec.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), spec.grad_clip)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in self.model.parameters() if p.grad is not None])
            )
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        earlier = self._unchecked
        if not sync:
            bad = ~(torch.isfinite(loss_sum) & torch.isfinite(norm))
            self._unchecked = bad if earlier is None else earlier | bad
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            return {"step": self.step, "lr": lr}
        self._unchecked = None
        total, grad_norm = loss_sum.item() / n_scored, float(norm)
        if earlier is not None and bool(earlier):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(
                f"between step {self._interval_first + 1} and step {step}: a loss or gradient "
                "norm there was NaN/inf (only logged steps are checked one by one)"
            )
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(f"at step {step + 1}: loss {total}, grad norm {grad_norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        steps = step + 1 - self._interval_first
        dt = (time.perf_counter() - self._interval_start) / steps
        self._interval_start = None
        tokens = int(batch.inputs.numel())
        self.step += 1
        return {
            "step": self.step,
            "loss": total,
            "lr": lr,
            "grad_norm": grad_norm,
            **self._throughput(tokens, batch.inputs.shape[-1], dt),
            "step_time": dt,
        }

    def _throughput(self, tokens: int, seq_len: int, seconds: float) -> dict:
        """tokens/s, TFLOP/s and MFU of one step (see :func:`hybridkit.train.flops.throughput`;
        the first steps include compilation and kernel tuning, so read the later records)."""
        if seq_len not in self._flops:
            self._flops[seq_len] = flops_per_token(self.model, seq_len)
        count = self._flops[seq_len]
        return throughput(count, tokens, seconds, self.peak, self.dist.world_size)

    # --- evaluation inside training ----------------------------------------------------------
    def evaluate(self, lengths: list[int] | None = None) -> list[dict]:
        ev = self.recipe.eval
        lengths = lengths or [self.recipe.task.seq_len]
        with deterministic_kernels(self.spec.deterministic):
            return evaluate_lengths(
                self.model,
                self.task,
                lengths,
                batch_size=ev.batch_size,
                precision=self.spec.precision,
                decode_examples=0,
            )

    # --- the loop -------------------------------------------------------------------------------
    def _check_deadline(self, end: int) -> None:
        """At a synchronised step: raise :class:`RunWouldNotFinish` (after saving a checkpoint,
        which a later call on the same machine resumes from) when the run's rate since its
        first ``DEADLINE_SKIP_STEPS`` steps projects its last step past ``self.deadline``. The
        final evaluation is not in the projection: the caller's budget has to leave room for
        it."""
        if self.deadline is None:
            return
        now = time.time()
        probe = self._deadline_probe
        if probe is None:
            if self.step - self._fit_first_step >= DEADLINE_SKIP_STEPS:
                self._deadline_probe = (self.step, now)
            return
        finish = _projected_end(probe, self.step, now, end)
        if finish is None or finish <= self.deadline:
            return
        self.save_checkpoint()
        projected = self.elapsed + finish - self._t_start
        raise RunWouldNotFinish(
            f"{self.run_dir.name}: at step {self.step} of {end} its rate projects the last step "
            f"{finish - self.deadline:.0f} s past the deadline ({projected:.0f} s of training "
            f"in all); stopped, checkpoint saved",
            projected,
        )

    def fit(self) -> dict:
        """Train to ``train.steps`` (or ``stop_after``); returns the last metrics record."""
        spec = self.spec
        end = spec.steps if self.stop_after is None else min(spec.steps, self.stop_after)
        self._hold_run_dir()  # again, for a second fit() of this trainer
        last: dict = {"step": self.step}
        self._t_start = time.time()
        self._deadline_probe: tuple[int, float] | None = None
        self._fit_first_step = self.step
        if self.step < spec.steps and self.dist.is_main:
            # a run that trains on is unfinished: what describes its final (or an earlier
            # checkpoint's) weights would otherwise stand for a run that has moved on
            for name in STALE_WHEN_TRAINING:
                (self.run_dir / name).unlink(missing_ok=True)
        bar = _progress(
            self.progress and self.dist.is_main, spec.steps, self.step, self.run_dir.name
        )
        try:
            while self.step < end:
                # what happens after this step decides whether it waits for the GPU
                nxt = self.step + 1
                log = nxt % spec.log_every == 0 or nxt == end
                evaluate = bool(spec.eval_every and nxt % spec.eval_every == 0 and nxt < spec.steps)
                checkpoint = bool(spec.checkpoint_every and nxt % spec.checkpoint_every == 0)
                record = self.train_step(sync=log or evaluate or checkpoint)
                last = record
                if log:
                    self.log.log(record)
                    self.history.append({"step": self.step, "loss": record["loss"]})
                if evaluate:
                    res = self.evaluate()
                    self.log.log(_eval_record(self.step, res))
                if checkpoint:
                    self.save_checkpoint()
                if log:  # after this step's evaluation: a stop here keeps it
                    self._check_deadline(end)
                bar.update(self.step, record)
            if self.step >= spec.steps:
                self.save_checkpoint()
                res = self.evaluate()
                if "loss" not in last:  # a finished run run again: its last logged step
                    last = self.log.last_train_record(self.step) or last
                last = {
                    **last,
                    "final_eval": res,
                    "wall_time_s": self.elapsed + time.time() - self._t_start,
                }
                self.log.drop_evals_at(self.step)  # the earlier final evaluation, if any
                self.log.log(_eval_record(self.step, res))
                if self.dist.enabled and self.spec.parallel == "fsdp":
                    # model.state_dict() holds shards (DTensors): gather the full weights first.
                    weights, _ = self._state_dicts()
                    if self.dist.is_main:
                        save_weights(weights, self.run_dir / "model.safetensors")
                elif self.dist.is_main:
                    save_weights(self.model, self.run_dir / "model.safetensors")
                if self.dist.is_main:
                    atomic_write_bytes(
                        self.run_dir / "final.json",
                        json.dumps(last, indent=1, default=str).encode(),
                    )
        finally:
            bar.close()
            self.log.close()
            if self._batches is not None:
                self._batches.close()
                self._batches = None
            self.release()
        return last


#: steps a deadline ignores after ``fit()`` starts (compilation, autotuning, warm-up), then the
#: fewest it times before it judges the run
DEADLINE_SKIP_STEPS, DEADLINE_TIMED_STEPS = 10, 20


def _projected_end(probe: tuple[int, float], step: int, now: float, end: int) -> float | None:
    """When a run that was at ``probe`` = (step, time) and is at ``step`` now will reach
    ``end`` at the same rate; None until ``DEADLINE_TIMED_STEPS`` steps were timed."""
    timed = step - probe[0]
    if timed < DEADLINE_TIMED_STEPS:
        return None
    return now + (now - probe[1]) / timed * (end - step)


class _progress:
    """A rich progress bar with loss and ETA (silent when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int, name: str):
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn(f"[bold]{name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-")
            self.bar.start()

    def update(self, step: int, record: dict) -> None:
        if self.bar is not None:
            if "loss" in record:  # only synchronised steps carry it (Trainer.train_step)
                self.bar.update(self.task, completed=step, loss=f"{record['loss']:.4f}")
            else:
                self.bar.update(self.task, completed=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
