"""The import graph of core/, worker/ and app/, read from the source files with `ast` (nothing is imported).

The layers (docs/architecture.md): app → worker.api → the rest of worker → core, nothing upward and no cycles. Every
import counts, also one inside a function (a lazy import still ties the two modules together); relative imports are
resolved. An edge goes to the most specific module the statement names (`from worker import keys` → `worker.keys`,
`from worker.sweeps import advance` → `worker.sweeps`); the parent packages Python runs on the way are not edges
(they would make every package that re-exports its own modules look like a cycle). Each rule has a self-check on a
tiny synthetic graph or tree, so a rule that could never fail is noticed.
"""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "worker", "app")
MAX_LINES = 500
"""No module of core/ or worker/ is longer (issue 19: one idea per module)."""

APP_MAY_IMPORT = frozenset({"worker.api"})
"""The only modules of the worker package the dashboard imports: the door re-exports what the pages need."""

Graph = dict[str, set[str]]


# ------------------------------------------------------------------------------------------------------ the graph
def module_name(path: Path, root: Path) -> str:
    """`core/data/fast.py` → `core.data.fast`; a package's `__init__.py` → the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Every module of `packages` under `root`, by name."""
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def known_module(name: str, known: set[str] | dict[str, Path]) -> str | None:
    """The longest prefix of the dotted `name` that is one of the `known` modules (None: outside them)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def imports_of(tree: ast.AST, module: str, is_package: bool, known: set[str] | dict[str, Path]) -> set[str]:
    """The `known` modules the import statements anywhere in `tree` name, relative ones resolved: `from X import y`
    is `X.y` when that is a module, else `X`."""
    targets: set[str | None] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(known_module(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else known_module(base, known))
    targets.discard(None)
    targets.discard(module)
    return {t for t in targets if t is not None}


def build_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> Graph:
    """Module → the modules of `packages` it imports."""
    files = source_files(root, packages)
    graph: Graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[module] = imports_of(tree, module, path.name == "__init__.py", files)
    return graph


# ------------------------------------------------------------------------------------------------------- the rules
def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None when there is none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return None


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def upward_imports(graph: Graph, layer: str, forbidden: tuple[str, ...]) -> list[str]:
    """`importer -> imported` for every import from `layer` into one of the `forbidden` packages."""
    return sorted(f"{src} -> {dst}" for src, dsts in graph.items() if within(src, layer)
                  for dst in dsts if any(within(dst, f) for f in forbidden))


def app_worker_imports(graph: Graph, allowed: frozenset[str] = APP_MAY_IMPORT) -> list[str]:
    """`importer -> imported` for every import from app/ into the worker package other than `allowed`."""
    return sorted(f"{src} -> {dst}" for src, dsts in graph.items() if within(src, "app")
                  for dst in dsts if within(dst, "worker") and dst not in allowed)


DOOR_CLIENTS = frozenset({"worker.__main__"})
"""Modules of the worker package that are clients of the door, as the dashboard is: the CLI."""


def door_importers(graph: Graph, door: str = "worker.api", clients: frozenset[str] = DOOR_CLIENTS) -> list[str]:
    """Modules of the worker package other than its `clients` that import the `door` (it imports inward only)."""
    return sorted(src for src, dsts in graph.items()
                  if within(src, "worker") and src != door and src not in clients and door in dsts)


def long_modules(root: Path = ROOT, packages: tuple[str, ...] = ("core", "worker"),
                 limit: int = MAX_LINES) -> list[str]:
    """`module (lines)` for every module longer than `limit` lines."""
    out = []
    for module, path in source_files(root, packages).items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            out.append(f"{module} ({lines} lines)")
    return out


# ----------------------------------------------------------------------------------------------- the real source
@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph()


def test_the_graph_sees_the_whole_source(graph: Graph) -> None:
    assert {"core.train", "worker.api", "worker.sweeps", "app.ui"} <= set(graph)
    assert "worker.keys" in graph["worker.api"]


def test_no_import_cycle(graph: Graph) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_core_imports_neither_worker_nor_app(graph: Graph) -> None:
    assert upward_imports(graph, "core", ("worker", "app")) == []


def test_worker_never_imports_app(graph: Graph) -> None:
    assert upward_imports(graph, "worker", ("app",)) == []


def test_app_imports_only_the_door_of_the_worker_package(graph: Graph) -> None:
    assert app_worker_imports(graph) == []


def test_inner_worker_modules_never_import_the_door(graph: Graph) -> None:
    assert door_importers(graph) == []


def test_no_module_over_500_lines() -> None:
    assert long_modules() == []


# ------------------------------------------------------------------------- self-checks: each rule can fail
def test_self_check_find_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycle is not None and set(cycle) == {"a", "b", "c"} and cycle[0] == cycle[-1]


def test_self_check_layer_rules() -> None:
    graph = {"core.x": {"worker.y"}, "core.z": {"core.x"}, "worker.y": {"core.x", "app.p"},
             "app.p": {"worker.api", "worker.keys", "core.x"}, "worker.api": {"worker.y"}}
    assert upward_imports(graph, "core", ("worker", "app")) == ["core.x -> worker.y"]
    assert upward_imports(graph, "worker", ("app",)) == ["worker.y -> app.p"]
    assert app_worker_imports(graph) == ["app.p -> worker.keys"]
    assert door_importers({**graph, "worker.__main__": {"worker.api"}}) == []
    assert door_importers({**graph, "worker.z": {"worker.api"}}) == ["worker.z"]
    assert within("worker", "worker") and not within("workers.x", "worker")


def test_self_check_parser_and_long_modules(tmp_path: Path) -> None:
    """Relative imports, imports inside functions, `from pkg import module` and `import a.b` all become edges; a
    name imported from a module is an edge to that module; the line limit is counted per file."""
    files = {
        "core/__init__.py": "",
        "core/a.py": "from .b import thing\n",
        "core/b.py": "def f():\n    from worker import api\n",
        "worker/__init__.py": "",
        "worker/api.py": "import core.a\nfrom . import keys\nfrom .sub import mod\n",
        "worker/keys.py": "x = 1\n" * 6,
        "worker/sub/__init__.py": "from .mod import name\n",
        "worker/sub/mod.py": "from ..keys import x\nfrom .. import api\n",
        "app/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = build_graph(tmp_path)
    assert graph["core.a"] == {"core.b"}
    assert graph["core.b"] == {"worker.api"}
    assert graph["worker.api"] == {"core.a", "worker.keys", "worker.sub.mod"}
    assert graph["worker.sub"] == {"worker.sub.mod"}
    assert graph["worker.sub.mod"] == {"worker.keys", "worker.api"}
    assert find_cycle(graph) is not None
    assert upward_imports(graph, "core", ("worker", "app")) == ["core.b -> worker.api"]
    assert long_modules(tmp_path, limit=5) == ["worker.keys (6 lines)"]
    assert long_modules(tmp_path, limit=6) == []
