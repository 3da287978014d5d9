"""Read every module's imports with `ast` and check them against the package's layers.

What it finds, for the whole `tensorfleet` package (or a planted tree in a test):
- an import against the layer direction (e.g. core importing client, coordinator importing services);
- an import cycle, counting imports inside functions as well as module-level ones (not those
  under `if TYPE_CHECKING:`, which never run; they still follow the direction);
- a private name (`_x`) imported from, or read off, another of our modules;
- a folder of modules that pyproject.toml does not list as a package.

Layers are matched by the longest module-name prefix in the layer table, so a finer layer (a
coordinator subfolder) is one more row in the table and one more entry in the allowed imports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Import:
    """One import statement's target, as the importing module sees it."""

    source: str  # importing module
    target: str  # imported module (ours), or the package a name was imported from
    line: int
    nested: bool  # inside a function or class body, not at module level
    names: tuple[str, ...] = ()  # `from target import names`
    type_only: bool = False  # under `if TYPE_CHECKING:`: never runs, so it closes no cycle


@dataclass
class Package:
    """Module name -> source file, for every module of one import namespace."""

    modules: dict[str, Path] = field(default_factory=dict)
    packages: set[str] = field(default_factory=set)  # names that are packages (have __init__.py)

    @classmethod
    def from_dirs(cls, package_dirs: Mapping[str, Path]) -> Package:
        """Modules under each listed package folder (not recursing into sub-folders: those must
        be listed themselves, as setuptools needs them to be)."""
        package = cls()
        for name, folder in package_dirs.items():
            package.packages.add(name)
            for path in sorted(folder.glob("*.py")):
                module = name if path.stem == "__init__" else f"{name}.{path.stem}"
                package.modules[module] = path
        return package

    def is_ours(self, module: str, root: str) -> bool:
        return module == root or module.startswith(root + ".")


def pyproject_package_dirs(pyproject: Path = REPO_ROOT / "pyproject.toml") -> dict[str, Path]:
    """[tool.setuptools] packages and their package-dir folders, as installed."""
    tool = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    dirs = tool["package-dir"]
    missing = sorted(set(tool["packages"]) - set(dirs))
    assert not missing, f"pyproject.toml lists packages without a package-dir entry: {missing}"
    return {name: pyproject.parent / dirs[name] for name in tool["packages"]}


def unlisted_module_folders(package_dirs: Mapping[str, Path]) -> list[Path]:
    """Folders of .py files under a listed package folder that are not listed themselves."""
    listed = {folder.resolve() for folder in package_dirs.values()}
    unlisted = set()
    for folder in listed:
        for path in folder.rglob("*.py"):
            parent = path.parent.resolve()
            if parent not in listed and "__pycache__" not in parent.parts:
                unlisted.add(parent)
    return sorted(unlisted)


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


def imports_of(module: str, path: Path, package: Package, root: str) -> Iterator[Import]:
    """Every import of one of our modules in `path`, module-level and nested."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nested_nodes: set[int] = set()
    type_only_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            nested_nodes |= {id(child) for child in ast.walk(node) if child is not node}
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            type_only_nodes |= {id(child) for statement in node.body for child in ast.walk(statement)}
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        nested = id(node) in nested_nodes
        type_only = id(node) in type_only_nodes
        if isinstance(node, ast.Import):
            for alias in node.names:
                if package.is_ours(alias.name, root):
                    yield Import(module, alias.name, node.lineno, nested, type_only=type_only)
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                    else node.module or "")
            if not package.is_ours(base, root):
                continue
            plain: list[str] = []
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in package.modules:  # `from package import module`
                    yield Import(module, submodule, node.lineno, nested, type_only=type_only)
                else:
                    plain.append(alias.name)
            if plain:
                yield Import(module, base, node.lineno, nested, tuple(plain), type_only)


def _is_type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_aliases(path: Path, module: str, package: Package, root: str) -> dict[str, str]:
    """Local name -> our module, for names bound by `import x.y as z` or `from x import module`."""
    aliases: dict[str, str] = {}
    for item in imports_of(module, path, package, root):
        if item.names:
            continue
        aliases[item.target.rsplit(".", 1)[-1]] = item.target
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and package.is_ours(alias.name, root):
                    aliases[alias.asname] = alias.name
    return aliases


def layer_of(module: str, layers: Mapping[str, str]) -> str | None:
    """The layer of the longest prefix of `module` in the table."""
    best = None
    for prefix in layers:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return layers[best] if best is not None else None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass
class Report:
    direction: list[str] = field(default_factory=list)
    cycles: list[list[str]] = field(default_factory=list)
    #: Cycles closed only by imports under `if TYPE_CHECKING:` (two modules that know each other's
    #: types: one of them should depend on a protocol instead).
    type_cycles: list[list[str]] = field(default_factory=list)
    private: list[str] = field(default_factory=list)
    unlayered: list[str] = field(default_factory=list)


def check(
    package: Package,
    root: str,
    layers: Mapping[str, str],
    may_import: Mapping[str, set[str]],
) -> Report:
    """Direction, cycles and private names over every module of `package`."""
    report = Report()
    graph: dict[str, set[str]] = {module: set() for module in package.modules}
    typed: dict[str, set[str]] = {module: set() for module in package.modules}  # with type-only imports
    for module, path in sorted(package.modules.items()):
        source_layer = layer_of(module, layers)
        if source_layer is None:
            report.unlayered.append(module)
            continue
        for item in imports_of(module, path, package, root):
            target_layer = layer_of(item.target, layers)
            where = f"{module}:{item.line} imports {item.target}" + (" (inside a function)" if item.nested else "")
            if target_layer is None:
                report.unlayered.append(item.target)
            elif target_layer != source_layer and target_layer not in may_import.get(source_layer, set()):
                report.direction.append(f"{where}: layer {source_layer} may not import layer {target_layer}")
            if item.target in graph and item.target != module:
                typed[module].add(item.target)
                if not item.type_only:
                    graph[module].add(item.target)
            for name in item.names:
                if _private(name):
                    report.private.append(f"{module}:{item.line} imports private {name} from {item.target}")
            if any(_private(part) for part in item.target.split(".")):
                report.private.append(f"{where}: a private module")
        report.private.extend(_private_attributes(module, path, package, root))
    report.cycles = _cycles(graph)
    runtime = {frozenset(cycle) for cycle in report.cycles}
    report.type_cycles = [cycle for cycle in _cycles(typed) if frozenset(cycle) not in runtime]
    return report


def _private_attributes(module: str, path: Path, package: Package, root: str) -> Iterator[str]:
    """`other_module._name` reads, where other_module is one of ours bound by an import."""
    aliases = module_aliases(path, module, package, root)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
            target = aliases.get(node.value.id)
            if target and target != module:
                yield f"{module}:{node.lineno} reads private {target}.{node.attr}"


def _cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
    return found
