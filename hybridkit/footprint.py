"""Lower bounds on the memory a training step and an evaluation length need, compared with the
free memory of the device before anything large is allocated.

Why: past the machine's memory the kernel's OOM killer ends the process with no message at all
(a fuzz of the command line found 2^24-token evaluation and training lengths ending that way).
Both bounds count only what cannot be avoided -- the token tensors, the logits of one forward,
one bf16 activation per layer and token -- so a refusal is certain to be right; work that passes
may still need more (the real activations are several times the bound), which is the
allocator's error to report. The token tensors of a whole evaluation set or batch live in host
memory and are checked against it; what one forward holds is checked against the device's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hybridkit.errors import HybridkitError
from hybridkit.recipe import RecipeSpec
from hybridkit.runtime import free_memory_bytes
from hybridkit.spec import ModelSpec
from hybridkit.summary import human_bytes
from hybridkit.tasks.base import TaskSpec

INT64 = 8
LOW_PRECISION = 2  # bytes of a bf16 / fp16 activation: the smallest any layer stores


def eval_bytes(
    model: ModelSpec, task: TaskSpec, length: int, batch: int, examples: int, kept_arrays: int = 3
) -> tuple[int, int]:
    """(host, device) bytes evaluating ``examples`` sequences of natural length ``length`` in
    forward passes of ``batch`` holds at least: on the host the eval set's inputs and targets
    plus every prediction (``kept_arrays`` int64 arrays, kept for the whole length); on the
    device one forward's logits and residual stream."""
    tokens = task.token_length(length)
    kept = examples * tokens * kept_arrays * INT64
    rows = min(batch, examples) * tokens
    forward = rows * (model.vocab_size + 2 * model.d_model) * LOW_PRECISION
    return kept, forward


def train_bytes(model: ModelSpec, task: TaskSpec, batch: int, micro_batch: int) -> tuple[int, int]:
    """(host, device) bytes one training step at the task's longest length holds at least: on
    the host the step's inputs and targets (int64); on the device, for the backward, one
    low-precision activation per layer for every token of a micro-batch."""
    tokens = task.token_length(task.max_train_length())
    return batch * tokens * 2 * INT64, saved_activation_bytes(model, micro_batch, tokens)


def saved_activation_bytes(model: ModelSpec, rows: int, tokens: int) -> int:
    """What a backward needs at least: one low-precision activation per layer and token."""
    return rows * tokens * model.n_layer * model.d_model * LOW_PRECISION


def refuse_if_short(
    need: tuple[int, int], device: torch.device | str, what: str, advice: str
) -> None:
    """Raise :class:`HybridkitError` when the (host, device) bytes ``need`` exceed the free
    memory of the host or of ``device`` (their sum, when ``device`` is the CPU): "``what``
    needs at least N, but DEVICE has M free; ``advice``"."""
    host, on_device = need
    device = torch.device(device)
    if device.type == "cpu":
        parts = [("cpu", host + on_device)]
    else:
        parts = [("cpu", host), (str(device), on_device)]
    for where, bytes_needed in parts:
        free = free_memory_bytes(where)
        if free is not None and bytes_needed > free:
            raise HybridkitError(
                f"{what} needs at least {human_bytes(bytes_needed)}"
                + (" of host memory" if where == "cpu" and device.type != "cpu" else "")
                + f", but {where} has {human_bytes(free)} free; {advice}"
            )


def check_eval_lengths(
    model: ModelSpec,
    task: TaskSpec,
    lengths: Sequence[int],
    batch: int,
    examples: int,
    device: torch.device | str,
    *,
    lengths_key: str,
    examples_key: str = "task.eval_examples",
) -> None:
    """Refuse the first of ``lengths`` whose evaluation cannot fit on ``device``, naming the
    setting it came from (``lengths_key``: ``task.eval_lengths``, ``eval.lengths``, ``--lengths``
    or a study's ``lengths``) and the two that shrink it."""
    for length in lengths:
        refuse_if_short(
            eval_bytes(model, task, length, batch, examples),
            device,
            f"{lengths_key} {length}: evaluating {examples} examples of "
            f"{task.token_length(length)} tokens, {min(batch, examples)} per forward,",
            f"lower the length, {examples_key} or eval.batch_size",
        )


def check_recipe_eval(
    recipe: RecipeSpec,
    lengths: Sequence[int] | None,
    device: torch.device | str,
    *,
    given_key: str,
    where: str = "",
) -> None:
    """:func:`check_eval_lengths` for evaluating a run of ``recipe`` at ``lengths`` (None or
    empty: its ``eval.lengths``, else ``task.eval_lengths``) with its ``eval`` settings, naming
    ``given_key`` (``--lengths``, a study's ``lengths``) or the recipe key the lengths came from,
    followed by ``where``."""
    ev, task = recipe.eval, recipe.task
    key = given_key if lengths else "eval.lengths" if ev.lengths else "task.eval_lengths"
    check_eval_lengths(
        recipe.model,
        task,
        list(lengths or ev.lengths or task.eval_lengths),
        ev.batch_size,
        ev.examples if ev.examples is not None else task.eval_examples,
        device,
        lengths_key=key + where,
        examples_key="eval.examples" if ev.examples is not None else "task.eval_examples",
    )


def check_prompt_examples(recipe: RecipeSpec, length: int, device: torch.device | str) -> None:
    """Refuse ``generate --task-examples`` at ``length`` when the task's test set (built whole,
    inputs and targets) cannot fit on the host or one prompt's forward on ``device``."""
    task = recipe.task
    # inputs and targets (no predictions kept), one prompt per forward
    need = eval_bytes(recipe.model, task, length, 1, task.eval_examples, kept_arrays=2)
    refuse_if_short(
        need,
        device,
        f"--length {length}: the test set of {task.eval_examples} examples of "
        f"{task.token_length(length)} tokens and one prompt's forward",
        "lower --length or task.eval_examples",
    )


def check_training(
    model: ModelSpec, task: TaskSpec, batch: int, micro_batch: int, device: torch.device | str
) -> None:
    """Refuse a training step that cannot fit on ``device``, naming the settings that shrink it."""
    length = task.max_train_length()
    refuse_if_short(
        train_bytes(model, task, batch, micro_batch),
        device,
        f"a training step of {micro_batch} x {task.token_length(length)} tokens "
        f"({model.n_layer} layers of width {model.d_model}; longest task length {length})",
        "lower task.seq_len (or the longest length of task.length_mixture / task.curriculum), "
        "train.batch_size, or raise train.grad_accum",
    )


def check_bench_step(
    model: ModelSpec, batch: int, seq_len: int, device: torch.device | str
) -> None:
    """``hybridkit bench train``'s step (random ids of ``batch`` x ``seq_len`` tokens, made on
    the host, then one forward and backward on ``device``), refused before the model is built
    when even the lower bound of :func:`train_bytes` cannot fit: a huge ``--batch`` was ended
    by the OOM killer with no message."""
    host = batch * (seq_len + 1) * INT64
    refuse_if_short(
        (host, saved_activation_bytes(model, batch, seq_len)),
        device,
        f"a benchmark step of {batch} x {seq_len} tokens ({model.n_layer} layers of width "
        f"{model.d_model})",
        "lower --batch or --seq-len",
    )
