"""The package's import graph has no cycle (issue 24: a leaf layer, no cycles dodged by in-function imports).

The graph is read from the source with ``ast`` (nothing is imported): one node per module of ``geodite_sim`` (with
``kernels/`` and ``workflows/`` mapped to ``geodite_sim.kernels`` / ``geodite_sim.workflows`` as pyproject's
``package-dir`` does), one edge per ``import`` at module level, and in the *deferred* graph per import anywhere
(in functions too; ``if TYPE_CHECKING:`` blocks excluded in both: they never run). ``from pkg import name``
points at ``pkg.name`` when that is a module, otherwise at ``pkg``. In-function imports stay where they keep
start-up fast (the CLI imports a sub-command's machinery only when it runs); none of them closes a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"geodite_sim": ROOT / "geodite_sim", "geodite_sim.kernels": ROOT / "kernels",
            "geodite_sim.workflows": ROOT / "workflows"}
def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "geodite_sim" and parts and parts[0] in ("kernels", "workflows"):
                continue
            out[".".join([package, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]):
    """Import statements that run when the module is imported (module body, if/try/with blocks)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level(node.body)
                yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def _all_imports(node: ast.AST):
    """Every import statement under ``node`` (functions included) outside ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for block in child.orelse:
                yield from _all_imports(block) if not isinstance(block, (ast.Import, ast.ImportFrom)) else [block]
        else:
            yield from _all_imports(child)


def _targets(mods: dict[str, Path], name: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        raw = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = name.split(".") if mods[name].name == "__init__.py" else name.split(".")[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        raw = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = set()
    for target in raw:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    """module -> modules it imports at module level (``deferred``: inside functions too)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = list(_all_imports(tree)) if deferred else list(_module_level(tree.body))
        graph[name] = set().union(*(_targets(mods, name, n) for n in nodes)) if nodes else set()
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                        out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_the_package():
    graph = import_graph()
    assert "geodite_sim.core.graph" in graph["geodite_sim.neighbors"]
    assert "geodite_sim.neighbors" in graph["geodite_sim.model.geodite"]
    assert "geodite_sim.core.ops" in graph["geodite_sim.kernels.nhc_chain"]
    assert not graph["geodite_sim.core.ops"] and not graph["geodite_sim.core.graph"]  # the leaf layer


def test_no_import_cycle_at_module_level():
    found = cycles(import_graph())
    assert not found, "import cycles (module-level imports): " + "; ".join(" <-> ".join(c) for c in found)


def test_deferred_graph_skips_type_checking_blocks():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
                     "def f():\n    import b\n    if TYPE_CHECKING:\n        import c\n")
    assert sorted(n.names[0].name for n in _all_imports(tree) if isinstance(n, ast.Import)) == ["b"]


def test_no_cycle_even_through_in_function_imports():
    found = cycles(import_graph(deferred=True))
    assert not found, "cycles closed by in-function imports: " + "; ".join(" <-> ".join(c) for c in found)
