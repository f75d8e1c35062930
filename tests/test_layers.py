"""The package's import graph: no cycle, and no layer importing a layer above it.

Every import statement counts, wherever it stands: at module level or inside a function. Imports
under `if TYPE_CHECKING:` never run, so two modules may name each other's types there without a
cycle; they still count for the layers, so a type-only import may not reach upwards either. The
layers, lowest first, are written below; docs/architecture.md states the same order in words. A
module of the top layer (a file directly under tiermap/) may import any layer; a folder's modules
may import their own folder and the layers below it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tiermap"

# Lowest first. A name is a folder (a subpackage) or a module directly under tiermap/.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("options", "examples", "kernels"),
    ("hardware",),
    ("ir",),
    ("frontend",),
    ("costmodel",),
    ("mathopt",),
    ("bounds",),
    ("passes",),
    ("fusion",),
    ("recompute",),
    ("placement",),
    ("apply",),
)
TOP = len(LAYERS)  # the user surfaces: pipeline, report, plots, trace, decorator, cli, ...


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_only_lines(tree: ast.Module) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def _imports(path: Path, runtime_only: bool = False) -> Iterator[tuple[str, int]]:
    """(first-party module imported, line) for every import in the file; with `runtime_only`,
    leaving out those under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
    skip = _type_only_lines(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tiermap":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "tiermap":
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                yield (sub if sub in MODULES else module), node.lineno


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP  # tiermap/__init__.py: the public surface
    for rank, names in enumerate(LAYERS):
        if parts[1] in names:
            return rank
    return TOP


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _line in _imports(path, runtime_only=True):
            if target != module and target in MODULES:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_layer_named_exists() -> None:
    for names in LAYERS:
        for name in names:
            assert (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file(), name


def test_the_package_has_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_no_layer_imports_a_layer_above_it() -> None:
    wrong = []
    for module, path in MODULES.items():
        for target, line in _imports(path):
            if target in MODULES and _layer(target) > _layer(module):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert wrong == []


def test_the_checker_sees_cycles_and_upward_imports() -> None:
    """The checks above can fail: a made-up graph with a cycle, and a low module reaching up."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("tiermap.ir.plan") < _layer("tiermap.passes.verify") < _layer("tiermap.cli")


def _function_local_imports(path: Path) -> Iterator[int]:
    """Lines of first-party imports made inside a function, without a `# local import:` reason
    on the line or the line above."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source, filename=str(path))
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                first_party = any(a.name.split(".")[0] == "tiermap" for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                first_party = node.level > 0 or (node.module or "").split(".")[0] == "tiermap"
            else:
                continue
            said = " ".join(lines[max(node.lineno - 2, 0):node.lineno])
            if first_party and "# local import:" not in said:
                yield node.lineno


def test_no_first_party_import_inside_a_function_without_a_reason() -> None:
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}"
             for path in MODULES.values() for line in _function_local_imports(path)]
    assert found == []


def test_no_file_of_the_package_is_over_800_lines() -> None:
    long = {str(p.relative_to(PACKAGE.parent)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > 800}
    assert long == {}
