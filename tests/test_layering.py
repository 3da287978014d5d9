"""The package's import rules, checked over every module (tests/layering.py reads the imports).

    protos <- core <- client <- coordinator        services <- core, protos only

services and coordinator never import each other (the CLI starts servers as processes:
`python -m tensorfleet.services`), and services do not import the client SDK. No import
cycles, counting imports inside functions. No private name imported across modules.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from tests.layering import (
    Package,
    check,
    imports_of,
    pyproject_package_dirs,
    unlisted_module_folders,
)

ROOT = "tensorfleet"

#: module-name prefix -> layer; the longest prefix wins. A finer layer (e.g. the coordinator's
#: "tensorfleet.coordinator.engine") is one more row here and one more entry in MAY_IMPORT.
LAYERS: dict[str, str] = {
    "tensorfleet.protos": "protos",
    "tensorfleet.core": "core",
    "tensorfleet.client": "client",
    "tensorfleet.services": "services",
    "tensorfleet.coordinator": "coordinator",  # its root: __init__ and __main__ only
    # the coordinator's own layers (docs/coordinator.md, "Code layout"), from the bottom
    **{f"tensorfleet.coordinator.{layer}": f"coordinator.{layer}" for layer in
       ("spec", "io", "fleet", "engine", "workflows", "service", "cli")},
}

#: layer -> the other layers it may import (its own is always allowed).
MAY_IMPORT: dict[str, set[str]] = {
    "protos": set(),
    "core": {"protos"},
    "client": {"protos", "core"},
    "services": {"protos", "core"},
    "coordinator": {"protos", "core", "client", "coordinator.cli"},  # __main__ runs the CLI
    # inside the coordinator: cli -> service -> workflows -> engine -> io, fleet -> spec
    # (a layer imports the ones below it; io and fleet sit side by side and not each other)
    "coordinator.spec": {"protos", "core", "client"},
    "coordinator.io": {"protos", "core", "client", "coordinator.spec"},
    "coordinator.fleet": {"protos", "core", "client", "coordinator.spec"},
    "coordinator.engine": {"protos", "core", "client", "coordinator.spec", "coordinator.io", "coordinator.fleet"},
    "coordinator.workflows": {"protos", "core", "client", "coordinator.spec", "coordinator.io",
                              "coordinator.fleet", "coordinator.engine"},
    "coordinator.service": {"protos", "core", "client", "coordinator.spec", "coordinator.io",
                            "coordinator.fleet", "coordinator.engine", "coordinator.workflows"},
    "coordinator.cli": {"protos", "core", "client", "coordinator.spec", "coordinator.io", "coordinator.fleet",
                        "coordinator.engine", "coordinator.workflows", "coordinator.service"},
}

#: Private names imported across modules and import cycles that exist today, each owned by an
#: open issue. Fix one and delete its entry: the test fails while a listed one is gone, so these
#: lists only shrink.
KNOWN_PRIVATE: set[str] = set()
KNOWN_CYCLES: set[frozenset[str]] = set()


@pytest.fixture(scope="module")
def report():
    dirs = pyproject_package_dirs()
    return check(Package.from_dirs(dirs), ROOT, LAYERS, MAY_IMPORT)


def test_every_module_folder_is_a_listed_package() -> None:
    assert unlisted_module_folders(pyproject_package_dirs()) == []


def test_every_module_has_a_layer(report) -> None:
    assert report.unlayered == []


def test_imports_follow_the_layer_direction(report) -> None:
    assert report.direction == []


def test_no_import_cycles(report) -> None:
    found = {frozenset(cycle) for cycle in report.cycles}
    assert [sorted(c) for c in found - KNOWN_CYCLES] == [], "new import cycles (or a known one grew)"
    assert [sorted(c) for c in KNOWN_CYCLES - found] == [], "fixed or shrunk: update KNOWN_CYCLES"


def test_no_type_only_cycles(report) -> None:
    """Imports under TYPE_CHECKING never run, but two modules that name each other's types are
    still one unit: one of them should depend on a small protocol instead."""
    assert report.type_cycles == []


def test_no_private_names_cross_modules(report) -> None:
    found = {re.sub(r":\d+ ", " ", line, count=1) for line in report.private}  # without line numbers
    assert found - KNOWN_PRIVATE == set(), "new private imports"
    assert KNOWN_PRIVATE - found == set(), "fixed: delete these from KNOWN_PRIVATE"


def test_services_and_coordinator_share_only_core_and_protos() -> None:
    package = Package.from_dirs(pyproject_package_dirs())

    def imported_by(prefix: str) -> set[str]:
        return {item.target for module, path in package.modules.items() if module.startswith(prefix)
                for item in imports_of(module, path, package, ROOT)}

    shared = imported_by("tensorfleet.services") & imported_by("tensorfleet.coordinator")
    assert "tensorfleet.core.errors" in shared  # the check is not vacuous
    assert sorted(m for m in shared if not m.startswith(("tensorfleet.core", "tensorfleet.protos"))) == []


def test_the_check_covers_the_whole_package(report) -> None:
    package = Package.from_dirs(pyproject_package_dirs())
    for expected in ("tensorfleet.core.errors", "tensorfleet.services.backends.base",
                     "tensorfleet.coordinator.io.readers.fasta", "tensorfleet.coordinator.cli",
                     "tensorfleet.client.inference_client", "tensorfleet.protos.inference_pb2"):
        assert expected in package.modules
    assert len(package.modules) > 100


# --- the checker catches what it is meant to catch: a planted tree -----------------------------
PLANTED = {
    "protos/__init__.py": "",
    "protos/messages.py": "",
    "core/__init__.py": "",
    "core/errors.py": "from planted.protos import messages\n",
    "core/codec.py": "from planted.client.api import Client  # core may not import client\n",
    "client/__init__.py": "",
    "client/api.py": "from ..core.errors import Problem\nclass Client: ...\n",
    "services/__init__.py": "",
    "services/server.py": (
        "from planted.core import errors\n"
        "def run():\n"
        "    from planted.coordinator import job  # a sibling layer, inside a function\n"
    ),
    "services/a.py": "from . import b\n",
    "services/b.py": "def later():\n    from .a import helper  # closes a cycle inside a function\n",
    "services/c.py": "import planted.services.a as a\nvalue = a._hidden\n",
    "services/d.py": "from .a import _helper\n",
    "services/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .f import F\n",
    "services/f.py": "from .e import thing  # with e's type-only import: a type-only cycle\nclass F: ...\n",
    "client/typed.py": "import typing\nif typing.TYPE_CHECKING:\n    from planted.services import e  # still a direction violation\n",
    "coordinator/__init__.py": "",
    "coordinator/job.py": "from planted.client import api\nfrom planted.services import b\n",
}
PLANTED_LAYERS = {f"planted.{name}": name for name in MAY_IMPORT}


@pytest.fixture
def planted(tmp_path: Path) -> Package:
    for relative, text in PLANTED.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return Package.from_dirs({f"planted.{name}": tmp_path / name for name in MAY_IMPORT})


def test_planted_violations_are_each_reported(planted: Package) -> None:
    report = check(planted, "planted", PLANTED_LAYERS, MAY_IMPORT)
    direction = "\n".join(report.direction)
    assert "planted.core.codec:1 imports planted.client.api: layer core may not import layer client" in direction
    assert "planted.services.server:3 imports planted.coordinator.job (inside a function)" in direction
    assert "planted.coordinator.job:2 imports planted.services.b: layer coordinator may not import layer services" \
        in direction
    assert "planted.client.typed:3 imports planted.services.e: layer client may not import layer services" \
        in direction
    assert len(report.direction) == 4  # the allowed imports (core->protos, client->core, ...) pass
    assert report.cycles == [["planted.services.a", "planted.services.b"]]
    assert report.type_cycles == [["planted.services.e", "planted.services.f"]]
    private = "\n".join(report.private)
    assert "planted.services.d:1 imports private _helper from planted.services.a" in private
    assert "planted.services.c:2 reads private planted.services.a._hidden" in private
    assert len(report.private) == 2


def test_a_clean_planted_tree_passes(planted: Package, tmp_path: Path) -> None:
    for relative in ("core/codec.py", "services/server.py", "services/b.py", "services/c.py",
                     "services/d.py", "services/f.py", "coordinator/job.py", "client/typed.py"):
        (tmp_path / relative).write_text("")
    report = check(Package.from_dirs({f"planted.{n}": tmp_path / n for n in MAY_IMPORT}), "planted",
                   PLANTED_LAYERS, MAY_IMPORT)
    assert (report.direction, report.cycles, report.type_cycles, report.private, report.unlayered) == \
        ([], [], [], [], [])


def test_an_unlisted_module_folder_is_reported(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "thing.py").write_text("")
    assert unlisted_module_folders({"pkg": tmp_path / "pkg"}) == [(tmp_path / "pkg" / "sub").resolve()]
