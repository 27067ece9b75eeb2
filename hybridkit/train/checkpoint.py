"""Training checkpoints: weights, AdamW moments and trainer state, written so a kill never hurts.

Plain model weights (``save_weights``/``load_weights``/``find_weights``) live in
:mod:`hybridkit.weights`, which evaluation reads without importing the trainer; this module adds
what only training needs to resume exactly.

Faults a checkpoint must survive: a kill while it is written (nothing is renamed into place until
every file is complete and on disk, and ``latest`` moves only after that), and a file damaged
later (a copy cut short, a full disk, a flipped bit): ``trainer.json`` records each tensor
file's size and SHA-256, checked before the file is trusted, so the damage is named instead of
loading garbage. ``--resume auto`` then falls back to the newest checkpoint that is intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from hybridkit.errors import CheckpointError
from hybridkit.fsutil import atomic_write_bytes
from hybridkit.weights import read_safetensors, untie

__all__ = [
    "CHECKPOINT_FILES",
    "newest_valid_checkpoint",
    "read_checkpoint",
    "write_checkpoint",
]


# --- training checkpoints (weights + optimizer + trainer state) --------------------------------
#
# checkpoints/step_000100/model.safetensors      the weights
# checkpoints/step_000100/optimizer.safetensors  AdamW moments, keyed "<param name>/<state key>"
# checkpoints/step_000100/trainer.json           step, RNG states, recipe, metrics so far
# checkpoints/latest                             name of the newest complete checkpoint
#
# A checkpoint directory is written under a temporary name and renamed when complete, and
# `latest` is replaced atomically afterwards, so a run killed at any moment (kill -9 included)
# leaves the previous checkpoint intact and resumable.

CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "trainer.json")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(untie(tensors), str(path))


def write_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, torch.Tensor],
    trainer_state: dict,
    keep: int,
) -> Path:
    """Write a complete checkpoint atomically and prune old ones; returns its directory.

    Every file is flushed to disk before the directory is renamed into place (and the rename
    before ``latest`` names it), so after a crash -- a kill, or the machine losing power -- a
    checkpoint directory is either complete or absent; ``trainer.json`` gets the size and
    SHA-256 of each tensor file (see :func:`read_checkpoint`).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        files = {}
        for file, tensors in (
            ("model.safetensors", model_state),
            ("optimizer.safetensors", optim_state),
        ):
            save_tensors(tensors, tmp / file)
            files[file] = _describe_file(tmp / file)
        state = {**trainer_state, "files": files}
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
        _fsync(tmp / "trainer.json")
        _fsync(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(root / "latest", name.encode())
    # Keep the newest `keep` checkpoints up to this one. Later steps belong to an abandoned
    # trajectory (a restart with --resume none, or a resume from an older checkpoint): drop them
    # rather than this one, which `latest` now names.
    others = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
    older = [p for p in others if p.name < name]
    stale = [p for p in others if p.name > name] + older[: max(0, len(older) - (keep - 1))]
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _describe_file(path: Path) -> dict:
    """Size and SHA-256 of a file just written (and flushed to disk on the way)."""
    _fsync(path)
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk (directories: where the OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(model tensors, optimizer tensors, trainer state) of a checkpoint directory.

    Any problem is a :class:`CheckpointError` naming the file: missing, not written by the
    trainer, cut short (its size differs from the one recorded when it was written), changed
    since (its SHA-256 differs) or unreadable. Checkpoints of older versions carry no sizes and
    hashes; they are only checked by reading them.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a hybridkit checkpoint: missing {', '.join(missing)}")
    try:
        state = json.loads((path / "trainer.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / 'trainer.json'} is corrupt ({err})") from None
    if not isinstance(state, dict) or "step" not in state or state.get("format") != "hybridkit-1":
        raise CheckpointError(f"{path} was not written by hybridkit's trainer")
    files = state.get("files", {})
    for name, expected in files.items() if isinstance(files, dict) else ():
        file = path / name
        if name not in CHECKPOINT_FILES or not isinstance(expected, dict):
            raise CheckpointError(f"{path / 'trainer.json'} is corrupt (files: {name!r})")
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(
                f"{file} is truncated or damaged: {size} bytes, but {expected.get('bytes')} "
                "were written"
            )
        if _sha256(file) != expected.get("sha256"):
            raise CheckpointError(
                f"{file} is corrupt: its SHA-256 differs from the one recorded when it was "
                "written (the file changed on disk)"
            )
    return (
        read_safetensors(path / "model.safetensors", "checkpoint file"),
        read_safetensors(path / "optimizer.safetensors", "checkpoint file"),
        state,
    )


def newest_valid_checkpoint(
    run_dir: str | os.PathLike, *, warn: bool = True
) -> tuple[Path, tuple[dict, dict, dict]] | None:
    """The newest intact checkpoint of a run and its contents (``read_checkpoint``), or None.

    Candidates are the checkpoint ``latest`` names and the older ``step_*`` directories, newest
    first. Directories *newer* than the one ``latest`` names are never used: they belong to a
    trajectory that was abandoned (a resume from an older checkpoint), not to this run's past.
    Each unusable candidate is reported on stderr (``warn``) with the reason, and the next one is
    tried. If checkpoints exist but none is intact, a :class:`CheckpointError` lists them all:
    starting from scratch silently would throw the run away.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    latest = root / "latest"
    problems: list[str] = []
    if latest.is_file():
        try:
            named = latest.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = ""
        if not (named.startswith("step_") and (root / named).is_dir()):
            problems.append(f"{latest} names {named!r}, which is not a checkpoint directory")
        else:
            steps = [p for p in steps if p.name <= named]
    for candidate in steps:
        try:
            contents = read_checkpoint(candidate)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems and warn:
            for problem in problems:
                print(f"warning: skipping a damaged checkpoint: {problem}", file=sys.stderr)
            print(
                f"warning: resuming from the newest intact checkpoint, {candidate}", file=sys.stderr
            )
        return candidate, contents
    if steps or problems:
        raise CheckpointError(
            "no intact checkpoint to resume from:\n  "
            + "\n  ".join(problems)
            + "\nstart over with --resume none (or pass a checkpoint directory to --resume)"
        )
    return None
