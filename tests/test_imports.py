"""No import circle in runtime/, read from the source (AST), imports inside functions
included; and the core never imports the user-facing layer.

An edge A -> B is any ``import B`` / ``from B import x`` / ``from B.x import y`` in A,
at module level or inside a function (a function-level import is how a circle hides);
imports under ``if TYPE_CHECKING:`` are not edges (they never run). ``from pkg import
mod`` is an edge to the submodule. The generated runtime/protocol is a leaf.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "runtime"
GENERATED = "runtime.protocol"

# Edges in files owned elsewhere that still close a circle, each with its fix; the
# test ignores exactly these (it fails on any other circle, and on a stale entry).
PENDING: Dict[Tuple[str, str], str] = {
    ("runtime.rpc", "runtime.component"):
        "rpc.make_server imports component.raise_open_file_limit, and component imports "
        "rpc.TOKEN_ENV: move raise_open_file_limit into rpc (or a leaf module).",
}

# The user-facing layer, which the core (and the components) must never import.
USER_LAYER = {"runtime", "runtime.api", "runtime.actor", "runtime.options",
              "runtime.remote", "runtime.remote_function", "runtime.runtime_context"}
CORE_PACKAGES = ("runtime.core_worker.", "runtime.gcs.", "runtime.raylet.")


def _modules() -> Dict[str, Path]:
    mods = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        if name == GENERATED or name.startswith(GENERATED + "."):
            continue
        mods[name] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> List[ast.AST]:
    """Every import statement that can run (not under `if TYPE_CHECKING:`)."""
    out: List[ast.AST] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_one(other)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        visit(node)

    visit(tree)
    return out


def import_graph() -> Dict[str, Dict[str, int]]:
    """module -> {imported module: line of the first such import}."""
    mods = _modules()

    def resolve(name: str) -> Optional[str]:
        if name == GENERATED or name.startswith(GENERATED + "."):
            return None
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: Dict[str, Dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: List[Optional[str]] = []
            if isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.split(".")[0] == PACKAGE]
            else:
                base = node.module or ""
                if node.level:
                    parent = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = f"{parent}.{base}" if base else parent
                if base.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in mods else resolve(base))
            for target in targets:
                if target and target != mod:
                    graph[mod].setdefault(target, node.lineno)
    return graph


def _cycles(graph: Dict[str, Dict[str, int]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def _describe(graph: Dict[str, Dict[str, int]], comp: List[str]) -> str:
    lines = []
    members = set(comp)
    for mod in comp:
        for target, line in sorted(graph[mod].items()):
            if target in members:
                lines.append(f"  {mod} (line {line}) -> {target}")
    return "\n".join(lines)


def test_no_import_circle_in_runtime():
    graph = import_graph()
    for (src, dst), why in PENDING.items():
        assert dst in graph.get(src, {}), f"stale PENDING entry {src} -> {dst}: remove it ({why})"
        del graph[src][dst]
    cycles = _cycles(graph)
    assert not cycles, "import circles in runtime/:\n" + "\n\n".join(
        _describe(graph, c) for c in cycles)


def test_the_core_never_imports_the_user_facing_layer():
    graph = import_graph()
    bad = [f"{mod} (line {line}) imports {target}"
           for mod, targets in sorted(graph.items()) if mod.startswith(CORE_PACKAGES)
           for target, line in sorted(targets.items()) if target in USER_LAYER]
    assert not bad, "the core imports the user-facing layer:\n" + "\n".join(bad)


def test_the_graph_sees_imports_inside_functions():
    """The checker itself: a function-level import is an edge, a TYPE_CHECKING one is not."""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
                     "def f():\n    import b\n")
    names = [n.names[0].name for n in _imports(tree) if isinstance(n, ast.Import)]
    assert names == ["b"]
