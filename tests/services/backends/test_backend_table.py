"""Backends are named in one lazy table (services/backends/__init__.py): no self-registration."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tensorfleet.core.errors import InvalidArgument
from tensorfleet.services import backends
from tensorfleet.services.backends import BACKENDS, backend_class, create_backend
from tensorfleet.services.backends.base import Backend, ModelContext
from tensorfleet.services.model_config import ModelConfig
from tests.serving import REPO_ROOT


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_table_entry_names_a_backend_class_in_its_module(name: str) -> None:
    """Read from the source, so the check costs no torch or TensorFlow import."""
    module, _, attribute = BACKENDS[name].partition(":")
    path = Path(backends.__file__).with_name(f"{module}.py")
    classes = {node.name: node for node in ast.parse(path.read_text()).body if isinstance(node, ast.ClassDef)}
    assert attribute in classes, f"{path} defines no class {attribute}"
    assert classes[attribute].bases, f"{attribute} derives from nothing"


def test_a_table_entry_resolves_to_its_backend_subclass() -> None:
    assert issubclass(backend_class("python"), Backend)
    assert backend_class("python").__module__ == "tensorfleet.services.backends.python_model"


def test_an_unknown_backend_is_invalid_argument_naming_the_known_ones(tmp_path) -> None:
    config = ModelConfig.model_validate({
        "name": "m", "backend": "onnx", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}],
    })
    with pytest.raises(InvalidArgument, match=r"model 'm': unknown backend 'onnx'; known: \['python'"):
        create_backend(ModelContext(config=config, model_dir=tmp_path, device="cpu"))


def test_the_table_imports_no_backend_module_until_one_is_used() -> None:
    code = textwrap.dedent("""
        import json, sys
        from tensorfleet.services.backends import backend_class
        before = sorted(sys.modules)
        backend_class("python")
        print(json.dumps([before, sorted(sys.modules)]))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    before, after = json.loads(result.stdout.strip().splitlines()[-1])
    package = "tensorfleet.services.backends."
    assert [m for m in before if m.startswith(package)] == [package + "base"]
    assert package + "python_model" in after
    assert not [m for m in after if m.split(".")[0] in ("torch", "tensorflow")]
