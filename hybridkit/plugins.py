"""Plugins: the user's own modules, imported so that the kinds they register are known.

A layer or task kind defined outside hybridkit (``@register_layer``, ``@register_task``) exists
once the module defining it has been imported. From Python that is an ``import``; from the
command line nothing would import it, so ``hybridkit train`` said ``unknown task kind 'copy'``.
A *plugin* is such a module, named one of three ways, all loaded before a recipe is validated:

* ``--plugin MODULE_OR_FILE.py`` on any subcommand (repeatable),
* ``plugins: [...]`` in a recipe or study file (file paths relative to that file), and
* the ``HYBRIDKIT_PLUGINS`` environment variable (comma-separated; paths relative to the current
  directory).

A plugin is a dotted module name importable from Python's path (``mypkg.tasks``) or a path to a
``.py`` file (anything ending in ``.py`` or containing a path separator). Each is imported once
per process: a file already imported under a module name (``import examples.custom_task``) is
not executed again, because a second execution would register its kinds a second time.

Every plugin is *recorded* by its canonical reference -- the module name, or the file's absolute
path -- which a run directory's ``recipe.yaml`` keeps under ``plugins``, so that ``hybridkit eval
RUN_DIR`` and ``hybridkit generate RUN_DIR`` load it again without being told.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path

from hybridkit.errors import HybridkitError
from hybridkit.fsutil import file_problem, resolved, user_path

__all__ = [
    "ENV_VAR",
    "PluginError",
    "env_plugins",
    "load_plugin",
    "load_plugins",
    "plugin_of",
]

ENV_VAR = "HYBRIDKIT_PLUGINS"

_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_FILE_MODULES: dict[str, str] = {}
"""Module name -> absolute path of the plugin file it was loaded from (see :func:`plugin_of`)."""


class PluginError(HybridkitError):
    """A plugin could not be found or failed while being imported."""


def is_file_ref(ref: str) -> bool:
    """Whether ``ref`` names a file (``x.py``, ``dir/x``) rather than a module (``pkg.mod``)."""
    return ref.endswith(".py") or "/" in ref or os.sep in ref


def env_plugins() -> list[str]:
    """The plugins named by ``HYBRIDKIT_PLUGINS`` (comma-separated, blanks ignored)."""
    return [part.strip() for part in os.environ.get(ENV_VAR, "").split(",") if part.strip()]


def load_plugins(
    refs: Iterable[str], *, base_dir: str | os.PathLike[str] | None = None
) -> list[str]:
    """Import every plugin of ``refs`` (see :func:`load_plugin`); their canonical references."""
    return list(dict.fromkeys(load_plugin(ref, base_dir=base_dir) for ref in refs))


def load_plugin(ref: str, *, base_dir: str | os.PathLike[str] | None = None) -> str:
    """Import one plugin and return its canonical reference (module name or absolute path).

    ``base_dir`` anchors a relative file path (the recipe's directory); default: the current
    directory. Problems are :class:`PluginError` messages that name the plugin and say what to
    pass instead; an exception raised *by* the plugin's code is reported with the line it came
    from (it is the plugin's bug, but the user needs to know where to look).
    """
    if not isinstance(ref, str) or not ref.strip():
        raise PluginError(f"a plugin must be a module name or a .py file path, got {ref!r}")
    ref = ref.strip()
    if is_file_ref(ref):
        return _load_file(ref, Path(base_dir) if base_dir is not None else Path.cwd())
    return _load_module(ref, Path(base_dir) if base_dir is not None else Path.cwd())


def plugin_of(module_name: str) -> str | None:
    """The plugin reference that recreates the classes of ``module_name`` in a new process.

    None for hybridkit's own modules and for ``__main__`` (a script or notebook cannot be
    imported again; define kinds in a module or file to use them from the command line).
    """
    if module_name in _FILE_MODULES:
        return _FILE_MODULES[module_name]
    if module_name == "__main__" or module_name.split(".")[0] == "hybridkit":
        return None
    return module_name


def _load_module(name: str, base_dir: Path) -> str:
    if not _MODULE_NAME.fullmatch(name):
        raise PluginError(
            f"plugin {name!r} is neither a module name (like mypkg.tasks) nor a .py file path"
        )
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            hint = ""
            candidate = base_dir / (name.replace(".", "/") + ".py")
            if _is_file(candidate):
                hint = f"; to load the file {candidate}, pass its path ({candidate.name})"
            raise PluginError(
                f"plugin {name!r}: no module named {exc.name!r} on Python's path{hint}"
            ) from None
        raise _failed(name, exc) from None
    except Exception as exc:  # the plugin's own code raised
        raise _failed(name, exc) from None
    return name


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where the OS refuses the name itself (too long)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _load_file(ref: str, base_dir: Path) -> str:
    try:
        path = resolved(base_dir / user_path(ref, "plugin file"), "plugin file")
        problem = file_problem(path)
    except HybridkitError as exc:
        raise PluginError(str(exc)) from None
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise PluginError(f"plugin file {ref[:80]!r}: {exc.strerror or exc}") from None
    if problem:
        problem = "not found" if not path.exists() else problem
        raise PluginError(f"plugin file {ref!r} {problem} (looked at {path})")
    if path.suffix != ".py":
        raise PluginError(f"plugin file {path} is not a Python file (.py)")
    canonical = str(path)
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name == "__main__" or not isinstance(file, str) or os.path.basename(file) != path.name:
            continue
        if _same_file(file, path):
            _FILE_MODULES.setdefault(name, canonical)
            return canonical  # already imported, as a plugin or under its own module name
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:10]
    name = f"hybridkit_plugin_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as `import` does: dataclasses and pydantic look their module
    # up in sys.modules while the class bodies execute.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise _failed(str(path), exc) from None
    _FILE_MODULES[name] = canonical
    return canonical


def _same_file(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b
    except OSError:
        return False


_NOT_USER_CODE = (str(Path(__file__).resolve().parent), "importlib", "site-packages", "<frozen")


def _failed(ref: str, exc: BaseException) -> PluginError:
    """The plugin's own exception, with the innermost line of the user's code that raised it
    (not a line inside hybridkit, a library or the import machinery)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    for frame in reversed(frames):
        if not any(part in frame.filename for part in _NOT_USER_CODE):
            where = f" ({frame.filename}, line {frame.lineno})"
            break
    return PluginError(
        f"plugin {ref} failed while being imported: {type(exc).__name__}: {exc}{where}"
    )
