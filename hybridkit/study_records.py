"""Shapes of the JSON files a study keeps in each run folder, checked before they are trusted.

A study reads back what earlier invocations wrote (``result.json``, ``eval.json``,
``heldout.json``) and skips the work they stand for. Such a file can be cut short, copied from an
older hybridkit or edited by hand; a file that parses but lacks a field the report reads would
otherwise surface as a KeyError deep in the report. A record that fails these checks counts as
not written, like a damaged one: the study makes it again from the run (evaluating its weights,
or training when they are gone) instead of stopping.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_Number = Annotated[float, Field(allow_inf_nan=False)]
_Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class _Shape(BaseModel):
    # strict: a number written as a string or a bool is not a number; extra keys (a newer
    # hybridkit's, the decode subset) are kept and ignored
    model_config = ConfigDict(strict=True, extra="allow")


class LengthResult(_Shape):
    """One evaluation length's scores (``hybridkit.eval.lengthgen``)."""

    length: int = Field(gt=0)
    tokens: int = Field(gt=0)
    examples: _Number = Field(gt=0)
    tok_acc: _Fraction
    ex_match: _Fraction
    scaled_acc: _Number


class EvalPayload(_Shape):
    """What ``eval.json`` must hold for the study to reuse it."""

    task: str
    train_length: int = Field(gt=0)
    chance: _Fraction
    results: list[LengthResult] = Field(min_length=1)


class RunRecord(EvalPayload):
    """A finished run's ``result.json`` (written by ``hybridkit.study.run_slot``)."""

    variant: str
    seed: int = Field(ge=0)
    lr: _Number = Field(gt=0)
    run: str
    recipe_fingerprint: str
    heldout: dict[str, Any]
    params: int = Field(ge=0)
    state_bytes_per_seq: _Number = Field(ge=0)
    kv_bytes_per_token: _Number = Field(ge=0)
    train_wall_time_s: _Number = Field(ge=0)
    eval_wall_time_s: _Number = Field(ge=0)


def _valid(shape: type[BaseModel], data: Any) -> bool:
    try:
        shape.model_validate(data)
    except ValidationError:
        return False
    return True


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def valid_record(data: Any, metric: str) -> bool:
    """``data`` has every field the report reads, and its held-out scores hold ``metric`` (the
    one the LR choice compares) as a finite number."""
    return _valid(RunRecord, data) and _finite_number(data["heldout"].get(metric))


def valid_eval(data: Any) -> bool:
    """``data`` is an ``eval.json`` payload the study can turn into a record."""
    return _valid(EvalPayload, data)


def valid_heldout(data: Any, metric: str) -> bool:
    """``data`` is a ``heldout.json`` payload holding ``metric`` as a finite number."""
    return _valid(LengthResult, data) and _finite_number(data.get(metric))
