"""Make `tensorfleet.*` importable from this checkout without installing it.

    python bench/gpu/project_path.py TARGET     # then put TARGET on PYTHONPATH

pyproject.toml maps each package to a folder (`[tool.setuptools.package-dir]`, e.g.
`tensorfleet.services` = `services`). This writes TARGET/tensorfleet/ with one symbolic link
per mapping that its parent's link does not already cover, so a package added to that table
(a `core/` folder, say) is picked up with no change here. Stdlib only: it runs before any
wheel is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]


def package_dirs(pyproject: Path = REPO_ROOT / "pyproject.toml") -> dict[str, Path]:
    """{dotted package: folder} as pyproject maps them."""
    table = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    return {name: (pyproject.parent / folder).resolve() for name, folder in table.items()}


def link_packages(target: Path, mapping: dict[str, Path]) -> list[Path]:
    """The links made under `target`, shortest names first."""
    made: list[Path] = []
    for name in sorted(mapping, key=lambda n: n.count(".")):
        parent, _, leaf = name.rpartition(".")
        if parent in mapping and mapping[parent] / leaf == mapping[name]:
            continue  # the parent's folder already holds it
        link = target.joinpath(*name.split("."))
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(mapping[name], target_is_directory=True)
        made.append(link)
    return made


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    for link in link_packages(Path(args[0]), package_dirs()):
        print(f"{link} -> {link.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
