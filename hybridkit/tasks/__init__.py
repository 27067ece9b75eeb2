"""Synthetic tasks and LM data. Importing this package registers the built-in task kinds.

A recipe's ``task`` section is validated by :class:`TaskSpec` (dispatching on ``kind``);
``spec.build()`` returns a :class:`Task` that draws seeded batches for training
(``train_batch``) and fixed evaluation sets (``eval_set``); :func:`score` turns predictions into
:class:`Metrics` (tok_acc, ex_match, scaled_acc). See docs/tasks.md for the task definitions.
"""

from hybridkit.tasks.base import (
    IGNORE_INDEX,
    Batch,
    CurriculumStage,
    LengthWeight,
    Task,
    TaskError,
    TaskSpec,
    make_batch,
)
from hybridkit.tasks.induction import InductionSpec
from hybridkit.tasks.lm import TextSpec, TokensSpec
from hybridkit.tasks.metrics import Metrics, score
from hybridkit.tasks.modarith import ModArithSpec
from hybridkit.tasks.mqar import MQARSpec
from hybridkit.tasks.niah import NIAHSpec
from hybridkit.tasks.parity import ParitySpec
from hybridkit.tasks.selective_copy import SelectiveCopySpec

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "CurriculumStage",
    "InductionSpec",
    "LengthWeight",
    "MQARSpec",
    "Metrics",
    "ModArithSpec",
    "NIAHSpec",
    "ParitySpec",
    "SelectiveCopySpec",
    "Task",
    "TaskError",
    "TaskSpec",
    "TextSpec",
    "TokensSpec",
    "make_batch",
    "score",
]
