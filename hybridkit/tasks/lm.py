"""Plain next-token language modelling on a local file: ``text`` (bytes) and ``tokens`` (ids).

Both draw random windows of ``length + 1`` tokens; ``inputs = window[:-1]``,
``targets = window[1:]`` and *every* position is scored. The last ``eval_fraction`` of the file
is held out: training windows come from the head, the fixed evaluation windows from the tail, so
evaluation text is never trained on. Natural unit of length: input tokens.

``text`` -- a UTF-8 file read as bytes (byte-level tokenizer, no merges, nothing to train).
Vocabulary: bytes ``0 .. 255``, ``PAD = 256``, ``BOS = 257``; vocab size 258. With ``bos`` every
window starts with BOS (the model then predicts the first byte from BOS), which makes windows
look like document starts for per-position loss curves. Chance 1/256. The whole file is read into
memory; for large corpora tokenize once and use ``tokens``.

``tokens`` -- a 1-D array of token ids: ``.npy`` (any integer dtype, memory-mapped) or a raw
binary file of ``dtype`` (default ``uint16``, the nanoGPT layout, memory-mapped). The vocabulary
is the user's (``vocab_size``, ids must be below it; checked per batch because scanning a large
file up front is slow). Pad id 0. Chance 1 / vocab_size.

Paths are taken as given (relative paths resolve against the working directory).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from hybridkit.errors import HybridkitError
from hybridkit.fsutil import file_problem, user_path
from hybridkit.registry import register_task
from hybridkit.tasks.base import MAX_VOCAB, Batch, Task, TaskSpec, long_tensor

BYTE_PAD, BYTE_BOS = 256, 257


class _FileSpec(TaskSpec):
    """Fields shared by the file-backed tasks (not registered itself)."""

    path: str = Field(description="local file to read")
    seq_len: int = Field(default=512, gt=1, description="input tokens per window")
    eval_fraction: float = Field(
        default=0.1, gt=0, lt=1, description="share of the file (its tail) held out for eval"
    )

    def length_problem(self, length: int) -> str | None:
        return None if length >= 1 else f"window length must be positive, got {length}"


@register_task
class TextSpec(_FileSpec):
    """Recipe keys of the ``text`` task (UTF-8 file, byte-level tokens)."""

    kind: Literal["text"] = "text"
    bos: bool = Field(default=False, description="start every window with BOS")

    def build(self) -> TextTask:
        return TextTask(self)


@register_task
class TokensSpec(_FileSpec):
    """Recipe keys of the ``tokens`` task (pre-tokenized ids in .npy or raw .bin)."""

    kind: Literal["tokens"] = "tokens"
    # at least 2: with one id every next token is known (chance 1 / vocab_size = 1)
    vocab_size: int = Field(ge=2, le=MAX_VOCAB, description="ids in the file are below this")
    dtype: Literal["uint8", "uint16", "int16", "uint32", "int32", "int64"] = Field(
        default="uint16", description="element type of a raw .bin file (ignored for .npy)"
    )

    def build(self) -> TokensTask:
        return TokensTask(self)


class _WindowTask(Task):
    """Random windows over a 1-D array split into a training head and an evaluation tail."""

    spec: _FileSpec
    bos: int | None = None

    def __init__(self, spec: _FileSpec, data: np.ndarray):
        super().__init__(spec)
        n_eval = int(len(data) * spec.eval_fraction)
        self.train_data, self.eval_data = data[: len(data) - n_eval], data[len(data) - n_eval :]
        problems = []
        longest_train = spec.max_train_length()
        if len(self.train_data) < self._need(longest_train):
            problems.append(
                f"the training part ({len(self.train_data)} tokens) is shorter than one window "
                f"of {self._need(longest_train)} tokens"
            )
        longest_eval = max(spec.eval_lengths or [spec.seq_len])
        if len(self.eval_data) < self._need(longest_eval):
            problems.append(
                f"the held-out tail ({len(self.eval_data)} tokens, eval_fraction="
                f"{spec.eval_fraction}) is shorter than one eval window of "
                f"{self._need(longest_eval)} tokens; lower eval_lengths or use a larger file"
            )
        if problems:
            raise HybridkitError(f"task {spec.kind!r} on {spec.path}: " + "; ".join(problems))

    def _need(self, length: int) -> int:
        """File tokens per window: length + 1, or length with a BOS in front."""
        return length if self.bos is not None else length + 1

    def sample(self, n: int, length: int, rng: np.random.Generator) -> Batch:
        # Draws from the training head; eval_set overrides the source below.
        return self._windows(self.train_data, n, length, rng)

    def eval_set(self, length: int) -> Batch:
        if length not in self._eval_cache:
            self.check_length(length)
            self._eval_cache[length] = self._windows(
                self.eval_data, self.spec.eval_examples, length, self.eval_rng(length)
            )
        return self._eval_cache[length]

    def _windows(self, data: np.ndarray, n: int, length: int, rng: np.random.Generator) -> Batch:
        self.check_length(length)
        need = self._need(length)
        if len(data) < need:
            raise HybridkitError(
                f"task {self.spec.kind!r}: {len(data)} tokens cannot hold a window of {need}"
            )
        starts = rng.integers(0, len(data) - need + 1, size=n)
        windows = np.asarray(data[starts[:, None] + np.arange(need)], dtype=np.int64)
        if self.bos is not None:
            windows = np.concatenate([np.full((n, 1), self.bos), windows], axis=1)
        self._check_ids(windows)
        return Batch(
            long_tensor(windows[:, :-1]),
            long_tensor(windows[:, 1:]),
            {"length": torch.full((n,), length, dtype=torch.long), "start": long_tensor(starts)},
        )

    def _check_ids(self, windows: np.ndarray) -> None:
        pass


class TextTask(_WindowTask):
    """Byte-level language modelling on a UTF-8 file."""

    spec: TextSpec

    def __init__(self, spec: TextSpec):
        path = user_path(spec.path, "task.path")
        if problem := file_problem(path):
            raise HybridkitError(f"task.path: text file {str(path)!r} {problem}")
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise HybridkitError(
                f"task.path: {str(path)!r} is not valid UTF-8 (byte {err.start}: {err.reason})"
            ) from None
        self.bos = BYTE_BOS if spec.bos else None
        self.vocab_size = 258
        self.chance = 1.0 / 256
        self.pad_id = BYTE_PAD
        super().__init__(spec, np.frombuffer(raw, dtype=np.uint8))


class TokensTask(_WindowTask):
    """Language modelling on pre-tokenized ids."""

    spec: TokensSpec

    def __init__(self, spec: TokensSpec):
        path = user_path(spec.path, "task.path")
        if problem := file_problem(path):
            raise HybridkitError(f"task.path: token file {str(path)!r} {problem}")
        if path.suffix == ".npy":
            with path.open("rb") as f:
                if f.read(6) != b"\x93NUMPY":  # else np.load would try to unpickle it
                    raise HybridkitError(
                        f"task.path: {str(path)!r} is not a .npy file (no NumPy header); "
                        "a raw file of ids needs another suffix (e.g. .bin) and task.dtype"
                    )
            try:
                data = np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as err:  # cut short, or Python objects
                raise HybridkitError(
                    f"task.path: {str(path)!r} is not a readable .npy array of token ids ({err})"
                ) from None
            if data.ndim != 1 or not np.issubdtype(data.dtype, np.integer):
                raise HybridkitError(
                    f"task.path: {str(path)!r} must hold a 1-D integer array, "
                    f"got shape {data.shape} of {data.dtype}"
                )
        else:
            itemsize = np.dtype(spec.dtype).itemsize
            if path.stat().st_size % itemsize:
                raise HybridkitError(
                    f"task.path: {str(path)!r} has {path.stat().st_size} bytes, not a multiple "
                    f"of {itemsize} (task.dtype={spec.dtype}); is the dtype right?"
                )
            if path.stat().st_size == 0:
                raise HybridkitError(f"task.path: {str(path)!r} is empty (0 bytes)")
            data = np.memmap(path, dtype=spec.dtype, mode="r")
        self.vocab_size = spec.vocab_size
        self.chance = 1.0 / spec.vocab_size
        self.pad_id = 0
        super().__init__(spec, data)

    def _check_ids(self, windows: np.ndarray) -> None:
        if windows.size and (windows.min() < 0 or windows.max() >= self.spec.vocab_size):
            raise HybridkitError(
                f"task.path: {self.spec.path!r} holds ids in [{windows.min()}, {windows.max()}] "
                f"outside [0, vocab_size={self.spec.vocab_size})"
            )
