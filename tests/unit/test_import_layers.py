"""The engine's import layers, read from the source (nothing is imported).

Every `import` and `from ... import` in src/meshgate counts: at the top of a
module, inside a function, and under `if TYPE_CHECKING:` (a type-only import
is still an edge that a refactoring turns into a real one). The rules:

- no import circles: no strongly connected component of the module graph
  has more than one module, and no module imports itself;
- no circles between meshgate's top-level parts either (`config`, `http`,
  `upstream`, `protocol`... each taken as one node);
- the config layer (`meshgate.config.*`) imports only itself, never the
  engine above it (protocol, filters, handlers, upstream, transform, http,
  auth, ratelimit, server, admin, observability, mesh, engine...).
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = "meshgate"
CONFIG = "meshgate.config"


class Edge:
    """One import of `target` by `source`, at `file:line`."""

    def __init__(self, source: str, target: str, file: Path, line: int) -> None:
        self.source, self.target, self.file, self.line = source, target, file, line

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.file.relative_to(SRC)}:{self.line})"


def _modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the package (a folder
    without __init__.py is a namespace package and has no module of its own)."""
    out: dict[str, Path] = {}
    for file in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(file.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = file
    return out


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _imported(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]
) -> Iterator[str]:
    """The modules an import statement runs, relative ones resolved: those
    it names, and the packages above them (`import a.b.c` runs a and a.b
    first) except the ones holding `module`, which have run before it."""
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            anchor = package[: len(package) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
        # `from pkg import name` reads pkg; `from pkg import sub` only runs sub.
        named = [*subs, base] if len(subs) < len(node.names) else subs
    for name in named:
        parts = name.split(".")
        for n in range(1, len(parts)):
            above = ".".join(parts[:n])
            if not _within(module, above):
                yield above
        yield name


def _graph() -> tuple[dict[str, Path], list[Edge]]:
    modules = _modules()
    edges: list[Edge] = []
    for module, file in modules.items():
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        is_package = file.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets = dict.fromkeys(_imported(node, module, is_package, modules))
                edges += (Edge(module, t, file, node.lineno) for t in targets if t in modules)
    return modules, edges


def _components(nodes: list[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(sorted(component))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def _cycle(component: list[str], succ: dict[str, list[str]]) -> list[str]:
    """One shortest circle through the component's first node, as the nodes
    it passes (the first one again at the end)."""
    members = set(component)
    start = component[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for v in frontier:
            for w in succ.get(v, ()):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in prev:
                    prev[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no circle found in {component}")


def _circles(edges: list[Edge], node: Callable[[str], str | None]) -> list[str]:
    """What is wrong, one entry per circle of the graph whose nodes `node`
    gives for each module (None: left out)."""
    succ: dict[str, list[str]] = {}
    example: dict[tuple[str, str], Edge] = {}
    for e in edges:
        a, b = node(e.source), node(e.target)
        if a is not None and b is not None and (a, b) not in example:
            example[(a, b)] = e
            succ.setdefault(a, []).append(b)
    report = [f"{a} imports itself: {e}" for (a, b), e in example.items() if a == b]
    for component in _components(sorted(succ), succ):
        if len(component) == 1:
            continue
        members = set(component)
        circle = "\n    ".join(
            str(example[hop]) for hop in itertools.pairwise(_cycle(component, succ))
        )
        inside = "\n    ".join(
            str(e) for (a, b), e in example.items() if a != b and a in members and b in members
        )
        report.append(
            f"{len(component)} import each other: {', '.join(component)}\n"
            f"  for example:\n    {circle}\n  the imports among them (one per pair):\n    {inside}"
        )
    return report


def _part(module: str) -> str | None:
    """`meshgate.upstream.pool` -> `meshgate.upstream`; None for the root."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else None


def test_the_graph_is_read() -> None:
    modules, edges = _graph()
    assert "meshgate.config.schema" in modules
    assert "meshgate.mesh.control.server" in modules  # a namespace package's module
    pairs = {(e.source, e.target) for e in edges}
    assert ("meshgate.cli", "meshgate.config.loader") in pairs
    assert ("meshgate.protocol.h1", "meshgate.engine.runtime") in pairs  # TYPE_CHECKING
    assert ("meshgate.demo", "meshgate.demo.mesh") in pairs  # inside a function


def test_no_module_import_circles() -> None:
    _, edges = _graph()
    report = _circles(edges, lambda module: module)
    if report:
        pytest.fail("import circles in src/meshgate:\n" + "\n".join(report), pytrace=False)


def test_no_circles_between_the_top_level_parts() -> None:
    _, edges = _graph()
    report = [r for r in _circles(edges, _part) if "imports itself" not in r]
    if report:
        pytest.fail(
            "circles between meshgate's top-level parts:\n" + "\n".join(report), pytrace=False
        )


def test_config_imports_only_config() -> None:
    _, edges = _graph()
    bad = [
        e
        for e in edges
        if _within(e.source, CONFIG) and e.target != ROOT and not _within(e.target, CONFIG)
    ]
    # Each import once: `meshgate.http.router`, not also the `meshgate.http` it runs.
    wrong = [
        str(e)
        for e in bad
        if not any(
            (o.source, o.line) == (e.source, e.line) and o.target.startswith(e.target + ".")
            for o in bad
        )
    ]
    if wrong:
        pytest.fail(
            "meshgate.config imports the engine above it:\n  " + "\n  ".join(wrong),
            pytrace=False,
        )
