"""Many input files, one job: `input.path` as a list of files or a glob pattern.

A glob is expanded when the job file is resolved (its paths made absolute), sorted, so the
resolved job names every file it reads: the plan, the resume checks, the job's identity and a
service's path policy all see the same concrete list, and a file added after a partial run is
a changed job (refused, naming the difference) rather than a silent extra. A pattern that
matches nothing is an error naming it. Object-store URLs are one file each and are not globbed.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

#: Characters that make a path a glob pattern.
_GLOB_CHARS = "*?["
#: Compression suffixes a file name may end in after its format's (proteins.fa.gz).
_COMPRESSED = (".gz", ".bgz")


def is_pattern(path: str) -> bool:
    return "://" not in path and any(c in path for c in _GLOB_CHARS)


def as_list(path: str | list[str]) -> list[str]:
    """Every path of an input: one, or the list."""
    return list(path) if isinstance(path, list) else [path]


def first_path(path: str | list[str]) -> str:
    """The path whose suffix tells the input's format (every file of a list has the same one)."""
    return as_list(path)[0] if as_list(path) else ""


def check_listed(path: str | list[str]) -> None:
    """ValueError for a list the job cannot read as one input: empty, repeated files, URLs."""
    if not isinstance(path, list):
        return
    if not path:
        raise ValueError("input.path is an empty list; name at least one file")
    repeated = sorted({p for p in path if path.count(p) > 1})
    if repeated:
        raise ValueError(f"input.path lists {repeated} more than once")
    urls = [p for p in path if "://" in p and not p.startswith("file://")]
    if urls:
        raise ValueError(f"input.path: object-store inputs {urls[:3]} are one file per job; list local files")


def resolve_input(base: Path, path: str | list[str]) -> str | list[str]:
    """Relative paths made absolute against `base`; a glob pattern (alone or in a list) expanded to
    the sorted files it matches (a list). The files of a list keep their names (symlinks are not
    followed here; a service's policy resolves each one before it checks it). ValueError for a
    pattern that matches no file."""
    if isinstance(path, str) and (not is_pattern(path) or (base / path).is_file()):
        return str((base / path).resolve()) if "://" not in path else path
    out: list[str] = []
    for item in as_list(path):
        if "://" in item:
            out.append(item)
            continue
        absolute = os.path.abspath(base / item)  # '..' folded, symlinks kept: a file keeps its name
        if not is_pattern(item) or os.path.isfile(absolute):  # a file whose name holds '[' is that file
            out.append(absolute)
            continue
        matches = sorted(os.path.abspath(found) for found in glob.glob(absolute, recursive=True)
                         if Path(found).is_file())
        if not matches:
            raise ValueError(f"input.path: the pattern '{item}' (as {absolute}) matches no file")
        out.extend(matches)
    return list(dict.fromkeys(out))


def file_labels(paths: list[str]) -> list[str]:
    """The names input files are known by in outputs (`source_file`): each path relative to the
    folder the files share (samples/a.fa, samples/b.fa -> a.fa, b.fa; x/s.fa, y/s.fa -> x/s.fa, y/s.fa)."""
    if not paths:
        return []
    common = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [os.path.relpath(os.path.abspath(p), common) for p in paths]


def output_stem(path: str) -> str:
    """An input file's name without its compression and format suffixes: the name of its own
    output under `output.per_file` (samples/s1.fa.gz -> s1)."""
    name = Path(path).name
    for suffix in _COMPRESSED:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return Path(name).stem or name
