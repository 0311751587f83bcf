"""The package's shape: its import graph, its module sizes and where the heavy frameworks load.

Read from the source with :mod:`ast` (nothing is imported), so these run in well under a second.
An import counts when it runs at import time: at module level, in a class body, in ``try``/``if``
blocks, but not inside a function (a lazy import) nor under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = "openimages_od"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

MAX_LINES = 400
# A longer module states why in its first lines, e.g. "# Over 400 lines: one schema, one reference page".
SIZE_MARKER = "# Over 400 lines:"
MARKER_WITHIN = 5

# Frameworks that take seconds and hundreds of MB to import, and where they may load at import time.
RAY = {"ray"}
TENSORFLOW = {"tensorflow", "tf_keras", "official"}
RAY_ALLOWED = {f"{PACKAGE}.pipeline.distribute"}
TENSORFLOW_ALLOWED_UNDER = f"{PACKAGE}.training"


# --------------------------------------------------------------------------- the graph


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: set[str] = field(default_factory=set)  # package modules imported at import time
    external: set[str] = field(default_factory=set)  # top-level names of other distributions
    lazy_imports: set[str] = field(default_factory=set)  # package modules imported inside functions


def _module_name(root: Path, path: Path) -> tuple[str, bool]:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module) -> tuple[list[ast.stmt], list[ast.stmt]]:
    """(imports that run at import time, imports inside functions)."""
    eager: list[ast.stmt] = []
    lazy: list[ast.stmt] = []

    def walk(body: list[ast.stmt], in_function: bool) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                (lazy if in_function else eager).append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(node.body, True)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                walk(node.orelse, in_function)  # the body runs only under a type checker
            else:
                for name in ("body", "orelse", "finalbody", "handlers", "cases"):
                    for child in getattr(node, name, []) or []:
                        if isinstance(child, ast.stmt):
                            walk([child], in_function)
                        elif hasattr(child, "body"):  # except handlers, match cases
                            walk(child.body, in_function)

    walk(tree.body, False)
    return eager, lazy


def build_graph(root: Path) -> dict[str, Module]:
    """Every module under the package ``root`` with the package modules it imports."""
    modules: dict[str, Module] = {}
    for path in sorted(root.rglob("*.py")):
        name, is_pkg = _module_name(root, path)
        modules[name] = Module(name, path, is_pkg)
    pkg = root.name

    def resolve(target: str) -> str | None:
        """``target`` or, for ``pkg.mod.attr``, the longest prefix that is a module."""
        parts = target.split(".")
        while parts:
            cand = ".".join(parts)
            if cand in modules:
                return cand
            parts.pop()
        return None

    for mod in modules.values():
        tree = ast.parse(mod.path.read_text(), str(mod.path))
        eager, lazy = _import_nodes(tree)
        for nodes, into in ((eager, mod.imports), (lazy, mod.lazy_imports)):
            for node in nodes:
                targets: list[str] = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                else:
                    assert isinstance(node, ast.ImportFrom)
                    if node.level:
                        base = mod.name.split(".")
                        if not mod.is_package:
                            base = base[:-1]
                        base = base[: len(base) - (node.level - 1)]
                        source = ".".join(base + ([node.module] if node.module else []))
                    else:
                        source = node.module or ""
                    targets = [source] + [f"{source}.{a.name}" for a in node.names]
                for t in targets:
                    top = t.split(".")[0]
                    if top != pkg:
                        if nodes is eager and top:
                            mod.external.add(top)
                        continue
                    found = resolve(t)
                    if found is not None and found != mod.name:
                        into.add(found)
    return modules


def find_cycle(modules: dict[str, Module]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for nxt in sorted(modules[name].imports):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(modules):
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None


def reachable(modules: dict[str, Module], start: str) -> dict[str, str]:
    """Modules ``start`` loads at import time, each with the module that imported it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        cur = todo.pop()
        for nxt in modules[cur].imports:
            if nxt not in seen and nxt != start:
                seen[nxt] = cur
                todo.append(nxt)
    return seen


def _chain(parents: dict[str, str], start: str, end: str) -> str:
    path = [end]
    while path[-1] != start:
        path.append(parents[path[-1]])
    return " -> ".join(reversed(path))


@pytest.fixture(scope="module")
def graph() -> dict[str, Module]:
    return build_graph(ROOT)


# --------------------------------------------------------------------------- the checker itself


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_the_graph_sees_relative_package_and_from_imports_and_finds_a_cycle(tmp_path):
    pkg = _write(
        tmp_path / "pk",
        {
            "__init__.py": "",
            "a.py": "from pk import b\n",
            "b.py": "from .sub import c\n",
            "sub/__init__.py": "",
            "sub/c.py": "import pk.sub.d as dd\n",
            "sub/d.py": "from ..a import thing\n",
            "lazy.py": "def f():\n    import pk.a\n",
            "typing_only.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pk.a\n",
        },
    )
    g = build_graph(pkg)
    assert g["pk.a"].imports == {"pk", "pk.b"}
    assert g["pk.b"].imports == {"pk.sub", "pk.sub.c"}
    assert g["pk.sub.c"].imports == {"pk.sub.d"}
    assert g["pk.sub.d"].imports == {"pk.a"}
    assert g["pk.lazy"].imports == set() and g["pk.lazy"].lazy_imports == {"pk.a"}
    assert g["pk.typing_only"].imports == set()
    assert find_cycle(g) == ["pk.a", "pk.b", "pk.sub.c", "pk.sub.d", "pk.a"]
    (pkg / "sub" / "d.py").write_text("def f():\n    from ..a import thing\n")
    assert find_cycle(build_graph(pkg)) is None


# --------------------------------------------------------------------------- the package


def test_the_package_import_graph_has_no_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _storage_modules(graph: dict[str, Module]) -> list[str]:
    # The storage layer itself (storage.py today, the storage/ package after the sources branch);
    # storage_setup is the bridge that builds a Storage from a Config, so it may import both.
    return [n for n in graph if n == f"{PACKAGE}.storage" or n.startswith(f"{PACKAGE}.storage.")]


def test_there_is_a_storage_layer(graph):
    assert _storage_modules(graph)


def test_storage_does_not_import_config(graph):
    """The storage layer takes its option objects; it knows nothing of the config schema.

    Checked at import time (through any chain of modules) and lazily (an import inside a function
    of the storage layer): either way storage would depend on config. Config may name the storage
    layer's option classes (S3Options lives with the backend it configures); that direction alone
    makes no cycle, and the cycle test above covers the rest.
    """
    config = f"{PACKAGE}.config"
    for name in _storage_modules(graph):
        parents = reachable(graph, name)
        assert config not in parents, f"{_chain(parents, name, config)} (at import time)"
        assert config not in graph[name].lazy_imports, f"{name} imports {config} inside a function"


def _long_modules() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py")) if len(p.read_text().splitlines()) > MAX_LINES]


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(ROOT))) for p in _long_modules()])
def test_a_module_over_400_lines_says_why_at_its_top(path):
    head = path.read_text().splitlines()[:MARKER_WITHIN]
    reasons = [line[len(SIZE_MARKER) :].strip() for line in head if line.startswith(SIZE_MARKER)]
    n = len(path.read_text().splitlines())
    assert reasons and reasons[0], (
        f"{path.relative_to(ROOT.parent)} has {n} lines (> {MAX_LINES}): split it by concern or state why "
        f"in its first {MARKER_WITHIN} lines as '{SIZE_MARKER} <reason>'"
    )


def test_ray_loads_at_import_time_only_in_pipeline_distribute(graph):
    bad = sorted(n for n, m in graph.items() if m.external & RAY and n not in RAY_ALLOWED)
    assert not bad, (
        f"import ray inside the function that needs it (Ray only in pipeline/distribute.py): {bad}"
    )


def test_tensorflow_loads_at_import_time_only_in_training(graph):
    """Metadata, pipeline stages, serving and the CLI start without TensorFlow (it loads lazily)."""
    heavy = {n for n, m in graph.items() if m.external & TENSORFLOW}
    outside = sorted(
        n for n in heavy if n != TENSORFLOW_ALLOWED_UNDER and not n.startswith(TENSORFLOW_ALLOWED_UNDER + ".")
    )
    assert not outside, f"TensorFlow imported at module level outside training/: {outside}"
    for name in graph:
        if name.startswith(TENSORFLOW_ALLOWED_UNDER):
            continue
        parents = reachable(graph, name)
        pulled = sorted(set(parents) & heavy)
        assert not pulled, f"{name} loads TensorFlow at import time: {_chain(parents, name, pulled[0])}"


@pytest.mark.parametrize("stage", ["openimages", "pipeline"])
def test_stage_modules_load_no_heavy_framework_at_import_time(graph, stage):
    """A stage module never imports Ray or TensorFlow unless it is the stage that needs them."""
    prefix = f"{PACKAGE}.{stage}"
    for name in (n for n in graph if n == prefix or n.startswith(prefix + ".")):
        if name in RAY_ALLOWED:
            continue
        loaded = {name, *reachable(graph, name)}
        frameworks = sorted(set().union(*(graph[m].external for m in loaded)) & (RAY | TENSORFLOW))
        assert not frameworks, f"{name} loads {frameworks} at import time"


def test_no_merge_conflict_markers_in_the_tree():
    """A merge committed half-resolved leaves these lines; nothing else in the project writes them."""
    repo = ROOT.parent
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".tpl", ".json", ".txt", ".cfg", ".sh"}
    skip = {".git", ".venv", "node_modules", "build", "oiod-demo"}
    bad = []
    for p in repo.rglob("*"):
        if p.suffix not in suffixes or not p.is_file() or skip & set(p.relative_to(repo).parts):
            continue
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "=======":
                bad.append(f"{p.relative_to(repo)}:{i}")
    assert not bad, f"merge conflict markers: {bad[:20]}"
