"""Training metrics: one JSON object per line in ``metrics.jsonl`` (+ TensorBoard if installed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends records to ``metrics.jsonl``; on resume, drops records past the checkpoint.

    Records logged after the last checkpoint of an interrupted run would otherwise appear twice
    (once from the lost steps, once from their replay), so :meth:`truncate_after` rewrites the
    file atomically, keeping only records up to the resumed step.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception:  # tensorboard not installed: JSONL only
                self.writer = None

    def truncate_after(self, step: int) -> None:
        self._keep(lambda record: record.get("step", 0) <= step)

    def drop_evals_at(self, step: int) -> None:
        """Drop the evaluation records of ``step`` (a finished run run again evaluates anew)."""
        self._keep(lambda record: not (record.get("step", 0) == step and "eval" in record))

    def last_train_record(self, step: int) -> dict[str, Any] | None:
        """The training record of ``step`` (one with a loss), or None."""
        if not self.path.is_file():
            return None
        found = [r for r in _records(self.path) if r.get("step") == step and "loss" in r]
        return found[-1] if found else None

    def _keep(self, wanted) -> None:
        """Rewrite the file atomically with the records ``wanted`` accepts."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [json.dumps(record) for record in _records(self.path) if wanted(record)]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _parse(line: str) -> dict[str, Any] | None:
    """A record, or None for a blank line, the torn last line of a killed process or a damaged
    line (nesting too deep to decode, a step that is not a number: nothing we wrote)."""
    try:
        record = json.loads(line) if line.strip() else None
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step", 0)
    return record if isinstance(step, int) and not isinstance(step, bool) else None


def _records(path: Path) -> list[dict[str, Any]]:
    """The file's records; bytes that are not UTF-8 (a damaged file) make lines that do not
    parse, which are dropped like torn ones."""
    text = path.read_bytes().decode("utf-8", "replace")
    return [r for line in text.splitlines() if (r := _parse(line)) is not None]


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return _records(path) if path.is_file() else []


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out
