"""The ``eval`` section of a recipe: which lengths to evaluate and how."""

from __future__ import annotations

from pydantic import Field

from hybridkit.schema import StrictModel


class EvalSpec(StrictModel):
    """Length-generalisation evaluation. Lengths are in the task's natural unit."""

    lengths: list[int] | None = Field(
        default=None, description="lengths to evaluate; default: the task's eval_lengths"
    )
    batch_size: int = Field(default=64, gt=0, description="examples per forward pass")
    examples: int | None = Field(
        default=None, gt=0, description="examples per length; default: task.eval_examples"
    )
    decode_examples: int = Field(
        default=8, ge=0, description="examples per length also run through token-by-token decode"
    )
    decode_max_length: int = Field(
        default=1024, ge=0, description="skip the decode-path check above this many tokens"
    )
