"""Recipes: YAML in, a validated :class:`RecipeSpec` out, and back to YAML for the run directory.

Everything a user can get wrong in a recipe ends up as one :class:`~hybridkit.errors.RecipeError`
listing *all* problems, each as ``(dotted.key, message)``: the key is the path in the YAML file
(``model.blocks.m.mixer.headdim``), the message names the bad value and what is allowed. The
dotted key is simply pydantic's ``loc`` joined with dots; ``spec.py`` raises its own problems with
a ``loc`` that already points at the key to edit, so no message parsing is needed here.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, SerializeAsAny, ValidationError, model_validator

import hybridkit.layers  # noqa: F401  (registers the built-in layer kinds)
import hybridkit.tasks  # noqa: F401  (registers the built-in task kinds)
from hybridkit.errors import RecipeError, describe_value
from hybridkit.fsutil import atomic_write_text
from hybridkit.layers.base import LayerSpec
from hybridkit.plugins import PluginError, env_plugins, load_plugin, plugin_of
from hybridkit.recipe_sections import EvalSpec, TrainSpec
from hybridkit.registry import LAYERS, TASKS
from hybridkit.safeyaml import MAX_BYTES, YAMLProblem, decode_text, load_yaml
from hybridkit.schema import (
    StrictModel,
    get_path,
    raise_problems,
    set_path,
    spec_problem,
    yaml_type,
)
from hybridkit.spec import ModelSpec, describe_error
from hybridkit.tasks.base import MAX_LENGTH, TaskSpec

__all__ = [
    "RecipeSpec",
    "apply_overrides",
    "dump_recipe",
    "load_recipe",
    "read_yaml_mapping",
    "import_plugins",
    "plugins_in_use",
    "recipe_to_dict",
]


class RecipeSpec(StrictModel):
    """A whole recipe: the model, the task it is trained on, how to train and how to evaluate."""

    name: str | None = None
    description: str | None = None
    seed: int = Field(default=0, ge=0, description="seeds everything unless overridden")
    model: ModelSpec
    task: SerializeAsAny[TaskSpec] | None = None
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    plugins: list[str] = Field(
        default_factory=list,
        description="modules or .py files (relative to the recipe) imported before validation",
    )

    @model_validator(mode="after")
    def _data_apart_from_eval(self) -> RecipeSpec:
        """The training batch of step s and the evaluation set at length L are drawn from
        ``SeedSequence([data seed, s])`` and ``SeedSequence([eval_seed, L])``: with the two
        seeds equal, the batch of step L would be the first examples of the eval set at L."""
        if self.task is None:
            return self
        given = [("task.seed", self.task.seed), ("train.seed", self.train.seed)]
        where, value = next(((k, v) for k, v in given if v is not None), ("seed", self.seed))
        if value == self.task.eval_seed:
            message = (
                f"equals the training data's seed ({where} = {value}): the training batch of "
                "step L would copy the evaluation set at length L; choose another eval_seed"
            )
            raise_problems(
                type(self).__name__, [spec_problem(("task", "eval_seed"), message, value)]
            )
        return self

    @model_validator(mode="after")
    def _check_eval_lengths(self) -> RecipeSpec:
        """``eval.lengths`` are lengths of the task, checked like ``task.eval_lengths`` (a bad
        one used to surface only at evaluation: a numpy traceback, or an error naming
        ``--lengths`` when no such flag was given)."""
        lengths = self.eval.lengths
        if lengths is None:
            return self
        problems = []
        if not lengths:
            message = "must be a non-empty list of lengths; leave it out (null) for the task's"
            problems.append(spec_problem(("eval", "lengths"), message, lengths))
        for i, length in enumerate(lengths):
            if length > MAX_LENGTH:
                problem = f"length {length} is too long; allowed: at most {MAX_LENGTH}"
            elif self.task is not None:
                problem = self.task.length_problem(length)
            else:
                problem = None if length >= 1 else f"length must be positive, got {length}"
            if problem is not None:
                problems.append(spec_problem(("eval", "lengths", i), problem, length))
        raise_problems(type(self).__name__, problems)
        return self


def digest(data: object) -> str:
    """A short, stable hash of JSON-serialisable ``data`` (keys sorted): what the checkpoint's
    model fingerprint and a study run's recipe fingerprint compare."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_recipe(
    path_or_dict: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    plugins: Sequence[str] = (),
) -> RecipeSpec:
    """Load, override (``"model.d_model=128"``) and validate a recipe file or dict.

    Plugins (see :mod:`hybridkit.plugins`) are imported after the overrides are applied and
    before validation, so that a recipe can use the kinds they register: those the recipe lists
    under ``plugins``, then ``HYBRIDKIT_PLUGINS``, then ``plugins`` (e.g. the command line's
    ``--plugin``). The returned spec's ``plugins`` lists all of them plus the module of every
    kind the recipe uses that is not hybridkit's own, by the reference that imports it again:
    the run directory's ``recipe.yaml`` is then enough to rebuild the model and the task.
    """
    if isinstance(path_or_dict, Mapping):
        source, base_dir = "<dict>", None
        data: Any = copy.deepcopy(dict(path_or_dict))
    else:
        source, base_dir = str(path_or_dict), Path(path_or_dict).parent
        data = read_yaml_mapping(path_or_dict)
    apply_overrides(data, overrides, source)
    import_plugins(data, source, base_dir, [*env_plugins(), *plugins])
    try:
        spec = RecipeSpec.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(source, validation_problems(exc, data)) from None
    recorded = list(dict.fromkeys([*spec.plugins, *plugins_in_use(spec)]))
    if recorded != spec.plugins:
        spec.plugins = recorded
    return spec


def import_plugins(
    data: dict[str, Any],
    source: str,
    base_dir: Path | None,
    extra: Sequence[str] = (),
    what: str = "recipe",
) -> list[str]:
    """Import the plugins ``data["plugins"]`` lists (paths relative to ``base_dir``) and the
    ``extra`` ones (paths relative to the current directory), before ``data`` is validated.

    ``data["plugins"]`` is replaced by the canonical references of all of them (absolute paths
    for files), so that the validated spec records what to import in another directory or
    process. Shared by recipes and study files.
    """
    listed = data.get("plugins")
    listed = [] if listed is None else listed
    if not isinstance(listed, list) or not all(isinstance(p, str) and p.strip() for p in listed):
        problem = (
            "plugins",
            "must be a list of module names (mypkg.tasks) or .py file paths; "
            f"got {describe_value(listed)}",
        )
        raise RecipeError(source, [problem], what)
    refs, problems = [], []
    for key, ref, where in [(f"plugins.{i}", ref, base_dir) for i, ref in enumerate(listed)] + [
        ("--plugin / HYBRIDKIT_PLUGINS", ref, None) for ref in extra
    ]:
        try:
            refs.append(load_plugin(ref, base_dir=where))
        except PluginError as exc:
            problems.append((key, str(exc)))
    if problems:
        raise RecipeError(source, problems, what)
    data["plugins"] = list(dict.fromkeys(refs))
    return data["plugins"]


def plugins_in_use(spec: RecipeSpec) -> list[str]:
    """Plugin references of the modules that define the layer and task kinds ``spec`` uses
    (every layer after overrides, every template, the task); hybridkit's own kinds need none."""
    classes: list[type] = []
    blocks = [*spec.model.layers(), *spec.model.blocks.values()]
    for block in blocks:
        for _, part in block.parts():
            classes += [type(part), LAYERS.get(part.kind).module_cls]
    if spec.task is not None:
        classes.append(type(spec.task))
    refs = (plugin_of(cls.__module__) for cls in dict.fromkeys(classes))
    return [ref for ref in dict.fromkeys(refs) if ref is not None]


def read_yaml_mapping(
    path: str | os.PathLike[str], what: str = "recipe", keys: str = "name, seed, model, ..."
) -> dict[str, Any]:
    """The top-level mapping of a YAML file (a ``what`` file whose keys are like ``keys``).

    Recipes and study files share this so that a missing file, bad YAML or a file that is not a
    mapping reads the same way for both, as a :class:`RecipeError` naming the file. The file is
    read through :mod:`hybridkit.safeyaml`, so no content can hang or crash the reader; only
    regular files are opened (a FIFO or ``/dev/zero`` would block or never end).
    """
    source = str(path)

    def fail(message: str) -> RecipeError:
        return RecipeError(source, [("", message)], what)

    file = Path(path)
    try:
        if not file.exists():
            raise fail(f"no such {what} file (not found)")
        if file.is_dir():
            raise fail(f"is a directory, not a {what} file")
        if not file.is_file():
            raise fail(f"is not a regular file; pass a {what} YAML file")
        with file.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise fail(f"cannot read the file: {exc.strerror or exc}") from None
    try:
        if len(raw) > MAX_BYTES:
            raise YAMLProblem(f"larger than {MAX_BYTES // 1024} KiB; {what} files are small")
        data = _parsed(decode_text(raw))
    except YAMLProblem as exc:
        raise fail(exc.describe()) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"{yaml_type(data)}"
        message = f"the top level must be a mapping of keys ({keys}); the file is {kind}"
        raise RecipeError(source, [("", message)], what)
    return data


def _parsed(text: str) -> Any:
    """``load_yaml(text)``, a fresh copy per call: a study plans each run from its base file,
    so a 1,000-run study read the same base 1,100 times (9 of 11 s of ``study --list``).
    Cached by content, so an edited file is parsed again."""
    return copy.deepcopy(_parsed_once(text))


@functools.lru_cache(maxsize=32)
def _parsed_once(text: str) -> Any:
    return load_yaml(text)


# --- overrides ------------------------------------------------------------------------------------
def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str) -> None:
    """Apply ``"dotted.key=value"`` strings in place; the value is parsed as YAML.

    Missing keys are created (pydantic then reports them if they are unknown); list items are
    addressed by integer index. Every malformed override is reported, not only the first.
    """
    if isinstance(overrides, str):  # a lone "a.b=c" would otherwise be split into characters
        overrides = [overrides]
    problems: list[tuple[str, str]] = []
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        # A runaway key or value would fill the screen; their start says enough.
        shown = key if len(key) <= 120 else key[:117] + "..."
        quoted = describe_value(text, 120)
        if not sep or not key or any(not part.strip() for part in key.split(".")):
            problems.append(
                (
                    shown or quoted,
                    f"malformed override {quoted}; expected "
                    "'dotted.key=value', e.g. 'model.d_model=128'",
                )
            )
            continue
        try:
            value = load_yaml(raw)
        except YAMLProblem as exc:
            why = exc.describe()
            problems.append((shown, f"override {quoted}: the value is not valid {why}"))
            continue
        error = set_path(data, [part.strip() for part in key.split(".")], value, create=True)
        if error:
            problems.append((shown, f"override {quoted}: {error}"))
    if problems:
        raise RecipeError(source, problems)


# --- pydantic errors -> RecipeError problems ------------------------------------------------------
def validation_problems(
    exc: ValidationError, data: Any, root: type[BaseModel] | None = None
) -> list[tuple[str, str]]:
    """``(dotted.key, message)`` for every error; ``data`` is the validated input (for lookups)
    and ``root`` the model class it was validated against (default :class:`RecipeSpec`)."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        allowed = None
        if err["type"] == "extra_forbidden":
            allowed = allowed_keys(root or RecipeSpec, data, loc[:-1])
        problems.append((".".join(_key_part(p) for p in loc), describe_error(err, allowed)))
    return problems


def _key_part(part: Any) -> str:
    """One part of a dotted key as the message shows it: an empty key (``'': 1``) as ``''``,
    else the report's line had no key at all, as if the whole file were at fault."""
    return "''" if part == "" else str(part)


def allowed_keys(root: type[BaseModel], data: Any, loc: Sequence[Any]) -> list[str] | None:
    """Field names of the model found at ``loc`` (walking annotations and the input together).

    The input is needed because a layer's class depends on its ``kind`` value.
    """
    tp: Any = root
    node = data
    for key in loc:
        tp = _child_type(tp, node, key)
        node = get_path(node, [key])
        if tp is None:
            return None
    cls = _model_class(tp, node)
    return list(cls.model_fields) if cls is not None else None


def _arms(tp: Any) -> list[Any]:
    """Flatten ``Annotated``/``Optional``/``Union`` into the plain member types."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _arms(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [arm for arg in typing.get_args(tp) for arm in _arms(arg)]
    return [tp]


def _model_class(tp: Any, node: Any) -> type[BaseModel] | None:
    for arm in _arms(tp):
        if isinstance(arm, type) and issubclass(arm, BaseModel):
            if issubclass(arm, LayerSpec) and isinstance(node, dict):
                kind = node.get("kind")
                if kind in LAYERS:
                    return LAYERS.get(kind).spec_cls
            if issubclass(arm, TaskSpec) and isinstance(node, dict):
                kind = node.get("kind")
                if kind in TASKS:
                    return TASKS.get(kind)
            return arm
    return None


def _child_type(tp: Any, node: Any, key: Any) -> Any:
    cls = _model_class(tp, node)
    if cls is not None:
        field = cls.model_fields.get(str(key))
        return field.annotation if field is not None else None
    for arm in _arms(tp):
        origin = typing.get_origin(arm)
        if origin is dict and (node is None or isinstance(node, dict)):
            return typing.get_args(arm)[1]
        if origin is list and isinstance(key, int) and (node is None or isinstance(node, list)):
            return typing.get_args(arm)[0]
    return None


# --- dumping --------------------------------------------------------------------------------------
def recipe_to_dict(spec: RecipeSpec) -> dict[str, Any]:
    """The fully resolved recipe (every default filled in) as plain JSON-compatible data.

    ``plugins`` also names the modules of the user's kinds the recipe uses, even for a spec
    built in Python (where nothing recorded them), so that the dump loads in a new process.
    """
    data = spec.model_dump(mode="json")
    data["plugins"] = list(dict.fromkeys([*spec.plugins, *plugins_in_use(spec)]))
    return data


def dump_recipe(spec: RecipeSpec, path: str | os.PathLike[str] | None = None) -> str:
    """YAML of the fully resolved recipe; with ``path``, also written there atomically.

    The run directory keeps this file so a run can be reproduced even if defaults change later;
    ``load_recipe`` of it gives back an equal spec. A recipe whose resolved form the reader
    would refuse (YAML aliases expand: a 3 KB file can resolve past the reader's 64 KiB) is a
    :class:`RecipeError` here, before a run writes a folder it could not be read back from.
    """
    text = yaml.safe_dump(recipe_to_dict(spec), sort_keys=False, allow_unicode=True)
    try:
        load_yaml(text)
    except YAMLProblem as problem:
        raise RecipeError(
            spec.name,
            [
                (
                    "",
                    f"resolved (aliases expanded, defaults filled in) it is {len(text):,} bytes "
                    f"of YAML that could not be read back ({problem}); write fewer blocks or "
                    "overrides, or shorter texts",
                )
            ],
        ) from None
    if path is not None:
        atomic_write_text(path, text)
    return text
