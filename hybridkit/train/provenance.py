"""Where a measurement came from: date, software versions, device and git commit.

Benchmark results are compared across days, machines and branches; a number without the
commit and the torch / Triton versions that produced it cannot be reproduced or trusted, so
every result file carries this record.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["run_environment"]


def _git(*args: str) -> str | None:
    """``git ARGS`` in the checkout hybridkit is imported from; None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def run_environment(device: torch.device | None = None) -> dict[str, object]:
    """Date (UTC), Python / torch / Triton / CUDA versions, device name and the git commit
    (with ``dirty`` when the working tree has uncommitted changes)."""
    device = device or torch.device("cpu")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }
