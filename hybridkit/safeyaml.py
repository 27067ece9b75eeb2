"""YAML that no input can hang or crash: bounded size, nesting and alias expansion; plain data only.

Recipes, study files and ``--set`` values are typed by people and copied between machines, so
the reader must treat them as hostile. ``yaml.safe_load`` alone does not: a value nested a few
thousand levels deep exhausts Python's recursion limit (a ``RecursionError`` traceback), a few
hundred bytes of anchors and aliases (``a: &a [x, x]``, ``b: &b [*a, *a]``, ...) expand into
billions of values that every later step (validation, copying, printing) walks, ``&a [*a]`` is a
list that contains itself, an integer of 5,000 digits raises a bare ``ValueError`` and
``!!binary`` / ``!!set`` / ``!!timestamp`` turn into Python objects no recipe key accepts.

This reader refuses each of those with a :class:`YAMLProblem` that says where (line and column)
and why, before any of it reaches pydantic:

* the text is at most :data:`MAX_BYTES` (pure-Python YAML parses roughly 100 KB/s on a busy
  core; recipes are a few KB);
* mappings and lists nest at most :data:`MAX_DEPTH` deep, counted *after* aliases are expanded
  (an alias to a deep value placed deep inside another one nests as deep as the two together);
* the document holds at most :data:`MAX_NODES` values once aliases are expanded; aliases that
  stay within that budget (``mlp: &mlp {kind: mlp}`` reused by several blocks) are fine, and a
  recursive alias is refused;
* only plain data is constructed (null, booleans, integers, floats, strings, lists, mappings,
  ``<<`` merges); dates stay strings, every other tag is refused by name;
* a key repeated in one mapping is an error (YAML would silently keep the last one, the classic
  way a setting "does nothing").

The pure-Python loader is used on purpose: its composer is the one whose recursion we bound.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
import yaml.parser
import yaml.reader
import yaml.scanner
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "YAMLProblem", "decode_text", "load_yaml"]

MAX_BYTES = 64 * 1024
MAX_DEPTH = 64
MAX_NODES = 20_000

_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class YAMLProblem(ValueError):
    """Why a YAML text was refused; ``line``/``column`` are 1-based (None when not known).

    ``syntax`` is true when the text is not YAML at all (a scanner or parser error), as opposed
    to YAML that holds something a recipe may not (a tag, an alias bomb, a duplicate key).
    """

    def __init__(
        self,
        message: str,
        line: int | None = None,
        column: int | None = None,
        *,
        syntax: bool = False,
    ):
        self.message, self.line, self.column, self.syntax = message, line, column, syntax
        where = f"line {line}, column {column}: " if line is not None else ""
        super().__init__(where + message)

    def describe(self) -> str:
        """``YAML syntax error at line 3, column 5: ...`` (the form the loaders print)."""
        what = "YAML syntax error" if self.syntax else "YAML error"
        return f"{what} at {self}" if self.line is not None else f"{what}: {self}"


def _mark(mark: Any) -> tuple[int | None, int | None]:
    return (mark.line + 1, mark.column + 1) if mark is not None else (None, None)


class _Limits(Exception):
    """Raised inside the loader; carries a YAMLProblem out of PyYAML's machinery."""

    def __init__(self, problem: YAMLProblem):
        self.problem = problem


class _Loader(yaml.SafeLoader):
    """SafeLoader with a bounded composer and a constructor for plain data only."""

    # Dates stay strings: a description or name such as 2024-01-01 is text to a recipe.
    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        # Checked while composing, before PyYAML's own recursion can go deep or grow large.
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Limits(
                YAMLProblem(
                    f"too many values (more than {MAX_NODES}); recipes and study files are small",
                    *_mark(self.peek_event().start_mark),
                )
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Limits(
                    YAMLProblem(
                        f"nested more than {MAX_DEPTH} levels deep",
                        *_mark(self.peek_event().start_mark),
                    )
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # past Python's limit on the digits of an int read from text
            digits = sum(ch.isdigit() for ch in node.value)
            raise ConstructorError(
                None,
                None,
                f"an integer of {digits} digits is out of range; allowed: a 64-bit integer",
                node.start_mark,
            ) from None

    def construct_yaml_str(self, node: ScalarNode) -> str:
        text = super().construct_yaml_str(node)
        bad = next((ch for ch in text if "\ud800" <= ch <= "\udfff"), None)
        if bad is not None:  # only an escape ("\ud800") makes one; nothing can print or save it
            raise ConstructorError(
                None,
                None,
                f"the escape \\u{ord(bad):04x} is a lone surrogate, not a character; allowed: "
                "any Unicode character (a pair of surrogates is written as one \\U escape)",
                node.start_mark,
            )
        return text

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: dict[tuple[str, str], Any] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    line, _col = _mark(seen[ident])
                    raise ConstructorError(
                        None,
                        None,
                        f"duplicate key {key_node.value!r} (first at line {line}); "
                        "YAML would silently keep only the last one",
                        key_node.start_mark,
                    )
                seen[ident] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:str", _Loader.construct_yaml_str)
for _tag in ("binary", "timestamp", "omap", "pairs", "set"):
    # add_constructor gave the class its own table; without these entries such tags reach the
    # fallback below and are refused by name.
    del _Loader.yaml_constructors[f"tag:yaml.org,2002:{_tag}"]


def _refuse_tag(loader: _Loader, node: Node) -> Any:
    tag = re.sub(r"^tag:yaml\.org,2002:", "!!", node.tag)
    raise ConstructorError(
        None,
        None,
        f"unsupported tag {tag!r}: only plain data is read (mappings, lists, strings, numbers, "
        "booleans, null)",
        node.start_mark,
    )


_Loader.add_constructor(None, _refuse_tag)


def _check_expanded(root: Node) -> None:
    """Depth and size of the document with every alias expanded, without expanding it.

    Each distinct node is visited once (memoised), so a billion-laughs document costs as much as
    its text; a node reached again while it is still being measured is a recursive alias.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            active.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_NODES:
                raise YAMLProblem(
                    f"aliases expand to more than {MAX_NODES} values (an alias bomb?); "
                    "write the repeated part out or reuse fewer aliases",
                    *_mark(node.start_mark),
                )
            if depth[key] > MAX_DEPTH:
                raise YAMLProblem(
                    f"aliases nest the data more than {MAX_DEPTH} levels deep",
                    *_mark(node.start_mark),
                )
            continue
        if key in size:
            continue
        if key in active:
            raise YAMLProblem("recursive alias: a value contains itself", *_mark(node.start_mark))
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)
        for c in children:
            if id(c) in active:
                raise YAMLProblem("recursive alias: a value contains itself", *_mark(c.start_mark))


def decode_text(data: bytes) -> str:
    """UTF-8 text of ``data``; a bad byte is a :class:`YAMLProblem` at its line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before) - (before.rfind(b"\n") + 1) + 1
        raise YAMLProblem(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8",
            line,
            column,
        ) from None


def load_yaml(text: str) -> Any:
    """The plain data of one YAML document, or a :class:`YAMLProblem` saying where and why."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise YAMLProblem(f"longer than {MAX_BYTES // 1024} KiB; recipes and study files are small")
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded(node)
        return loader.construct_document(node)
    except _Limits as exc:
        raise exc.problem from None
    except (yaml.scanner.ScannerError, yaml.parser.ParserError) as exc:
        raise YAMLProblem(_describe(exc), *_mark(exc.problem_mark), syntax=True) from None
    except yaml.MarkedYAMLError as exc:
        raise YAMLProblem(_describe(exc), *_mark(exc.problem_mark)) from None
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position]
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        raise YAMLProblem(
            f"character {char!r} (#x{ord(char):04x}) is not allowed in YAML",
            line,
            column,
            syntax=True,
        ) from None
    except yaml.YAMLError as exc:  # anything else PyYAML reports
        raise YAMLProblem(str(exc)) from None
    except RecursionError:  # belt and braces: the limits above should make this unreachable
        raise YAMLProblem(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    finally:
        if loader is not None:
            loader.dispose()


def _describe(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's problem and context as one sentence, marks as "line L, column C"."""
    problem = exc.problem or "invalid YAML"
    if isinstance(exc, ComposerError) and "undefined alias" in problem:
        problem = f"{problem} (an alias *name needs an earlier anchor &name)"
    if exc.context:
        line, column = _mark(exc.context_mark)
        where = f" at line {line}, column {column}" if line is not None else ""
        context = exc.context
        if (
            exc.context_mark is not None
            and exc.problem_mark is not None
            and (
                exc.context_mark.line == exc.problem_mark.line
                and exc.context_mark.column == exc.problem_mark.column
            )
        ):
            where = ""
        problem = f"{problem} ({context}{where})"
    return problem
