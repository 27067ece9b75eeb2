"""Atomic file writes (a crash or kill -9 never leaves a half-written file under its name) and the
checks of user-given paths that every reader shares."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from hybridkit.errors import HybridkitError


def _umask() -> int:
    """The process's umask, read without changing it where the OS shows it (``os.umask`` can
    only be read by setting it, which another thread could observe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publishable(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give a temporary file (``mkstemp``: 0600) or directory (``mkdtemp``: 0700) the mode a
    plain ``open`` / ``mkdir`` would have, before it is renamed into place: the run's files
    stay readable by whoever the umask lets read them (others on a shared machine)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary file in the same directory, fsync it, then ``os.replace``.

    Taking a writer instead of bytes lets libraries that write files themselves (safetensors)
    stream to disk without first building the whole file in memory, and still get the same
    all-or-nothing guarantee as :func:`atomic_write_bytes`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        publishable(tmp)  # after: a writer may replace the file (safetensors makes it 0600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def user_path(text: str | os.PathLike, what: str) -> Path:
    """``text`` with a leading ``~`` / ``~user`` expanded. ``Path.expanduser`` raises a bare
    RuntimeError for an unknown user (or no home directory); this names the setting instead."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise HybridkitError(
            f"{what}: {str(text)!r} starts with '~' but that user's home directory is unknown; "
            "write the path out in full"
        ) from None


def resolved(path: Path, what: str) -> Path:
    """``path.resolve()``, naming ``what`` when it cannot be: a symbolic link that points back at
    itself is a bare RuntimeError (Python 3.11-3.12) or OSError (3.13) otherwise, and a NUL
    character (``"a\\0b"`` in a YAML file) a bare ValueError."""
    if "\0" in str(path):
        raise HybridkitError(
            f"{what} {str(path)!r} cannot be resolved: it holds a NUL character, which no file "
            "name may contain"
        )
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        why = "is a loop of symbolic links" if "link" in str(exc).lower() else f"({exc})"
        raise HybridkitError(f"{what} {str(path)!r} cannot be resolved: it {why}") from None


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (missing, a directory, a device or pipe), or None."""
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a regular file" + (" (a directory)" if path.is_dir() else "")
    return None


class DirLock:
    """An exclusive advisory lock on a directory, held while one process writes into it.

    Two trainers writing one run folder at once interleave their metrics lines and overwrite each
    other's checkpoints, and a resumed run would then continue from a mix of both. The lock is
    ``flock`` on a file inside the folder: the kernel drops it when its holder exits, however it
    ends, so a killed run never leaves a stale lock behind. Where ``fcntl`` is missing (Windows)
    it does nothing.
    """

    NAME = ".hybridkit.lock"

    def __init__(self, directory: Path, what: str):
        self._file = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not a POSIX system
            return
        path = Path(directory) / self.NAME
        f = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise HybridkitError(
                f"{directory} is in use: another process (pid {holder}) is writing {what} "
                "there; wait for it to finish, or give this one another directory"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        """Give the lock up (closing the file releases it); idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
