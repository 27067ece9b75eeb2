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
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from hybridkit.errors import CheckpointError, describe_value
from hybridkit.fsutil import atomic_write_bytes, publishable
from hybridkit.weights import read_safetensors, untie

__all__ = [
    "CHECKPOINT_FILES",
    "FULL_FORMAT",
    "SHARDED_FORMAT",
    "SHARD_DIR",
    "checkpoint_step",
    "describe_file",
    "fsync_path",
    "publish_checkpoint",
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
FULL_FORMAT = "hybridkit-1"
#: ``trainer.json``'s format key of a sharded checkpoint (see
#: :mod:`hybridkit.train.sharded_checkpoint`): the same trainer.json, with
#: ``torch.distributed.checkpoint`` files under ``SHARD_DIR`` in place of the safetensors files.
SHARDED_FORMAT = "hybridkit-sharded-1"
SHARD_DIR = "shards"


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
        publishable(tmp, directory=True)
        files = {}
        for file, tensors in (
            ("model.safetensors", model_state),
            ("optimizer.safetensors", optim_state),
        ):
            save_tensors(tensors, tmp / file)
            publishable(tmp / file)
            files[file] = describe_file(tmp / file)
        state = {**trainer_state, "files": files}
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
        fsync_path(tmp / "trainer.json")
        fsync_path(tmp)
        return publish_checkpoint(tmp, root, name, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_checkpoint(tmp: Path, root: Path, name: str, keep: int) -> Path:
    """Rename the complete checkpoint ``tmp`` to ``root/name``, point ``latest`` at it and prune.

    Shared by both checkpoint formats (this module's safetensors and the sharded one of
    :mod:`hybridkit.train.sharded_checkpoint`), so a kill leaves either format in the same
    state: the previous checkpoint named by ``latest``, and at most a temporary directory."""
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    atomic_write_bytes(root / "latest", name.encode())
    # Keep the newest `keep` checkpoints up to this one. Later steps belong to an abandoned
    # trajectory (a resume from an older checkpoint): drop them rather than this one, which
    # `latest` now names. Steps compare as numbers: past 9,999,999 the names grow a digit.
    step = checkpoint_step(final)
    others = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and p.name != name), key=checkpoint_step
    )
    older = [p for p in others if checkpoint_step(p) < step]
    stale = [p for p in others if checkpoint_step(p) > step]
    stale += older[: max(0, len(older) - (keep - 1))]
    # and what killed writers left (one trainer per run folder: none is still being written)
    stale += [p for p in root.glob(".step_*") if p.is_dir()]
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: Path) -> int:
    """The step a ``step_N`` checkpoint directory holds (-1 for a name that is not one)."""
    digits = path.name.removeprefix("step_")
    return int(digits) if path.name.startswith("step_") and digits.isdigit() else -1


def describe_file(path: Path) -> dict:
    """Size and SHA-256 of a file just written (and flushed to disk on the way)."""
    fsync_path(path)
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
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


def read_checkpoint(path: str | os.PathLike) -> tuple[dict | None, dict | None, dict]:
    """(model tensors, optimizer tensors, trainer state) of a checkpoint directory.

    A sharded checkpoint is verified the same way (every shard file's size and SHA-256) but its
    tensors are not read here: they only exist as shards of a model, so they are loaded into
    one by :func:`hybridkit.train.sharded_checkpoint.load_sharded`; both are None then.

    Any problem is a :class:`CheckpointError` naming the file: missing, not written by the
    trainer, cut short (its size differs from the one recorded when it was written), changed
    since (its SHA-256 differs) or unreadable. Checkpoints of older versions carry no sizes and
    hashes; they are only checked by reading them.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    sharded = _is_sharded(path)
    wanted = ("trainer.json",) if sharded else CHECKPOINT_FILES
    missing = [f for f in wanted if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a hybridkit checkpoint: missing {', '.join(missing)}")
    try:
        state = json.loads((path / "trainer.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / 'trainer.json'} is corrupt ({err})") from None
    fmt = SHARDED_FORMAT if sharded else FULL_FORMAT
    if not isinstance(state, dict) or "step" not in state or state.get("format") != fmt:
        raise CheckpointError(f"{path} was not written by hybridkit's trainer")
    for key, ok in (
        ("step", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
        ("torch_rng", _rng_state_ok),
        ("elapsed_s", _finite_seconds),
        ("history", _history_ok),
    ):
        # read by the trainer when it resumes; a damaged value would be a traceback there
        if not ok(state.get(key, _ABSENT_OK.get(key))):
            value = describe_value(state.get(key))
            raise CheckpointError(f"{path / 'trainer.json'} is corrupt ({key}: {value})")
    files = state.get("files", {})
    if sharded and not (isinstance(files, dict) and f"{SHARD_DIR}/.metadata" in files):
        raise CheckpointError(f"{path / 'trainer.json'} is corrupt (no shard metadata listed)")
    for name, expected in files.items() if isinstance(files, dict) else ():
        _verify_file(path, name, expected, sharded)
    if sharded:
        return None, None, state
    return (
        read_safetensors(path / "model.safetensors", "checkpoint file"),
        read_safetensors(path / "optimizer.safetensors", "checkpoint file"),
        state,
    )


#: what a ``trainer.json`` key may be absent as (older checkpoints lack it)
_ABSENT_OK = {"elapsed_s": 0.0, "history": []}


def _finite_seconds(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _history_ok(value: object) -> bool:
    """The loss history the trainer keeps: a list of records (dicts)."""
    return isinstance(value, list) and all(isinstance(r, dict) for r in value)


def _rng_state_ok(value: object) -> bool:
    """Whether ``value`` can be torch's CPU generator state: as many bytes (ints 0..255) as
    ``torch.get_rng_state()`` holds."""
    if not isinstance(value, list) or len(value) != torch.get_rng_state().numel():
        return False
    return all(type(b) is int and 0 <= b <= 255 for b in value)


def _is_sharded(path: Path) -> bool:
    """A sharded checkpoint is recognised by its shard directory (the trainer.json format key
    then has to agree), so a damaged trainer.json is reported, not mistaken for a full one."""
    return (path / SHARD_DIR).is_dir()


def _verify_file(path: Path, name: str, expected: object, sharded: bool) -> None:
    """Check one file listed in ``trainer.json`` against the size and SHA-256 written there."""
    if sharded:
        known = name.startswith(f"{SHARD_DIR}/") and ".." not in Path(name).parts
    else:
        known = name in CHECKPOINT_FILES
    if not known or not isinstance(expected, dict):
        raise CheckpointError(f"{path / 'trainer.json'} is corrupt (files: {name!r})")
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{file} is missing (listed in {path / 'trainer.json'})")
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


def newest_valid_checkpoint(
    run_dir: str | os.PathLike, *, warn: bool = True
) -> tuple[Path, tuple[dict | None, dict | None, dict]] | None:
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
    steps = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and checkpoint_step(p) >= 0),
        key=checkpoint_step,
        reverse=True,
    )
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
            newest = checkpoint_step(root / named)
            steps = [p for p in steps if checkpoint_step(p) <= newest]
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
