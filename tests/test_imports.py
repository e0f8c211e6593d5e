"""No import cycles inside the package: every module's imports, read with ``ast`` (nothing is imported).

An edge A -> B means executing module A may execute module B: ``import autocompress.x.y`` and
``from autocompress.x import y`` (``y`` a submodule) are edges to ``autocompress.x.y``; ``from
autocompress.x import name`` (``name`` not a submodule) is an edge to the package ``autocompress.x``,
whose ``__init__`` runs. Relative forms (``from . import x``, ``from ..a import b``) resolve the same
way. Imports inside functions count (they run when the function is first called, often in the middle
of another import), imports under ``if TYPE_CHECKING:`` do not (they never run).

The packages on the way to a target run too (``import autocompress.search.x`` executes
``autocompress/search/__init__.py`` first): that is an edge as well, except to the importer's own
enclosing packages, which Python has already started before the importer itself.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = "autocompress"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int  # where in the source module the import statement is
    implicit: bool  # a package run on the way to the imported module, not the named target
    lazy: bool = False  # the import is inside a function: it runs when that is first called


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``package`` under ``root``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """(node, inside a function) for every Import / ImportFrom that can run: at any depth, but not in
    an ``if TYPE_CHECKING:`` body."""
    stack = [(tree, False)]
    while stack:
        node, lazy = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend((child, lazy) for child in node.orelse)  # the else branch does run
            continue
        lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, lazy) for child in ast.iter_child_nodes(node))


def _existing(name: str, modules: dict[str, Path]) -> str | None:
    """``name``, or its longest prefix that is a module of the package (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_edges(name: str, path: Path, modules: dict[str, Path], package: str = PACKAGE) -> list[Edge]:
    """The intra-package import edges of one module (see the module docstring for what counts)."""
    is_package = path.name == "__init__.py"
    own_package = name if is_package else name.rpartition(".")[0]
    started = {*_ancestors(name), name}  # already executing (or done) by the time this module runs
    tree = ast.parse(path.read_text(), filename=str(path))
    edges: list[Edge] = []

    def add(target: str | None, node: ast.stmt, lazy: bool) -> None:
        if target is None:
            return
        if target != name:
            edges.append(Edge(name, target, node.lineno, implicit=False, lazy=lazy))
        for parent in _ancestors(target):
            if parent not in started and parent in modules:
                edges.append(Edge(name, parent, node.lineno, implicit=True, lazy=lazy))

    for node, lazy in _imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    add(_existing(alias.name, modules), node, lazy)
            continue
        if node.level:
            base_parts = own_package.split(".")
            if node.level > 1:
                base_parts = base_parts[: -(node.level - 1)]
            base = ".".join([*base_parts, node.module] if node.module else base_parts)
        else:
            base = node.module or ""
        if not (base == package or base.startswith(package + ".")):
            continue
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            add(submodule if submodule in modules else _existing(base, modules), node, lazy)
    return edges


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, list[Edge]]:
    modules = module_files(root, package)
    return {name: module_edges(name, path, modules, package) for name, path in modules.items()}


def strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each as a sorted list of module names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted({e.target for e in graph[start]})))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted({e.target for e in graph.get(target, [])}))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _shortest_path(graph: dict[str, list[Edge]], start: str, goal: str, within: set[str]) -> list[Edge]:
    """The fewest edges from ``start`` to ``goal`` that stay inside ``within`` (breadth first)."""
    came: dict[str, Edge | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for edge in sorted(graph[node], key=lambda e: (e.target, e.line)):
            if edge.target in within and edge.target not in came:
                came[edge.target] = edge
                queue.append(edge.target)
    path = []
    node = goal
    while came[node] is not None:
        path.append(came[node])
        node = came[node].source
    return path[::-1]


def find_cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """Cycles that between them use every edge inside every import cycle: each an edge list that
    ends where it starts (an edge u -> v, then the shortest way back from v to u)."""
    cycles: list[list[Edge]] = []
    for component in strongly_connected(graph):
        members = set(component)
        inner = sorted(
            (e for m in component for e in graph[m] if e.target in members),
            key=lambda e: (e.source, e.target, e.line),
        )
        if len(component) == 1 and not inner:
            continue
        covered: set[tuple[str, str]] = set()
        for edge in inner:
            if (edge.source, edge.target) in covered:
                continue
            cycle = [edge, *_shortest_path(graph, edge.target, edge.source, members)]
            covered.update((e.source, e.target) for e in cycle)
            cycles.append(cycle)
    return cycles


def describe(cycle: list[Edge], modules: dict[str, Path], root: Path) -> str:
    chain = " -> ".join([cycle[0].source, *(e.target for e in cycle)])
    steps = [
        f"    {modules[e.source].relative_to(root)}:{e.line} imports {e.target}"
        + (" (its __init__ runs on the way)" if e.implicit else "")
        + (" [inside a function]" if e.lazy else "")
        for e in cycle
    ]
    return "\n".join([chain, *steps])


def test_the_package_has_no_import_cycles():
    modules = module_files(ROOT, PACKAGE)
    graph = import_graph(ROOT)
    assert len(graph) > 20 and sum(map(len, graph.values())) > 50  # the walk found the package
    cycles = find_cycles(graph)
    groups = [c for c in strongly_connected(graph) if len(c) > 1 or any(e.target == c[0] for e in graph[c[0]])]
    summary = [f"  {len(g)} modules that import each other: {', '.join(g)}" for g in groups]
    report = "\n".join([*summary, *(describe(c, modules, ROOT) for c in cycles)])
    assert not cycles, f"{len(cycles)} import cycle(s) in {len(groups)} group(s) in {PACKAGE}:\n{report}"


# The walker itself, on a made-up package: every import form resolves to the module it runs.

FAKE = {
    "pkg/__init__.py": "from pkg.a import thing\n",
    "pkg/a.py": "thing = 1\nimport pkg.sub.c as c\n",
    "pkg/b.py": "from . import a\nfrom .a import thing\nfrom pkg import thing as t\nimport os\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/c.py": (
        "from typing import TYPE_CHECKING\n"
        "from .. import b\n"
        "if TYPE_CHECKING:\n    import pkg.a\n"
        "def late():\n    from pkg.sub import d\n    from ..b import name\n"
    ),
    "pkg/sub/d.py": "import pkg.sub.c\nfrom pkg.sub import c\n",
}


@pytest.fixture
def fake(tmp_path):
    for rel, text in FAKE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def _targets(graph, name):
    return sorted({(e.target, e.implicit) for e in graph[name]})


def test_every_import_form_is_an_edge_to_the_module_it_runs(fake):
    graph = import_graph(fake, "pkg")
    assert set(graph) == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d"}
    assert _targets(graph, "pkg") == [("pkg.a", False)]
    # `import pkg.sub.c as c` runs pkg/sub/__init__.py on the way
    assert _targets(graph, "pkg.a") == [("pkg.sub", True), ("pkg.sub.c", False)]
    # `from . import a` and `from .a import thing` -> pkg.a; `from pkg import thing` -> the package
    assert _targets(graph, "pkg.b") == [("pkg", False), ("pkg.a", False)]
    # `from .. import b`, and inside a function `from pkg.sub import d`, `from ..b import name`;
    # not the TYPE_CHECKING import
    assert _targets(graph, "pkg.sub.c") == [("pkg.b", False), ("pkg.sub.d", False)]
    # its own package pkg.sub has started already: no edge to it
    assert _targets(graph, "pkg.sub.d") == [("pkg.sub.c", False)]


def test_cycles_are_reported_as_module_chains_with_their_lines(fake):
    graph = import_graph(fake, "pkg")
    modules = module_files(fake, "pkg")
    chains = [describe(c, modules, fake).splitlines()[0] for c in find_cycles(graph)]
    # pkg -> pkg.a -> pkg.sub.c -> pkg.b -> pkg (b reads `thing` from the package), and c <-> d
    assert "pkg.sub.c -> pkg.sub.d -> pkg.sub.c" in chains
    assert any(chain.startswith("pkg -> pkg.a -> pkg.sub.c -> pkg.b -> pkg") for chain in chains)
    text = "\n".join(describe(c, modules, fake) for c in find_cycles(graph))
    assert "    pkg/__init__.py:1 imports pkg.a\n" in text
    assert "    pkg/sub/c.py:6 imports pkg.sub.d [inside a function]\n" in text
    (fake / "pkg/sub/d.py").write_text("")
    (fake / "pkg/b.py").write_text("import os\n")
    assert find_cycles(import_graph(fake, "pkg")) == []
