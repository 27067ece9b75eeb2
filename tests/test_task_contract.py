"""The Task API contract (docs/tasks.md section 9) is enforced where batches are made: a buggy
user task gets an error naming the task and what is wrong, never an IndexError from the
embedding or a ValueError from the loss."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from hybridkit import register_task
from hybridkit.eval.lengthgen import evaluate_lengths
from hybridkit.recipe import dump_recipe, load_recipe
from hybridkit.tasks import IGNORE_INDEX, Batch, Task, TaskError, TaskSpec, make_batch
from hybridkit.train.trainer import Trainer
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

Bug = Literal[
    "none",
    "id_too_large",
    "short_targets",
    "nothing_scored",
    "int32",
    "wrong_width",
    "bad_target",
    "no_length_meta",
    "late_id_too_large",
    "numpy",
]


@register_task
class BuggySpec(TaskSpec):
    """A copy task whose generator can break the contract in one chosen way."""

    kind: Literal["zz_buggy"] = "zz_buggy"
    seq_len: int = 4
    bug: Bug = "none"

    def token_length(self, length: int) -> int:
        return 2 * length

    def build(self) -> BuggyTask:
        return BuggyTask(self)


class BuggyTask(Task):
    vocab_size, chance, pad_id = 12, 0.1, 0

    def __init__(self, spec: BuggySpec):
        super().__init__(spec)
        self.calls = 0

    def sample(self, n: int, length: int, rng: np.random.Generator) -> Batch:
        self.calls += 1
        bug = self.spec.bug
        items = rng.integers(2, 12, size=(n, length))
        full = np.concatenate([items, np.ones((n, 1), dtype=np.int64), items], axis=1)
        inputs, targets = full[:, :-1], full[:, 1:].copy()
        targets[:, :length] = IGNORE_INDEX
        if bug == "id_too_large" or (bug == "late_id_too_large" and self.calls > 1):
            inputs[0, 1] = 12
        if bug == "short_targets":
            targets = targets[:, :-1]
        if bug == "nothing_scored":
            targets[min(3, n - 1)] = IGNORE_INDEX
        if bug == "wrong_width":
            inputs, targets = inputs[:, 1:], targets[:, 1:]
        if bug == "bad_target":
            targets[1, -1] = -5
        batch = make_batch(inputs, targets, length)
        if bug == "int32":
            batch.inputs = batch.inputs.int()
        if bug == "no_length_meta":
            del batch.meta["length"]
        if bug == "numpy":
            return (inputs, targets)  # type: ignore[return-value]
        return batch


def recipe(bug: str, **train):
    return load_recipe(
        {
            "model": tiny_model("m a", vocab=12),
            "task": {"kind": "zz_buggy", "bug": bug, "eval_lengths": [4], "eval_examples": 8},
            "train": {"steps": 3, "batch_size": 8, "device": "cpu", "tensorboard": False, **train},
            "eval": {"decode_examples": 0},
        }
    )


@pytest.mark.parametrize(
    ("bug", "needle"),
    [
        (
            "id_too_large",
            "input id 12 at row 0, position 1 is outside the task's vocabulary [0, 12)",
        ),
        ("short_targets", "targets have shape (8, 7) but inputs (8, 8)"),
        ("nothing_scored", "row 3 has no scored position"),
        ("int32", "inputs are torch.int32; ids must be torch.int64"),
        ("wrong_width", "7 tokens per example, but token_length(4) = 8"),
        (
            "bad_target",
            "target -5 at row 1, position 7 is neither an id in [0, 12) nor IGNORE_INDEX",
        ),
        ("no_length_meta", 'meta["length"] is missing'),
        ("numpy", "expected a Batch (see make_batch), got tuple"),
    ],
)
def test_a_bad_first_batch_names_the_task_and_the_problem(bug, needle, tmp_path):
    with pytest.raises(TaskError) as err:
        Trainer(recipe(bug), tmp_path / "run", resume=None, progress=False).fit()
    message = str(err.value)
    assert message.startswith("task 'zz_buggy' returned a bad batch from BuggyTask.sample(n=8")
    assert needle in message, message


def test_later_batches_are_checked_cheaply_too(tmp_path):
    """The second batch of a length skips the per-row checks but not the id range."""
    trainer = Trainer(recipe("late_id_too_large"), tmp_path / "run", resume=None, progress=False)
    with pytest.raises(TaskError, match="input id 12 at row 0"):
        trainer.fit()
    assert trainer.step == 1 and trainer.task.calls == 2


def test_evaluation_sets_are_checked(tmp_path):
    from hybridkit.build import build_model

    spec = recipe("id_too_large")
    with pytest.raises(TaskError, match=r"BuggyTask.sample\(n=8, length=4\)"):
        evaluate_lengths(build_model(spec), spec.task.build(), [4], batch_size=4)


def test_task_attributes_are_checked(tmp_path):
    class NoVocab(BuggyTask):
        vocab_size = None  # type: ignore[assignment]

    class BadChance(BuggyTask):
        chance = 1.5

    for cls, needle in ((NoVocab, "must set vocab_size"), (BadChance, "must set chance")):
        task = cls(recipe("none").task)
        with pytest.raises(TaskError, match=needle):
            task.check_attributes()
        with pytest.raises(TaskError, match=needle):
            task.sample(2, 4, np.random.default_rng(0))


def test_a_correct_task_passes_and_keeps_its_results(tmp_path):
    out = Trainer(recipe("none"), tmp_path / "run", resume=None, progress=False).fit()
    assert out["step"] == 3 and torch.isfinite(torch.tensor(out["loss"]))


BUGGY_PLUGIN = """
from pathlib import Path
from typing import Literal
import numpy as np
from hybridkit import register_task
from hybridkit.tasks import IGNORE_INDEX, Task, TaskSpec, make_batch


@register_task
class OffByOneSpec(TaskSpec):
    kind: Literal["zz_off_by_one"] = "zz_off_by_one"

    def build(self):
        return OffByOne(self)


class OffByOne(Task):
    vocab_size, chance = 8, 0.125

    def sample(self, n, length, rng):
        ids = rng.integers(0, 9, size=(n, length))  # 9: one past the vocabulary
        return make_batch(ids, ids, length)
"""


def test_a_buggy_plugin_task_fails_cleanly_from_the_command_line(tmp_path, cli_error):
    plugin = tmp_path / "off_by_one.py"
    plugin.write_text(BUGGY_PLUGIN)
    spec = {
        "model": tiny_model("m a", vocab=8),
        "task": {"kind": "zz_off_by_one", "seq_len": 16, "eval_examples": 8},
        "train": {"steps": 2, "batch_size": 4, "device": "cpu", "tensorboard": False},
    }
    path = tmp_path / "r.yaml"
    dump_recipe(load_recipe(spec, plugins=[str(plugin)]), path)
    msg = cli_error("train", str(path), "-o", str(tmp_path / "run"), "--no-progress")
    assert "task 'zz_off_by_one' returned a bad batch from OffByOne.sample(n=4, length=16)" in msg
    assert "is outside the task's vocabulary [0, 8)" in msg


def test_the_custom_task_of_docs_tasks_md_runs(capsys):
    """docs/tasks.md section 9.6 is a complete example; it keeps the contract it describes."""
    text = (Path(__file__).parent.parent / "docs" / "tasks.md").read_text()
    section = text[text.index("### 9.6") : text.index("### 9.7")]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    # dont_inherit: the snippet runs as written, without this module's `from __future__` flags.
    exec(compile(code, "docs/tasks.md#9.6", "exec", dont_inherit=True), {"__name__": "docs_9_6"})
    assert "'ex_match': 1.0" in capsys.readouterr().out
