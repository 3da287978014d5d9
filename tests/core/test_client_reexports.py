"""What users import from tensorfleet.client keeps working after the shared parts moved to core."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest

import tensorfleet.client
from tensorfleet.core import errors, version


def _defined_public_names(module) -> set[str]:
    """Names a module defines at top level (classes, functions, assignments), without `_x`."""
    names: set[str] = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


@pytest.mark.parametrize("name", ["errors", "codec", "wire", "settings"])
def test_client_modules_reexport_every_public_core_name_as_the_same_object(name: str) -> None:
    core = importlib.import_module(f"tensorfleet.core.{name}")
    client = importlib.import_module(f"tensorfleet.client.{name}")
    public = _defined_public_names(core)
    assert len(public) >= 3
    assert set(client.__all__) == public
    for exported in public:
        assert getattr(client, exported) is getattr(core, exported), exported


def test_package_level_names_are_the_core_ones() -> None:
    assert tensorfleet.client.__version__ == version.__version__
    assert tensorfleet.client.InvalidArgument is errors.InvalidArgument
    assert tensorfleet.client.TensorfleetError is errors.TensorfleetError
