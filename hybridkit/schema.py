"""The bottom of every recipe section: the strict pydantic base class and dotted-path helpers.

Recipe sections live in many packages (layer specs in ``layers/``, task specs in ``tasks/``, the
train and eval sections in ``recipe_sections.py``, study files in ``study.py``). They all need the
same base class, and several of them walk nested data along a dotted key (``--set a.b.0=c``,
``overrides: {5: {mixer.window: 8}}``, the value behind a pydantic error's ``loc``). Keeping both
here, with nothing above it imported, lets every one of those packages depend on this module
alone instead of on each other (a task spec has no business importing the layer package just to
get a base class).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "MAX_KEY_PARTS",
    "MISSING",
    "SPEC_PROBLEM",
    "StrictModel",
    "get_path",
    "raise_problems",
    "set_path",
    "spec_problem",
    "split_path",
    "yaml_type",
]

SPEC_PROBLEM = "spec_problem"
"""Error type of problems whose message is already user-ready (it names the bad value and what
is allowed); the recipe loader prints such a message as it is, at its ``loc``."""


def spec_problem(loc: tuple[Any, ...], message: str, value: Any) -> InitErrorDetails:
    """One pydantic line error with a ready-made message, located at ``loc``."""
    return {
        "type": PydanticCustomError(SPEC_PROBLEM, "{message}", {"message": message}),
        "loc": loc,
        "input": value,
    }


def raise_problems(title: str, problems: list[InitErrorDetails]) -> None:
    """Raise all collected problems at once, so the user can fix them in one go.

    Raised inside a validator, pydantic prefixes each ``loc`` with the path of the value being
    validated, so the problem lands on the exact key (``model.blocks.m.mixer.kind``).
    """
    if problems:
        raise ValidationError.from_exception_data(title, problems)


class StrictModel(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are re-validated on edit.

    ``extra="forbid"`` is what turns a typo in a YAML key into an error naming the allowed keys
    instead of a silently ignored setting; ``validate_assignment`` keeps a spec valid when code or
    a study edits it after loading. NaN and infinity are never a sensible setting (``lr: .inf``
    only diverges later), so float fields refuse them, and an integer that does not fit in 64
    bits is refused wherever it appears (no tensor, seed or numpy array can hold it; sizes that
    large would reach torch as an overflow traceback).
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )

    removed_keys: ClassVar[dict[str, str]] = {}
    """Keys this section used to accept -> what to do instead. A removed setting gets an error
    that explains itself rather than the generic "unknown key" a typo gets."""

    @model_validator(mode="before")
    @classmethod
    def _reject_huge_integers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            raise_problems(
                cls.__name__,
                [
                    spec_problem(loc, f"{describe_int(value)} is out of range; {INT64_ALLOWED}", 0)
                    for loc, value in _huge_integers(data)
                ],
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def _reject_booleans_for_numbers(cls, data: Any) -> Any:
        # pydantic reads true as 1 for a number field: `steps: true` would train one step
        if not isinstance(data, dict):
            return data
        problems = []
        for key, value in data.items():
            if key not in cls.model_fields:
                continue
            annotation = cls.model_fields[key].annotation
            if isinstance(value, bool) and _number_only(annotation):
                problems.append(((key,), value))
            elif isinstance(value, (list, tuple)) and _numbers_only(annotation):
                problems += [((key, i), v) for i, v in enumerate(value) if isinstance(v, bool)]
            elif isinstance(value, dict):  # dict[int, ...] keys (layer overrides), values
                numeric_keys, numeric_values = _dict_numbers(annotation)
                for k, v in value.items():
                    if numeric_keys and isinstance(k, bool):
                        problems.append(((key, str(k).lower()), k))
                    elif numeric_values and isinstance(v, bool):
                        problems.append(((key, k), v))
        message = "must be a number; got a boolean ({})"
        raise_problems(
            cls.__name__,
            [spec_problem(loc, message.format(str(v).lower()), v) for loc, v in problems],
        )
        return data

    @model_validator(mode="before")
    @classmethod
    def _reject_removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.removed_keys:
            problems = [
                InitErrorDetails(
                    type=PydanticCustomError("removed_key", "{message}", {"message": message}),
                    loc=(key,),
                    input=data[key],
                )
                for key, message in cls.removed_keys.items()
                if key in data
            ]
            if problems:
                raise ValidationError.from_exception_data(cls.__name__, problems)
        return data


def _leaf_types(annotation: Any) -> list[Any]:
    """The types a field's annotation accepts, unwrapped from ``Annotated`` and unions."""
    leaves, todo = [], [annotation]
    while todo:
        tp = todo.pop()
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            todo.append(typing.get_args(tp)[0])
        elif origin in (typing.Union, types.UnionType):
            todo.extend(typing.get_args(tp))
        else:
            leaves.append(tp)
    return leaves


def _number_only(annotation: Any) -> bool:
    """Whether a field's type takes numbers and nothing else but None (``int``,
    ``float | None``, ...)."""
    arms = []
    for tp in _leaf_types(annotation):
        if typing.get_origin(tp) is typing.Literal:
            arms += [type(v) for v in typing.get_args(tp)]
        else:
            arms.append(tp)
    # only numbers (and None): a field that also takes other values ('auto', a string) has its
    # own validation, with a message naming them
    return any(a in (int, float) for a in arms) and all(a in (int, float, type(None)) for a in arms)


def _numbers_only(annotation: Any) -> bool:
    """Whether a field's type is a list / tuple of numbers alone (``list[int]``,
    ``tuple[float, float]``, optionally ``| None``): its items must not be booleans either."""
    found = False
    for tp in _leaf_types(annotation):
        if typing.get_origin(tp) in (list, tuple):
            items = [a for a in typing.get_args(tp) if a is not Ellipsis]
            if not items or not all(_number_only(a) for a in items):
                return False
            found = True
        elif tp is not type(None):
            return False
    return found


def _dict_numbers(annotation: Any) -> tuple[bool, bool]:
    """Whether a dict field's keys, and its values, take numbers alone (``dict[int, ...]``,
    ``dict[PositiveInt, PositiveInt]``, optionally ``| None``)."""
    for tp in _leaf_types(annotation):
        if typing.get_origin(tp) is dict:
            key, value = typing.get_args(tp) or (Any, Any)
            return _number_only(key), _number_only(value)
    return False, False


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT64_ALLOWED = "allowed: a 64-bit integer (at most 9223372036854775807 in magnitude)"


def describe_int(value: int) -> str:
    """``integer 123`` or, past Python's digit limit for ``str(int)``, ``a 5000-digit integer``."""
    digits = len(str(abs(value))) if value.bit_length() < 10_000 else None
    if digits is not None and digits <= 40:
        return f"integer {value}"
    digits = digits or int(value.bit_length() * 0.30103) + 1
    return f"a {digits}-digit integer"


def _huge_integers(data: Any) -> list[tuple[tuple[Any, ...], int]]:
    """``(loc, value)`` of every integer below ``data`` that does not fit in 64 bits."""
    found = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    while stack:
        loc, node = stack.pop()
        if isinstance(node, int) and not isinstance(node, bool):
            if not INT64_MIN <= node <= INT64_MAX:
                found.append((loc, node))
        elif isinstance(node, dict):
            stack.extend(((*loc, k), v) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend(((*loc, i), v) for i, v in enumerate(node))
    return sorted(found, key=lambda item: [str(p) for p in item[0]])


MAX_KEY_PARTS = 64
"""Most segments a dotted key (``--set a.b.c=...``, an ``overrides`` key) may have."""

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()
"""Returned by :func:`get_path` for a path that leads nowhere (``None`` can be a real value)."""


def split_path(key: str) -> tuple[str | int, ...]:
    """``"curriculum.0.min_len"`` -> ``("curriculum", 0, "min_len")``: a pydantic-style ``loc``.

    Digit segments become ints because that is how pydantic locates list items.
    """
    return tuple(int(p) if p.isdigit() else p for p in key.split(".")) if key else ()


def _child(node: Any, part: Any) -> Any:
    """One step of a path: a mapping key (also an int key written as text), a list index or an
    attribute (pydantic models). :data:`MISSING` if there is nothing there."""
    if isinstance(node, Mapping):
        text = str(part)
        candidates = [part, text] + ([int(text)] if text.lstrip("-").isdigit() else [])
        for candidate in candidates:
            if candidate in node:
                return node[candidate]
        return MISSING
    if isinstance(node, Sequence) and not isinstance(node, str):
        try:
            index = int(part)
        except (TypeError, ValueError):
            return MISSING
        return node[index] if -len(node) <= index < len(node) else MISSING
    return getattr(node, part, MISSING) if isinstance(part, str) else MISSING


def get_path(node: Any, parts: Sequence[Any], default: Any = None) -> Any:
    """The value at ``parts`` below ``node`` (mappings, lists and objects mixed), or ``default``."""
    for part in parts:
        node = _child(node, part)
        if node is MISSING:
            return default
    return node


def yaml_type(value: Any) -> str:
    """How a user would call ``value``'s type in a YAML file (for error messages)."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return "null" if value is None else names.get(type(value), f"a {type(value).__name__}")


def set_path(node: Any, parts: Sequence[str], value: Any, *, create: bool) -> str | None:
    """Set the value at ``parts`` below ``node`` in place; returns an error message or None.

    Mappings and lists are walked (list items by integer index). With ``create`` a missing mapping
    on the way is created (a ``--set`` may name a section the YAML file leaves out; pydantic then
    judges the key); without it, a missing intermediate key is an error, while a missing *last*
    key is still set, so that re-validation can report it with the allowed keys of its model.
    """
    parts = list(parts)
    if len(parts) > MAX_KEY_PARTS:
        # Matching dotted keys costs len(parts)**2 per level; no recipe key is this deep.
        return f"the key has {len(parts)} dotted parts; allowed: at most {MAX_KEY_PARTS}"
    walked: list[str] = []
    while parts:
        if isinstance(node, dict):
            key, used = _dict_key(node, parts)
            walked += parts[:used]
            parts = parts[used:]
            if not parts:
                node[key] = value
                return None
            if key not in node:
                if not create:
                    return f"unknown key {'.'.join(walked)!r}"
                node[key] = {}
            node = node[key]
        elif isinstance(node, list):
            part = parts.pop(0)
            try:
                index = int(part)
            except ValueError:
                return f"{'.'.join(walked) or '<root>'} is a list; {part!r} is not an integer index"
            if not -len(node) <= index < len(node):
                return (
                    f"index {index} is out of range for {'.'.join(walked)} "
                    f"(allowed: {-len(node)}..{len(node) - 1})"
                )
            walked.append(part)
            if not parts:
                node[index] = value
                return None
            node = node[index]
        else:
            return (
                f"cannot set {'.'.join(parts)!r} inside {'.'.join(walked)!r}, which is "
                f"{yaml_type(node)}, not a mapping"
            )
    return None


def _dict_key(node: dict[Any, Any], parts: Sequence[str]) -> tuple[Any, int]:
    """The key of ``node`` that the next path segments address, and how many segments it uses.

    Prefers the longest existing dotted key (``overrides: {5: {mixer.window: 8}}`` has a key with
    a dot in it) and matches integer keys written as text (``overrides.5``).
    """
    for used in range(len(parts), 0, -1):
        candidate = ".".join(parts[:used])
        if candidate in node:
            return candidate, used
        if candidate.lstrip("-").isdigit() and int(candidate) in node:
            return int(candidate), used
    return parts[0], 1
