"""Registries that map a recipe ``kind`` to the classes that implement it.

A layer kind is a pair (pydantic spec class, ``nn.Module`` class); a task kind is a spec class
whose ``build()`` returns a generator. Users add their own kinds from their own package with the
decorators below -- nothing in hybridkit needs editing (see ``examples/custom_layer.py``).

The registries are the only process-wide tables in hybridkit. They are written once, at import
time of the module that defines a kind, and never mutated while a model runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from hybridkit.errors import describe_value
from hybridkit.schema import raise_problems, spec_problem, yaml_type

T = TypeVar("T")

PLUGIN_HINT = (
    "a kind defined in your own code is found once its module is imported: pass "
    "--plugin MODULE_OR_FILE.py, list it under `plugins:` in the recipe, or set "
    "HYBRIDKIT_PLUGINS"
)
"""How to load a user's kinds; every unknown-kind error ends with it (see plugins.py)."""


class Registry(Generic[T]):
    """A name -> entry table with a helpful error for unknown names."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T, *, replace: bool = False) -> None:
        old = self._entries.get(name)
        if (
            not replace
            and old is not None
            and old is not entry
            and not _same_definition(old, entry)
        ):
            raise ValueError(
                f"{self.what} kind {name!r} is already registered; pass replace=True to override it"
            )
        self._entries[name] = entry

    def get(self, name: str) -> T:
        if name not in self:
            raise KeyError(self.kind_problem(name))
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        # A recipe may put anything where a kind belongs (``kind: {nested: 1}``): answer "no"
        # for values that cannot be a name instead of failing on an unhashable one.
        return isinstance(name, str) and name in self._entries

    def kind_problem(self, kind: Any) -> str:
        """Why ``kind`` names no entry: missing, not a string, or unknown (with the plugin hint).

        The one wording of this error for layers and tasks, wherever it is detected.
        """
        allowed = f"allowed kinds: {', '.join(self.names())}"
        if kind is None:
            return f"missing 'kind'; {allowed}"
        if not isinstance(kind, str):
            return (
                f"kind must be a string naming a {self.what} kind; got {yaml_type(kind)} "
                f"{describe_value(kind)}; {allowed}"
            )
        return f"unknown {self.what} kind {kind!r}; {allowed}. Hint: {PLUGIN_HINT}"

    def names(self) -> list[str]:
        return sorted(self._entries)


class LayerEntry:
    """What the registry stores for one layer kind."""

    def __init__(self, spec_cls: type, module_cls: type):
        self.spec_cls = spec_cls
        self.module_cls = module_cls


def _same_definition(old: Any, new: Any) -> bool:
    """Whether two entries come from the same source: the same class in the same file.

    The same file can run twice in one process -- imported as ``examples.custom_task`` by one
    caller and loaded as a plugin file by another, or a notebook cell run again -- and register
    its kinds twice. The newer definition replaces the older one quietly; two *different*
    definitions of one kind name are still an error.
    """
    old_cls = old.spec_cls if isinstance(old, LayerEntry) else old
    new_cls = new.spec_cls if isinstance(new, LayerEntry) else new
    if not (isinstance(old_cls, type) and isinstance(new_cls, type)):
        return False
    if old_cls.__qualname__ != new_cls.__qualname__:
        return False
    old_file, new_file = _source_file(old_cls), _source_file(new_cls)
    if old_file is None or new_file is None:
        return old_cls.__module__ == new_cls.__module__ == "__main__"
    return old_file == new_file


def _source_file(cls: type) -> str | None:
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return os.path.realpath(file) if isinstance(file, str) else None


LAYERS: Registry[LayerEntry] = Registry("layer")
TASKS: Registry[type] = Registry("task")


def register_layer(module_cls: type, *, replace: bool = False) -> Callable[[type], type]:
    """Class decorator for a layer spec: ``@register_layer(MyModule) class MySpec(LayerSpec)``.

    The spec class must declare ``kind: Literal["my_kind"] = "my_kind"``. The module class is
    constructed as ``module_cls(spec, d_model=..., layer_idx=...)``.
    """

    def deco(spec_cls: type) -> type:
        LAYERS.add(_kind_of(spec_cls), LayerEntry(spec_cls, module_cls), replace=replace)
        return spec_cls

    return deco


def register_task(spec_cls: type | None = None, *, replace: bool = False) -> Any:
    """Class decorator for a task spec (``kind: Literal[...]`` field required)."""

    def deco(cls: type) -> type:
        TASKS.add(_kind_of(cls), cls, replace=replace)
        return cls

    return deco(spec_cls) if spec_cls is not None else deco


def dispatch_kind(
    cls: type,
    base: type,
    data: Any,
    handler: Callable[[Any], Any],
    registry: Registry,
    spec_of: Callable[[Any], type],
) -> Any:
    """The body of the pydantic wrap validator of an open base class (``LayerSpec``, ``TaskSpec``).

    Validating against the open ``base`` looks up the spec class registered for
    ``data["kind"]`` and validates against it, so a kind registered from another package is
    validated like a built-in one, with the same error paths; unknown or missing kinds list the
    registered ones and say how to load a plugin. A concrete subclass (``cls`` is not ``base``)
    validates itself through ``handler``, and an already validated spec passes through
    unchanged.
    """
    if cls is not base:
        return handler(data)
    if isinstance(data, base):
        return data
    if not isinstance(data, dict):
        return handler(data)
    kind = data.get("kind")
    if kind not in registry:
        # Located at the ``kind`` key itself, so the error names e.g. ``task.kind``.
        raise_problems(base.__name__, [spec_problem(("kind",), registry.kind_problem(kind), kind)])
    return spec_of(registry.get(kind)).model_validate(data)


def _kind_of(spec_cls: type) -> str:
    field = getattr(spec_cls, "model_fields", {}).get("kind")
    if field is None or not isinstance(field.default, str):
        raise TypeError(
            f"{spec_cls.__name__} needs a field `kind: Literal['name'] = 'name'` to be registered"
        )
    return field.default
