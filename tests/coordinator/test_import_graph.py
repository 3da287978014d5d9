"""coordinator/ has no import cycle and imports no private name (`_x`) from another module (issue 13).

The imports are read with ast by tests/layering.py (the whole-package check of tests/test_layering.py),
function-level (lazy) imports included: a lazy import still ties the two modules together. Imports
under `if TYPE_CHECKING:` close no cycle: they never run. The layer directions inside the coordinator
come with its folder layout (issue 13, item 6): one more row each in test_layering's tables.
"""

from __future__ import annotations

from pathlib import Path

from tests.layering import Package, check, pyproject_package_dirs

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
