"""Errors a user can act on.

Every error raised because of bad input (a recipe key, a CLI flag, a checkpoint) derives from
:class:`HybridkitError`. The CLI prints its message and exits with status 2 instead of showing a
Python traceback, so the message itself must say *where* the problem is (file and dotted key) and
*what would be accepted*.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class HybridkitError(Exception):
    """Base class for errors caused by user input; the CLI prints these without a traceback."""


class RecipeError(HybridkitError):
    """A recipe (YAML file, override or Python dict) or a study file failed validation.

    ``problems`` is a list of ``(dotted_key, message)`` pairs so that callers and tests can
    inspect individual problems; ``str(err)`` is the full, human-readable report. ``what`` names
    the kind of file in that report (``recipe`` or ``study``).
    """

    def __init__(self, source: str, problems: Iterable[tuple[str, str]], what: str = "recipe"):
        self.source = source
        self.problems = list(problems)
        lines = [f"invalid {what} {source}:"]
        hint = _other_kind_hint(what, self.problems)
        if hint:
            lines.append(f"  {hint}")
        for key, msg in self.problems:
            # A problem of the whole file (bad YAML, not a mapping) has no key to name.
            lines.append(f"  {key}: {msg}" if key else f"  {msg}")
        super().__init__("\n".join(lines))


def _other_kind_hint(what: str, problems: list[tuple[str, str]]) -> str | None:
    """One line when the file is the other kind (a recipe given to ``study``, a study file to
    ``train``): otherwise the report is a screen of "unknown key" lines with no word of it."""
    unknown = {key for key, msg in problems if msg.startswith("unknown key")}
    if what == "study" and "model" in unknown:
        return (
            "this file is a recipe (it has a model section), not a study: train it with "
            "`hybridkit train`, or name it as a study's `base:`"
        )
    if what == "recipe" and unknown & {"base", "variants", "sweep"}:
        return "this file is a study (it has base / variants), not a recipe: run `hybridkit study`"
    return None


class CheckpointError(HybridkitError):
    """A checkpoint is missing, truncated, or belongs to a different model."""


class RunWouldNotFinish(HybridkitError):
    """A run given a deadline (``Trainer(deadline=...)``, a study's ``--time-budget``) was
    projected, from its first timed steps, to end past it; it stopped with a checkpoint saved.
    ``projected_s`` is the whole run's projected training time in seconds."""

    def __init__(self, message: str, projected_s: float):
        super().__init__(message)
        self.projected_s = projected_s


def describe_value(value: Any, limit: int = 60) -> str:
    """Short repr of a user value for error messages (long values are cut)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
