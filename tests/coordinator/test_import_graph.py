"""coordinator/ imports only downwards through its layers, has no import cycle and imports no
private name (`_x`) from another module (issue 13).

The layers are its subpackages (docs/coordinator.md, "Code layout"), from the top:
cli -> service -> workflows -> engine -> io, fleet -> spec; they are rows of tests/test_layering.py's
LAYERS and MAY_IMPORT, which checks them over the whole package. Here: the layout itself, and a
planted tree showing the coordinator's rows catch an upward, a sideways and a stray import.

The imports are read with ast by tests/layering.py (the whole-package check of tests/test_layering.py),
function-level (lazy) imports included: a lazy import still ties the two modules together. Imports
under `if TYPE_CHECKING:` close no cycle: they never run. The layer directions inside the coordinator
come with its folder layout (issue 13, item 6): one more row each in test_layering's tables.
"""

from __future__ import annotations

from pathlib import Path

from tests.layering import Package, check, layer_of, pyproject_package_dirs
from tests.test_layering import LAYERS, MAY_IMPORT

ROOT = "tensorfleet.coordinator"


def _report(package: Package, root: str):
    return check(package, root, {root: "coordinator"}, {})


def test_the_coordinator_has_no_import_cycle_and_no_cross_module_private_import():
    package = Package.from_dirs({name: folder for name, folder in pyproject_package_dirs().items()
                                 if name == ROOT or name.startswith(ROOT + ".")})
    assert f"{ROOT}.workflows.api" in package.modules and f"{ROOT}.io.readers.fasta" in package.modules  # really read
    report = _report(package, ROOT)
    assert report.cycles == []
    assert report.private == []


def test_the_check_finds_a_planted_cycle_and_a_planted_private_import(tmp_path: Path):
    (tmp_path / "a.py").write_text("from .b import helper\n")
    (tmp_path / "b.py").write_text("def helper():\n    from .c import _secret\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import x\n"
                                   "from . import a\n_secret = 1\n")
    (tmp_path / "d.py").write_text("from .c import _secret\nx = 1\n")
    report = _report(Package.from_dirs({"planted": tmp_path}), "planted")
    assert report.cycles == [["planted.a", "planted.b", "planted.c"]]
    assert sorted(report.private) == ["planted.b:2 imports private _secret from planted.c",
                                      "planted.d:1 imports private _secret from planted.c"]


def _coordinator_package() -> Package:
    return Package.from_dirs({name: folder for name, folder in pyproject_package_dirs().items()
                              if name == ROOT or name.startswith(ROOT + ".")})


def test_every_coordinator_module_sits_in_a_layer_folder_and_imports_only_downwards():
    package = _coordinator_package()
    layers = {layer_of(module, LAYERS) for module in package.modules}
    assert layers == {"coordinator", *(f"coordinator.{name}" for name in
                                       ("spec", "io", "fleet", "engine", "workflows", "service", "cli"))}
    # the root holds the entry points only; everything else lives in a layer's folder
    assert sorted(m for m in package.modules if layer_of(m, LAYERS) == "coordinator") == [ROOT, f"{ROOT}.__main__"]
    report = check(package, "tensorfleet", LAYERS, MAY_IMPORT)
    assert report.unlayered == [] and report.direction == []


def test_the_coordinator_rows_find_planted_upward_sideways_and_stray_imports(tmp_path: Path):
    files = {
        "__init__.py": "",
        "stray.py": "from .engine.plan import plan\n",  # a flat module at the root: only cli is allowed
        "spec/__init__.py": "def load():\n    from ..engine.plan import plan\n",  # upward, in a function
        "io/__init__.py": "",
        "io/reader.py": "import tensorfleet.coordinator.fleet.servers\n",  # sideways, absolute
        "fleet/__init__.py": "",
        "fleet/servers.py": "from typing import TYPE_CHECKING\nfrom ..spec import load\n"  # downwards: allowed
                            "if TYPE_CHECKING:\n    from ..engine import plan\n",  # type-only, still upward
        "engine/__init__.py": "",
        "engine/plan.py": "from ..io import reader\nfrom ..fleet.servers import load\nplan = 1\n",  # allowed
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    package = Package.from_dirs({ROOT: tmp_path, **{f"{ROOT}.{layer}": tmp_path / layer
                                                    for layer in ("spec", "io", "fleet", "engine")}})
    report = check(package, "tensorfleet", LAYERS, MAY_IMPORT)
    assert report.direction == [
        f"{ROOT}.fleet.servers:4 imports {ROOT}.engine.plan: layer coordinator.fleet may not import layer coordinator.engine",
        f"{ROOT}.io.reader:1 imports {ROOT}.fleet.servers: layer coordinator.io may not import layer coordinator.fleet",
        f"{ROOT}.spec:2 imports {ROOT}.engine.plan (inside a function): layer coordinator.spec may not import layer coordinator.engine",
        f"{ROOT}.stray:1 imports {ROOT}.engine.plan: layer coordinator may not import layer coordinator.engine",
    ]
    assert report.cycles == [[f"{ROOT}.engine.plan", f"{ROOT}.fleet.servers", f"{ROOT}.io.reader", f"{ROOT}.spec"]]  # the upward imports close one
