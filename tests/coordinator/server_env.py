"""A second Python environment for model servers, made in a test in about a second.

`python -m venv --without-pip`, then symlinks in its site-packages to exactly the installed
distributions the model server needs (grpcio, protobuf, numpy, pydantic, PyYAML,
prometheus-client and what they require, found from their metadata), and a `tensorfleet`
package of links to this checkout's folders. No TensorFlow, no torch: the environment can serve
a python-backend model and nothing that needs more, as a lab's second conda env would.
`protocol` writes a copy of core/ whose PROTOCOL_VERSION differs (a server from another release).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_DISTRIBUTIONS = ["grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-status", "protobuf",
                        "numpy", "pydantic", "pyyaml", "prometheus-client"]
#: The folders that form the `tensorfleet` namespace (pyproject's package-dir).
PACKAGES = {"protos": "protos", "core": "core", "client": "client", "services": "services"}


def _needed(names: list[str]) -> list[metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    pending = list(names)
    while pending:
        name = re.sub(r"[-_.]+", "-", pending.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-only requirement not installed here
        seen[name] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return list(seen.values())


def make_server_env(root: Path, protocol: int | None = None) -> Path:
    """The new environment's python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True)
    site = next((root / "lib").glob("python*/site-packages"))
    for dist in _needed(SERVER_DISTRIBUTIONS):
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__", "bin"}:
            source = base / top
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    # every process of this environment says so on stderr: a server's log shows where it ran
    (site / "sitecustomize.py").write_text("import sys\nprint(f'python from {sys.prefix}', file=sys.stderr)\n")
    package = site / "tensorfleet"
    package.mkdir()
    for name, folder in PACKAGES.items():
        (package / name).symlink_to(REPO_ROOT / folder)
    if protocol is not None:
        (package / "core").unlink()
        shutil.copytree(REPO_ROOT / "core", package / "core", ignore=shutil.ignore_patterns("__pycache__"))
        version = package / "core" / "version.py"
        version.write_text(re.sub(r"^PROTOCOL_VERSION = \d+$", f"PROTOCOL_VERSION = {protocol}",
                                  version.read_text(), flags=re.M))
    return root / "bin" / "python"
