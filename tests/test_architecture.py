"""The shape of the package (ARCHITECTURE.md): no import cycle between its modules, the engine
never imports the app, no module over 500 lines, a thin cli.py, every module on the map. Read
from the source with ast: nothing is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dsvl2_cli"
MAX_LINES = 500


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in the file: at the top, inside a
    function (a lazy import still ties the two) or under TYPE_CHECKING. `from .x import name`
    counts as importing x, or x.name where that is a module. Importing a submodule runs its
    parent packages' __init__ too: an edge to each of those that is not a parent of the importer
    (engine/generate/__init__ re-exports its modules: vlmodel importing generate.cache made a cycle)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        base = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                package = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]) if node.level \
                    else node.module or ""
                package = package.rstrip(".")
                targets = [f"{package}.{alias.name}" if f"{package}.{alias.name}" in modules else package
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import dsvl2_cli.x.y` of a name in x.y
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
                parent = target.rpartition(".")[0]
                while parent:
                    if parent in modules and not name.startswith(parent + "."):
                        graph[name].add(parent)
                    parent = parent.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "dsvl2_cli.engine.loading.fit" in graph["dsvl2_cli.engine.runtime"]  # `from . import fit`
    assert "dsvl2_cli.engine.runtime" in graph["dsvl2_cli.app.terminal.cli"]  # inside a function
    assert "dsvl2_cli.settings" in graph["dsvl2_cli.engine.loading.hub"]  # `from .. import settings`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_engine_never_imports_the_app():
    graph = import_graph()
    up = {m: sorted(t for t in targets if t.startswith(("dsvl2_cli.app", "dsvl2_cli.dev")))
          for m, targets in graph.items() if m.startswith(("dsvl2_cli.engine", "dsvl2_cli.model"))}
    assert {m: t for m, t in up.items() if t} == {}


def test_no_module_over_500_lines():
    long = {str(path.relative_to(PACKAGE.parent)): n for path, _ in _modules().values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_cli_stays_thin():
    assert len((PACKAGE / "app/terminal/cli.py").read_text(encoding="utf-8").splitlines()) < 400


def test_every_module_is_on_the_map():
    """ARCHITECTURE.md's tree names every module (a file name, or several on one line)."""
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    tree = text.split("```", 2)[1]
    named = set(re.findall(r"[\w]+\.py", tree))
    missing = sorted(str(path.relative_to(PACKAGE.parent)) for path, _ in _modules().values()
                     if path.name not in named and path.name != "__init__.py")
    assert missing == []
