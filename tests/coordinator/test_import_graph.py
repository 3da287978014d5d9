"""coordinator/ has no import cycle and imports no private name (`_x`) from another module (issue 13).

The imports are read with ast, function-level (lazy) imports included: a lazy import still ties
the two modules together. Imports under `if TYPE_CHECKING:` are left out: they never run. The
layer directions come with the folder layout (issue 13, item 6).
"""

from __future__ import annotations

import ast
from pathlib import Path

from .helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "coordinator"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> modules of the package it imports, 'a imports _x from b' for private names)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    private = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        typing_only = {
            id(inner) for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for inner in ast.walk(block)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or id(node) in typing_only:
                continue
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1] if node.level > 1 else base
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("tensorfleet.coordinator"):
                target = node.module.removeprefix("tensorfleet.coordinator").lstrip(".")
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}".strip(".")
                if full in modules:
                    edges[name].add(full)
                elif target in modules:
                    edges[name].add(target)
                    if alias.name.startswith("_") and target != name:
                        private.append(f"{name} imports {alias.name} from {target}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for other in sorted(edges.get(node, ())):
            if other == node:
                continue
            if state.get(other) == "open":
                found.append([*stack[stack.index(other):], other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_the_coordinator_has_no_import_cycle_and_no_cross_module_private_import():
    edges, private = import_graph(PACKAGE)
    assert "engine" in edges and "job" in edges["engine"]  # the graph is really read
    assert cycles(edges) == []
    assert private == []


def test_the_check_finds_a_planted_cycle_and_a_planted_private_import(tmp_path):
    (tmp_path / "a.py").write_text("from .b import helper\n")
    (tmp_path / "b.py").write_text("def helper():\n    from .c import _secret\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import x\n"
                                   "from . import a\n_secret = 1\n")
    (tmp_path / "d.py").write_text("from .c import _secret\nx = 1\n")
    edges, private = import_graph(tmp_path)
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert sorted(private) == ["b imports _secret from c", "d imports _secret from c"]
