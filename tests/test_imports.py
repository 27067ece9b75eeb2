"""Imports inside hybridkit run one way, bottom to top, and never in a circle.

Why a test: a cycle or an upward import is invisible until someone imports modules in a new
order (or moves a function) and gets a half-initialised module, and every upward import makes the
lower layer impossible to use, test or reason about without the upper one (an evaluator that
needs the trainer, a task that needs the layer package). The README's "Layout" section and the
design note describe the picture; :data:`LEVELS` below is the rule the code is held to.

How: every module of the package is parsed with :mod:`ast` (nothing is imported). All import
statements count -- module level, inside functions and methods (a deferred import is still a
dependency), absolute and relative (``from . import x``, ``from ..y import z``) -- and each names
the hybridkit module it loads: ``from hybridkit.kernels import attention`` is an edge to
``hybridkit.kernels.attention``, ``from hybridkit.tasks.base import Batch`` one to
``hybridkit.tasks.base``, ``from hybridkit import build_model`` one to the package root
``hybridkit`` (which re-exports the public API and therefore sits at the top). Importing a
submodule runs its parent package's ``__init__`` too; that implicit step is not an edge, or every
module would depend on the package root.

Two rules, checked separately so a failure says which one broke:

* no cycles between modules, anywhere (also not inside ``hybridkit.kernels``, which is one level);
* no import from a module to a module of a *higher* level of :data:`LEVELS` (same level is
  fine: ``hybridkit.layers.attention`` may import ``hybridkit.layers.norm``).

Imports under ``if TYPE_CHECKING:`` never run; they are ignored by both rules (they let a lower
module *annotate* with a higher module's class, as ``build.py`` does with ``RecipeSpec``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "hybridkit"

LEVELS: list[tuple[int, str, tuple[str, ...]]] = [
    # (level, name, module prefixes) -- bottom to top; a module may import its own level or below.
    (
        0,
        "base utilities",
        ("hybridkit.errors", "hybridkit.fsutil", "hybridkit.safeyaml", "hybridkit.compat"),
    ),  # fmt: skip
    (1, "schema and registries", ("hybridkit.schema", "hybridkit.registry", "hybridkit.plugins")),
    (2, "runtime helpers", ("hybridkit.runtime", "hybridkit.weights", "hybridkit.profiling")),
    (3, "kernels", ("hybridkit.kernels",)),
    (4, "inference cache", ("hybridkit.cache",)),  # layers fill it, so it sits below them
    (5, "layers", ("hybridkit.layers",)),
    (6, "model spec", ("hybridkit.spec",)),
    (7, "model", ("hybridkit.model", "hybridkit.build", "hybridkit.generation")),
    (8, "tasks", ("hybridkit.tasks",)),
    (9, "recipe", ("hybridkit.recipe", "hybridkit.recipe_sections")),
    (
        10,
        "tools on a built model",
        (
            "hybridkit.summary",
            "hybridkit.check",
            "hybridkit.rundir",
            "hybridkit.decode_bench",
            "hybridkit.footprint",
        ),
    ),
    (11, "evaluation", ("hybridkit.eval",)),
    (12, "training", ("hybridkit.train",)),  # may use eval's metrics, never the reverse
    (13, "studies", ("hybridkit.study", "hybridkit.study_jobs", "hybridkit.study_records")),
    (14, "entry points", ("hybridkit.cli", "hybridkit.__main__", "hybridkit")),
]
"""The agreed order (see the module docstring). A prefix covers the module of that name and
everything below it (``hybridkit.kernels`` covers ``hybridkit.kernels.mamba3.ops``); the longest
matching prefix decides, so ``hybridkit`` itself only catches the package root."""


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    file: str  # relative to the repository root
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} imports {self.target}"


def all_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, at any depth, skipping ``if TYPE_CHECKING:`` bodies."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies inside (``a.b.Class`` -> ``a.b``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def edges_of(source: str, path: Path, modules: dict[str, Path], root: Path) -> Iterator[Edge]:
    """The hybridkit modules that ``source`` (in ``path``) imports, with their line numbers."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    file = str(path.relative_to(root))
    for node in _imports(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                package = source.split(".") if is_package else source.split(".")[:-1]
                base = ".".join(package[: len(package) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from pkg import sub` loads the submodule pkg.sub; `from mod import name` loads mod.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                for alias in node.names
            ]
        owners = dict.fromkeys(_owner(target, modules) for target in targets)
        for owner in owners:
            if owner is not None and owner != source:
                yield Edge(source, owner, file, node.lineno)


def import_graph(package_dir: Path = PACKAGE_DIR) -> list[Edge]:
    modules = all_modules(package_dir)
    root = package_dir.parent
    return [edge for name, path in modules.items() for edge in edges_of(name, path, modules, root)]


def level_of(module: str) -> tuple[int, str] | None:
    best: tuple[int, int, str] | None = None
    for level, name, prefixes in LEVELS:
        for prefix in prefixes:
            covers = module == prefix or module.startswith(prefix + ".")
            if covers and (best is None or len(prefix) > best[0]):
                best = (len(prefix), level, name)
    return None if best is None else (best[1], best[2])


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


# --- the rules ---------------------------------------------------------------------------------
def test_every_module_has_a_level():
    missing = [name for name in all_modules() if level_of(name) is None]
    assert not missing, f"add these modules to LEVELS in {Path(__file__).name}: {missing}"


def test_no_upward_imports():
    bad = []
    for edge in import_graph():
        src, dst = level_of(edge.source), level_of(edge.target)
        if src is not None and dst is not None and dst[0] > src[0]:
            bad.append(f"{edge} (level {src[0]} {src[1]} -> level {dst[0]} {dst[1]})")
    assert not bad, "imports must go down or sideways in LEVELS:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = import_graph()
    bad = []
    for component in cycles(edges):
        inside = set(component)
        lines = [str(e) for e in edges if e.source in inside and e.target in inside]
        bad.append(f"cycle between {', '.join(component)}:\n  " + "\n  ".join(lines))
    assert not bad, "\n".join(bad)


# --- the checker itself ------------------------------------------------------------------------
def test_checker_sees_relative_function_level_and_skips_type_checking(tmp_path):
    """The checker itself, on a throwaway package tree whose edges are known."""
    files = {
        "__init__.py": "",
        "eval/__init__.py": "",
        "eval/report.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from hybridkit.study import Study\n"
            "def f():\n"
            "    from ..train import trainer\n"
            "    from . import plots\n"
        ),
        "eval/plots.py": "import hybridkit.errors\n",
        "errors.py": "",
        "study.py": "",
        "train/__init__.py": "",
        "train/trainer.py": "from hybridkit.eval.report import f\n",
    }
    for rel, text in files.items():
        (tmp_path / "hybridkit" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "hybridkit" / rel).write_text(text)
    edges = import_graph(tmp_path / "hybridkit")
    found = {(e.source, e.target, e.line) for e in edges}
    assert found == {
        ("hybridkit.eval.report", "hybridkit.train.trainer", 5),
        ("hybridkit.eval.report", "hybridkit.eval.plots", 6),
        ("hybridkit.eval.plots", "hybridkit.errors", 1),
        ("hybridkit.train.trainer", "hybridkit.eval.report", 1),
    }
    assert str(next(e for e in edges if e.line == 5)) == (
        "hybridkit/eval/report.py:5: hybridkit.eval.report imports hybridkit.train.trainer"
    )
    assert cycles(edges) == [["hybridkit.eval.report", "hybridkit.train.trainer"]]
    assert level_of("hybridkit.eval.report")[0] < level_of("hybridkit.train.trainer")[0]
