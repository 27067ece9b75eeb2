"""The model section of a recipe: named block templates plus a layout, expanded to a layer list.

A recipe describes a hybrid stack compactly -- ``blocks`` defines a few templates, ``layout`` says
in which order they repeat, ``overrides`` changes single occurrences -- but everything downstream
(``build.py``, ``summary.py``) wants the flat, fully resolved list of :class:`BlockSpec`, one per
layer. :meth:`ModelSpec.layers` produces that list, and validation resolves it once up front so
that every problem (grammar, unknown names, overrides, impossible shapes) surfaces at load time.

Error convention: problems found here are raised as pydantic line errors of type
:data:`SPEC_PROBLEM` whose ``loc`` is the path *of the recipe key the user has to edit*, relative
to the model section (e.g. ``("blocks", "m", "mixer", "headdim")``, ``("layout",)`` or
``("overrides", 5, "mixer.window")``) and whose message is complete (it names the bad value and
what is allowed). ``recipe.py`` only prefixes the section name and joins the loc with dots.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import (
    Field,
    SerializeAsAny,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

import hybridkit.layers  # noqa: F401  (registers the built-in layer kinds)
from hybridkit.errors import describe_value
from hybridkit.layers.base import LayerSpec
from hybridkit.registry import LAYERS
from hybridkit.schema import (
    SPEC_PROBLEM,
    StrictModel,
    get_path,
    raise_problems,
    set_path,
    spec_problem,
)

MAX_LAYERS = 1024
"""A layout that expands beyond this is certainly a typo (``x 100`` nested twice). Real hybrids
have at most a few hundred layers; the cap keeps ``hybridkit show`` of any recipe quick (it builds
every layer, if only on the meta device)."""

Loc = tuple[str | int, ...]


def describe_error(err: Any, allowed_keys: list[str] | None = None) -> str:
    """Turn one pydantic error dict into a sentence naming the bad value and what is allowed.

    Shared by the override handling below and by ``recipe.py`` so that every error reads alike.
    """
    kind = err["type"]
    msg: str = err["msg"]
    value = err.get("input")
    got = describe_value(value)
    if kind == SPEC_PROBLEM:
        return msg
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        allowed = ", ".join(allowed_keys) if allowed_keys else "(none)"
        return f"unknown key (value {got}); allowed keys: {allowed}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "?")
        return f"got {got}{_yaml_bool_hint(value)}; allowed values: {expected}"
    if kind in ("value_error", "assertion_error"):
        text = re.sub(r"^(Value|Assertion) error, ", "", msg)
        return text if got in text else f"{text} (got {got})"
    if kind == "task_spec":  # a task's own sentence, which usually names the value already
        return msg if got in msg else f"{msg}; got {got}"
    if msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be ") :]
    # "a valid dictionary or instance of BlockSpec": a YAML user writes a mapping.
    msg = re.sub(r"a valid dictionary or instance of \w+", "a mapping (key: value, ...)", msg)
    msg = msg.replace("a valid dictionary", "a mapping (key: value, ...)")
    return f"{msg}; got {got}{_yaml_bool_hint(value)}"


def _yaml_bool_hint(value: Any) -> str:
    """For a boolean where something else was expected: YAML (and ``--set``, which parses its
    value as YAML) reads ``yes`` / ``no`` / ``on`` / ``off`` as booleans, so ``position=no``
    arrives as False and the user never wrote one."""
    if isinstance(value, bool):
        return " (YAML reads yes / no / on / off / true / false as a boolean: quote the value)"
    return ""


def _layer_kind_error(value: Any) -> None:
    """Reject a missing/unknown ``kind`` at the ``kind`` key itself (not at the whole layer)."""
    if isinstance(value, dict) and value.get("kind") not in LAYERS:
        kind = value.get("kind")
        raise_problems("LayerSpec", [spec_problem(("kind",), LAYERS.kind_problem(kind), kind)])


def _keeps_state(kind: str) -> bool:
    """Whether layers of ``kind`` remember the past in decoding (``allocate_cache``): only the
    mixer slot's layers get a cache, so such a kind in the mlp slot would decode wrong."""
    return getattr(LAYERS.get(kind).module_cls, "allocate_cache", None) is not None


class _AtomicAssignment(StrictModel):
    """Undo an attribute assignment that the model-level validator rejects.

    With ``validate_assignment`` pydantic stores the new value *before* running model
    validators, so without this a rejected ``spec.layout = "zz"`` would leave the spec invalid.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        missing = object()
        old = self.__dict__.get(name, missing)
        try:
            super().__setattr__(name, value)
        except ValidationError:
            if old is not missing:
                self.__dict__[name] = old
            raise


class BlockSpec(_AtomicAssignment):
    """One pre-norm residual block: ``h += mixer(norm(h)); h += mlp(norm(h))``.

    Either part may be absent (Megatron-style stacks alternate mixer-only and MLP-only layers),
    but not both -- an empty block would be a silent identity layer.
    """

    mixer: SerializeAsAny[LayerSpec] | None = None
    mlp: SerializeAsAny[LayerSpec] | None = None

    @field_validator("mixer", "mlp", mode="before")
    @classmethod
    def _known_kind(cls, value: Any) -> Any:
        _layer_kind_error(value)
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> BlockSpec:
        if self.mixer is None and self.mlp is None:
            raise ValueError("a block needs a mixer, an mlp, or both; allowed keys: mixer, mlp")
        if self.mlp is not None and _keeps_state(self.mlp.kind):
            per_token = [k for k in LAYERS.names() if not _keeps_state(k)]
            raise_problems(
                "BlockSpec",
                [
                    spec_problem(
                        ("mlp", "kind"),
                        f"{self.mlp.kind!r} mixes tokens and keeps a decode state, so it belongs "
                        f"in the mixer slot; the mlp slot takes per-token kinds: {per_token}",
                        self.mlp.kind,
                    )
                ],
            )
        return self

    def parts(self) -> Iterator[tuple[str, LayerSpec]]:
        """The present parts as ``(key, spec)``, in forward order."""
        for key in ("mixer", "mlp"):
            part = getattr(self, key)
            if part is not None:
                yield key, part

    def check(self, d_model: int) -> list[tuple[str, str]]:
        """Cross-field problems of both parts, keys relative to the block (``mixer.headdim``)."""
        return [
            (f"{key}.{sub}", msg) for key, part in self.parts() for sub, msg in part.check(d_model)
        ]


def _builtin_templates() -> dict[str, BlockSpec]:
    """Templates usable without defining them: one mixer or one MLP with paper defaults."""
    return {
        "mamba": BlockSpec.model_validate({"mixer": {"kind": "mamba3"}}),
        "attention": BlockSpec.model_validate({"mixer": {"kind": "attention"}}),
        "mlp": BlockSpec.model_validate({"mlp": {"kind": "mlp"}}),
    }


DEFAULT_SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp"}

_INLINE = TypeAdapter(dict[int, BlockSpec])


class ModelSpec(_AtomicAssignment):
    """Width, vocabulary, block templates and their layout; see the module docstring."""

    d_model: int = Field(default=256, gt=0, le=65536, description="residual stream width")
    vocab_size: int = Field(gt=0, le=2**24, description="number of token ids")
    blocks: dict[str, BlockSpec] = Field(
        default_factory=dict,
        description="named block templates; built-ins mamba/attention/mlp unless redefined",
    )
    layout: str | list[str | BlockSpec] = Field(
        description="pattern '(m m a) x 4', Megatron string 'MM*', or a list of names/blocks"
    )
    overrides: dict[int, dict[str, Any]] = Field(
        default_factory=dict,
        description="layer index (negative: from the end) -> {'mixer.window': 128, ...}",
    )
    symbols: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_SYMBOLS),
        description="Megatron-style symbol -> template name",
    )
    tie_embeddings: bool = True
    norm_eps: float = Field(default=1e-5, gt=0, le=1.0)
    init_std: float = Field(default=0.02, gt=0)

    @field_validator("layout", mode="before")
    @classmethod
    def _layout_items(cls, value: Any) -> Any:
        """Validate inline blocks with index-only error paths (no union-arm noise in ``loc``)."""
        if isinstance(value, str):
            return value
        if not isinstance(value, (list, tuple)):
            raise_problems(
                "ModelSpec",
                [
                    spec_problem(
                        (),
                        "layout must be a pattern string (e.g. '(m m a) x 4') or a list of "
                        f"template names and inline blocks; got {describe_value(value)}",
                        value,
                    )
                ],
            )
        value = list(value)
        bad = [
            spec_problem(
                (i,),
                "a layout item must be a template name or an inline block "
                f"mapping such as {{mixer: {{kind: mamba3}}}}; got {describe_value(item)}",
                item,
            )
            for i, item in enumerate(value)
            if not isinstance(item, (str, dict, BlockSpec))
        ]
        raise_problems("ModelSpec", bad)
        inline = _INLINE.validate_python(
            {i: item for i, item in enumerate(value) if isinstance(item, dict)}
        )
        return [inline.get(i, item) for i, item in enumerate(value)]

    @field_validator("overrides", mode="before")
    @classmethod
    def _one_key_per_layer(cls, value: Any) -> Any:
        """Keys that name the same layer once read as integers (``1``, ``"1"``, ``01``,
        ``+1``) are an error: the YAML reader refuses a repeated key, but these differ as
        text, and the last one silently won."""
        if not isinstance(value, dict):
            return value
        seen: dict[int, list[Any]] = {}
        for key in value:
            index = _layer_index(key)
            if index is not None:
                seen.setdefault(index, []).append(key)
        bad = [
            spec_problem(
                (),
                f"layer {index} is named more than once ({', '.join(map(repr, keys))}); give "
                "each layer one entry",
                value,
            )
            for index, keys in seen.items()
            if len(keys) > 1
        ]
        raise_problems("ModelSpec", bad)
        return value

    @model_validator(mode="after")
    def _resolve_all(self) -> ModelSpec:
        raise_problems("ModelSpec", _Resolver(self).run().problems)
        return self

    # --- public API ---------------------------------------------------------------------------
    def templates(self) -> dict[str, BlockSpec]:
        """All template names usable in ``layout``: the built-ins, then the user's (which win)."""
        return {**_builtin_templates(), **self.blocks}

    def layer_names(self) -> list[str]:
        """Template name of every layer (``"inline"`` for blocks written into a list layout)."""
        res = _Resolver(self).run()
        _raise_if(res)
        return [slot.name for slot in res.slots]

    def layers(self) -> list[BlockSpec]:
        """The flat layer list after expanding the layout and applying overrides (fresh copies)."""
        res = _Resolver(self).run()
        _raise_if(res)
        return [slot.block.model_copy(deep=True) for slot in res.slots]

    @property
    def n_layer(self) -> int:
        return len(self.layer_names())


def _raise_if(res: _Resolver) -> None:
    # Reached only when the spec was mutated in place into an invalid state after validation.
    raise_problems("ModelSpec", res.problems)


# --- layout grammar ---------------------------------------------------------------------------
class _SyntaxProblem(Exception):
    pass


@dataclass
class _Name:
    name: str
    pos: int


@dataclass
class _Group:
    items: list[_Name | _Group]
    count: int = 1
    pos: int = 0


_TOKEN = re.compile(
    r"\s*(?:(?P<open>\()|(?P<close>\))|(?P<star>\*)|(?P<num>\d+(?:\.\d*)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)|(?P<bad>\S))"
)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens = []
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind is None:  # trailing whitespace
            continue
        tokens.append((kind, m.group(kind), m.start(kind)))
    return tokens


class _PatternParser:
    """Recursive descent over ``seq := item*; item := atom rep*; atom := NAME | '(' seq ')'``.

    ``rep`` is ``x N``, ``* N`` or ``xN``. The word ``x`` is a repetition only when a count
    follows, so a template may still be called ``x``.
    """

    def __init__(self, text: str, known: set[str]):
        self.text = text
        self.known = known
        self.tokens = _tokenize(text)
        self.i = 0

    #: parentheses nested deeper than this are refused (the tree is walked recursively)
    MAX_NESTING = 32

    def parse(self) -> _Group:
        seq = self._seq(top=True)
        return _Group(seq)

    def _peek(self, ahead: int = 0) -> tuple[str, str, int] | None:
        j = self.i + ahead
        return self.tokens[j] if j < len(self.tokens) else None

    def _fail(self, message: str, pos: int | None) -> _SyntaxProblem:
        where = f"at position {pos}" if pos is not None else "at the end"
        text = (
            self.text if len(self.text) <= 120 else f"{self.text[:100]}... ({len(self.text)} chars)"
        )
        return _SyntaxProblem(f"{message} ({where} of layout {text!r})")

    def _seq(self, top: bool, depth: int = 0) -> list[_Name | _Group]:
        items: list[_Name | _Group] = []
        while (tok := self._peek()) is not None:
            kind, text, pos = tok
            if kind == "close":
                if top:
                    raise self._fail("unbalanced parentheses: ')' without a matching '('", pos)
                return items
            if kind == "open":
                if depth >= self.MAX_NESTING:
                    raise self._fail(
                        f"groups nested more than {self.MAX_NESTING} deep; allowed: at most "
                        f"{self.MAX_NESTING} levels of '('",
                        pos,
                    )
                self.i += 1
                inner = self._seq(top=False, depth=depth + 1)
                if self._peek() is None:
                    raise self._fail(
                        f"unbalanced parentheses: '(' at position {pos} is never closed", None
                    )
                self.i += 1
                if not inner:
                    raise self._fail("empty group '()'", pos)
                atom: _Name | _Group = _Group(inner, pos=pos)
            elif kind == "name" and not self._is_rep():
                self.i += 1
                atom = _Name(text, pos)
            elif kind in ("star", "name"):
                raise self._fail(f"repetition {text!r} needs a name or a group before it", pos)
            elif kind == "num":
                raise self._fail(
                    f"unexpected number {text}; write 'NAME x {text}' or '(GROUP) x {text}'", pos
                )
            else:
                raise self._fail(
                    f"unexpected character {text!r}; allowed: template names, "
                    "'(', ')', 'x N' or '* N'",
                    pos,
                )
            items.append(self._reps(atom))
        return items

    def _is_rep(self) -> bool:
        tok = self._peek()
        if tok is None:
            return False
        kind, text, _ = tok
        if kind == "star":
            return True
        if kind == "name" and re.fullmatch(r"x\d+", text):
            return True
        if kind != "name" or text != "x":
            return False
        nxt = self._peek(1)
        # A template called "x" wins unless a count follows ("m x" = m then x; "m x 2" = m m).
        return (nxt is not None and nxt[0] == "num") or "x" not in self.known

    def _reps(self, atom: _Name | _Group) -> _Name | _Group:
        while self._is_rep():
            kind, text, pos = self.tokens[self.i]
            self.i += 1
            if kind == "name" and text != "x":  # "x3"
                count_text, count_pos = text[1:], pos + 1
            else:
                nxt = self._peek()
                if nxt is None or nxt[0] != "num":
                    got = "nothing" if nxt is None else repr(nxt[1])
                    raise self._fail(
                        f"{text!r} must be followed by a repetition count (a "
                        f"positive integer), got {got}",
                        pos,
                    )
                self.i += 1
                count_text, count_pos = nxt[1], nxt[2]
            digits = len(count_text.lstrip("0"))
            if count_text.isdigit() and digits > len(str(MAX_LAYERS)):
                # before int(): past 4,300 digits Python refuses the conversion itself
                shown = count_text if len(count_text) <= 12 else count_text[:12] + "..."
                raise self._fail(
                    f"repetition count {shown} ({digits} digits) is too large; allowed: at "
                    f"most {MAX_LAYERS} layers in all",
                    count_pos,
                )
            if not count_text.isdigit() or int(count_text) < 1:
                what = "makes the layout empty" if count_text == "0" else "is not an integer"
                raise self._fail(
                    f"bad repetition count {count_text} ({what}); allowed: a positive integer",
                    count_pos,
                )
            if isinstance(atom, _Group):
                # "m x 2 x 3" is "m x 6" and "(a b) x 2" repeats the group's items: counts
                # multiply instead of nesting, so a long chain of repetitions cannot build a
                # tree too deep to walk
                atom = _Group(atom.items, atom.count * int(count_text), atom.pos)
            else:
                atom = _Group([atom], int(count_text), pos)
        return atom


def _count(node: _Name | _Group) -> int:
    if isinstance(node, _Name):
        return 1
    return node.count * sum(_count(item) for item in node.items)


def _expand(node: _Name | _Group) -> Iterator[_Name]:
    if isinstance(node, _Name):
        yield node
        return
    for _ in range(node.count):
        for item in node.items:
            yield from _expand(item)


def _layer_index(key: Any) -> int | None:
    """The layer an ``overrides`` key names, as pydantic will read it (None: not an index)."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, str):
        try:
            return int(key.strip())
        except ValueError:
            return None
    return None


# --- resolution: layout -> slots -> overrides -> checks ----------------------------------------
@dataclass
class _Slot:
    """One layer: its template name, its block, and where its settings come from."""

    name: str
    block: BlockSpec
    origin: Loc  # recipe path of the block's definition (template or inline list item)
    overridden_by: list[int] = field(default_factory=list)


class _Resolver:
    """Expands and checks a :class:`ModelSpec`, collecting every problem with its recipe path."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.templates = spec.templates()
        self.problems: list[InitErrorDetails] = []
        self.slots: list[_Slot] = []

    def add(self, loc: Loc, message: str, value: Any) -> None:
        self.problems.append(spec_problem(loc, message, value))

    def run(self) -> _Resolver:
        self._check_symbols()
        names = self._layout_names()
        if names is not None and len(names) > MAX_LAYERS:
            # Pattern layouts are counted before expanding them; lists and Megatron strings here.
            self.add(
                ("layout",),
                f"the layout has {len(names)} layers; allowed: at most {MAX_LAYERS}",
                describe_value(self.spec.layout),
            )
            return self
        if names is not None:
            self._apply_overrides()
            self._check_layers()
        return self

    def _known(self) -> str:
        return ", ".join(sorted(self.templates))

    def _check_symbols(self) -> None:
        for sym, name in self.spec.symbols.items():
            if len(sym) != 1 or sym.isspace() or sym in "()":
                self.add(
                    ("symbols", sym),
                    f"symbol {sym!r} must be one character other than whitespace and parentheses",
                    sym,
                )
            if name not in self.templates:
                self.add(
                    ("symbols", sym),
                    f"symbol {sym!r} names unknown template {name!r}; "
                    f"known templates: {self._known()}",
                    name,
                )

    def _slot(self, name: str) -> _Slot:
        # Built-ins the user did not redefine are changed by defining them under `blocks`.
        return _Slot(name, self.templates[name], ("blocks", name))

    def _layout_names(self) -> list[str] | None:
        layout = self.spec.layout
        if isinstance(layout, list):
            return self._list_layout(layout)
        if not layout.strip():
            self.add(
                ("layout",),
                "layout is empty; give a pattern such as '(m m a) x 4', a "
                "Megatron string such as 'MM*', or a list of template names",
                layout,
            )
            return None
        if self._is_megatron(layout):
            if any(self.spec.symbols[ch] not in self.templates for ch in layout):
                return None  # already reported under `symbols`
            self.slots = [self._slot(self.spec.symbols[ch]) for ch in layout]
            return [slot.name for slot in self.slots]
        return self._pattern_layout(layout)

    def _is_megatron(self, text: str) -> bool:
        plain = not any(ch.isspace() or ch in "()" for ch in text)
        return plain and text not in self.templates and all(ch in self.spec.symbols for ch in text)

    def _list_layout(self, layout: list[str | BlockSpec]) -> list[str] | None:
        if not layout:
            self.add(
                ("layout",), "layout is empty; list at least one template name or block", layout
            )
            return None
        unknown = False
        for i, item in enumerate(layout):
            if isinstance(item, BlockSpec):
                self.slots.append(_Slot("inline", item, ("layout", i)))
            elif item in self.templates:
                self.slots.append(self._slot(item))
            else:
                unknown = True
                self.add(
                    ("layout", i),
                    f"unknown template {item!r}; known templates: {self._known()}",
                    item,
                )
        # With a layer missing, override indices would point at the wrong layers.
        return None if unknown else [slot.name for slot in self.slots]

    def _pattern_layout(self, text: str) -> list[str] | None:
        problems: list[str] = []
        root: _Group | None = None
        try:
            root = _PatternParser(text, set(self.templates)).parse()
        except _SyntaxProblem as exc:
            problems.append(str(exc))
        if root is not None:
            unknown = sorted({n.name for n in _expand_names(root)} - set(self.templates))
            problems += [
                f"unknown template {name!r} in layout {text!r}; known templates: {self._known()}"
                for name in unknown
            ]
            if not problems and _count(root) == 0:
                problems.append(f"layout {text!r} expands to no layers")
            if not problems and _count(root) > MAX_LAYERS:
                problems.append(
                    f"layout {text!r} expands to {_count(root)} layers; allowed: at "
                    f"most {MAX_LAYERS}"
                )
        if problems and self._looks_megatron(text):
            bad = sorted({ch for ch in text if ch not in self.spec.symbols})
            symbols = ", ".join(f"{k!r} ({v})" for k, v in self.spec.symbols.items())
            self.add(
                ("layout",),
                f"unknown Megatron symbol(s) {', '.join(map(repr, bad))} in "
                f"layout {text!r}; allowed symbols: {symbols}. Read as a pattern of template "
                f"names instead: {problems[0]}",
                text,
            )
            return None
        for message in problems:
            self.add(("layout",), message, text)
        if problems or root is None:
            return None
        self.slots = [self._slot(node.name) for node in _expand(root)]
        return [slot.name for slot in self.slots]

    def _looks_megatron(self, text: str) -> bool:
        plain = not any(ch.isspace() or ch in "()" for ch in text)
        return plain and any(ch in self.spec.symbols for ch in text)

    # --- overrides ----------------------------------------------------------------------------
    def _apply_overrides(self) -> None:
        n = len(self.slots)
        for index, changes in self.spec.overrides.items():
            if not -n <= index < n:
                self.add(
                    ("overrides", index),
                    f"layer index {index} is out of range; allowed: "
                    f"{-n}..{n - 1} (the layout has {n} layers)",
                    index,
                )
                continue
            slot = self.slots[index % n]
            block = self._override_block(index, slot, changes)
            if block is not None:
                slot.block = block
                slot.overridden_by.append(index)

    def _override_block(self, index: int, slot: _Slot, changes: dict[str, Any]) -> BlockSpec | None:
        data = slot.block.model_dump()
        allowed = _block_keys(slot.block)
        leaves = list(_flatten(changes))
        ok = True
        for key, value in leaves:
            error = _set_dotted(data, key, value)
            if error:
                ok = False
                self.add(
                    ("overrides", index, key),
                    f"{error} (layer {index}, template {slot.name!r}); allowed keys: {allowed}",
                    value,
                )
        try:
            block = BlockSpec.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors():
                loc = _override_loc(index, [k for k, _ in leaves], err["loc"])
                fields = (
                    _allowed_in_block(data, err["loc"])
                    if err["type"] == "extra_forbidden"
                    else None
                )
                self.add(
                    loc,
                    f"{describe_error(err, fields)} (override of layer {index}, "
                    f"template {slot.name!r})",
                    err.get("input"),
                )
            return None
        return block if ok else None

    # --- cross-field checks -------------------------------------------------------------------
    def _check_layers(self) -> None:
        d_model = self.spec.d_model
        reported: set[tuple[Loc, str]] = set()
        template_problems: dict[str, list[tuple[str, str]]] = {}

        def report(loc: Loc, message: str, value: Any) -> None:
            if (loc, message) not in reported:
                reported.add((loc, message))
                self.add(loc, message, value)

        for i, slot in enumerate(self.slots):
            problems = slot.block.check(d_model)
            if not problems:
                continue
            if slot.name == "inline":
                base: list[tuple[str, str]] = []
            else:
                if slot.name not in template_problems:
                    template_problems[slot.name] = self.templates[slot.name].check(d_model)
                base = template_problems[slot.name]
            for key, msg in problems:
                if slot.overridden_by and (key, msg) not in base:
                    loc: Loc = ("overrides", slot.overridden_by[-1], key)
                    where = f"layer {i} after its override"
                else:
                    loc = (*slot.origin, *key.split("."))
                    where = "inline block" if slot.name == "inline" else f"template {slot.name!r}"
                    if slot.name not in self.spec.blocks and slot.name != "inline":
                        where += " (a built-in; define it under model.blocks to change it)"
                report(loc, f"{msg} ({where}, d_model {d_model})", _get_dotted(slot.block, key))
        # Templates the user defined but the layout does not use are still checked: a typo there
        # would otherwise surface only once someone switches the layout to use them.
        used = {slot.name for slot in self.slots}
        for name, block in self.spec.blocks.items():
            if name not in used:
                for key, msg in block.check(d_model):
                    report(
                        ("blocks", name, *key.split(".")),
                        f"{msg} (template {name!r}, unused; d_model {d_model})",
                        _get_dotted(block, key),
                    )


def _expand_names(root: _Group) -> Iterator[_Name]:
    """Every name in the tree once (without repetition), for unknown-name checks."""
    for item in root.items:
        if isinstance(item, _Name):
            yield item
        else:
            yield from _expand_names(item)


def _flatten(changes: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"mixer": {"window": 8}}`` and ``{"mixer.window": 8}`` mean the same override.

    A nested mapping with a ``kind`` replaces the whole part (switching e.g. mixer kinds).
    """
    for key, value in changes.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and "kind" not in value:
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> str | None:
    """Set ``data[a][b] = value`` for key ``"a.b"``; returns an error message or None.

    A block has exactly the keys ``mixer`` and ``mlp``, so an unknown first segment is reported
    here with every dotted key an override may set; deeper unknown leaves are left to
    re-validation, which knows the layer's fields.
    """
    parts = key.split(".")
    if any(not p for p in parts):
        return f"malformed key {key!r}"
    if parts[0] not in data:
        return f"unknown key {parts[0]!r}"
    return set_path(data, parts, value, create=False)


def _get_dotted(block: BlockSpec, key: str) -> Any:
    return get_path(block, key.split("."))


def _block_keys(block: BlockSpec) -> str:
    """Every key an override of this block may set, in dotted form."""
    keys = []
    for part, spec in block.parts():
        keys += [f"{part}.{name}" for name in type(spec).model_fields]
    return ", ".join(keys)


def _allowed_in_block(data: dict[str, Any], loc: Loc) -> list[str]:
    """Field names of the model that rejected ``loc[-1]`` (a BlockSpec or a layer spec)."""
    if len(loc) <= 1:
        return list(BlockSpec.model_fields)
    part = data.get(str(loc[0]))
    if isinstance(part, dict) and part.get("kind") in LAYERS:
        return list(LAYERS.get(part["kind"]).spec_cls.model_fields)
    return []


def _override_loc(index: int, keys: list[str], err_loc: Loc) -> Loc:
    """Map a re-validation error inside a block back to the override key that caused it."""
    path = [str(p) for p in err_loc]
    best: list[str] | None = None
    for key in keys:
        split = key.split(".")
        if path[: len(split)] == split and (best is None or len(split) > len(best)):
            best = split
    if best is None:  # the whole block (no key of it): the override itself
        return ("overrides", index, ".".join(path)) if path else ("overrides", index)
    rest = tuple(err_loc[len(best) :])
    return ("overrides", index, ".".join(best), *rest)
