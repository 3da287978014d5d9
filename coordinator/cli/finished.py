"""Re-running a finished job without importing the engine: `tensorfleet run JOB` on a job that
finished and changed in nothing exits 0 with its summary before numpy, gRPC, pydantic or any
reader, writer or workflow is imported (issue 29: a pipeline manager re-runs the same command,
and a finished job must be a quick success).

A run that ends with exit 0 leaves `finished.json` in its job folder, holding what the quick
answer rests on, each recorded at the end of that run:

- the job file (resolved path and sha256 of its bytes) and the command-line options that change
  what is computed or where (all of them but `--servers`, `--resume`, `--verbose`);
- `job.json` (inode, size, mtime): every later run of the folder, from any entry point, rewrites
  it when it starts (engine/rerun.py), so a stamp outlives no other run; `--restart` removes the
  folder and the stamp with it;
- every input file of the job (the paths of job.json's identity): inode, size, mtime and ctime,
  the same test job.json's identity makes before it trusts a recorded sha256 (rerun.input_digests),
  made stricter (a touch, a chmod or a copy over the file all send the run down the long way);
- every output file (the merged output, a sweep's sheets): inode, size and mtime, so a deleted
  or rewritten output is merged again by the long way.

Anything that differs, or cannot be read, means "not known to be finished": the command goes on
as before (imports the engine, whose own checks refuse a changed job naming the difference,
continue an unfinished one, or merge a missing output). Only this module's own answer is
quick; it never refuses anything.

The job folder is found the way the engine finds it (workflows/api.locations), from a plain
YAML read of the job file; a stamp is written only where that agrees with the engine, so a
case this reading gets wrong is a miss (the long way), never a wrong answer.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

STAMP_NAME = "finished.json"
_IDENTITY_NAME = "job.json"  # engine/rerun.IDENTITY_NAME (tests check they agree)
_VERSION = 1
#: Options under which the command must do work: never answered from a stamp (`--resume` asks
#: for the folder's parts to be checked and what is missing computed, e.g. after a sub-folder
#: was removed by hand, which no stamp sees).
_WORKING_OPTIONS = ("restart", "dry_run", "retry_failed", "resume")
#: Command-line options that change neither the result nor where it goes (and the working ones,
#: which say how the run that left the stamp got there).
_IGNORED_OPTIONS = frozenset({"command", "job", "servers", "resume", "verbose", "handler", *_WORKING_OPTIONS})
_MAX_JOB_BYTES = 1 << 20


def finished_summary(args: argparse.Namespace) -> str | None:
    """The summary of the finished, unchanged job `args` names; None when that is not known."""
    if any(getattr(args, name, False) for name in _WORKING_OPTIONS):
        return None
    try:
        job_file = Path(args.job).resolve()
        text = _job_bytes(job_file)
        if text is None:
            return None
        job_dir = job_folder(text, job_file, args)
        if job_dir is None:
            return None
        stamp = json.loads((job_dir / STAMP_NAME).read_text())
        if (
            stamp.get("version") != _VERSION
            or stamp.get("job_file") != str(job_file)
            or stamp.get("job_sha256") != hashlib.sha256(text).hexdigest()
            or stamp.get("options") != _options(args)
            or stamp.get("job_json") != _stat(job_dir / _IDENTITY_NAME, "identity")
            or any(_stat(path, "input") != seen for path, seen in stamp["inputs"].items())
            or any(_stat(path, "output") != seen for path, seen in stamp["outputs"].items())
        ):
            return None
        return str(stamp["summary"])
    except Exception:  # noqa: BLE001 - an unreadable job file or stamp is the long way's to report
        return None


def record_finished(args: argparse.Namespace, job_dir: Path, outputs: list[Path], summary: str) -> None:
    """Leave the stamp of a run that finished (exit 0) in `job_dir`, the engine's job folder;
    nothing when this module would look for it elsewhere, or an input or output is not a local file.
    Best effort: a stamp not written only costs the next re-run the long way, so no error here
    may turn the finished run into a failed one."""
    with contextlib.suppress(Exception):
        job_file = Path(args.job).resolve()
        text = _job_bytes(job_file)
        if text is None or job_folder(text, job_file, args) != job_dir.resolve():
            return
        inputs = _inputs(job_dir)
        files = _output_files(outputs, job_dir)
        if not files or any("://" in path or not os.path.isfile(path) for path in [*inputs, *files]):
            return
        stamp = {
            "version": _VERSION,
            "job_file": str(job_file),
            "job_sha256": hashlib.sha256(text).hexdigest(),
            "options": _options(args),
            "job_json": _stat(job_dir / _IDENTITY_NAME, "identity"),
            "inputs": {path: _stat(path, "input") for path in inputs},
            "outputs": {path: _stat(path, "output") for path in files},
            "summary": summary,
        }
        temp = job_dir / f".{STAMP_NAME}.tmp"
        temp.write_text(json.dumps(stamp, indent=1, sort_keys=True))
        os.replace(temp, job_dir / STAMP_NAME)


def _inputs(job_dir: Path) -> list[str]:
    """Every file the job read: the paths of job.json's identity, and of each run's manifest
    (a workflow's runs are folders below the top one)."""
    import sqlite3

    paths = dict.fromkeys(json.loads((job_dir / _IDENTITY_NAME).read_text())["inputs"])
    for depth in ("", "*/", "*/*/", "*/*/*/"):
        for manifest in sorted(job_dir.glob(f"{depth}manifest.sqlite")):
            with contextlib.closing(sqlite3.connect(f"file:{manifest}?mode=ro", uri=True)) as db:
                paths.update(dict.fromkeys(row[0] for row in db.execute("SELECT path FROM inputs")))
    return list(paths)


def _output_files(outputs: list[Path], job_dir: Path, most: int = 10_000) -> list[str]:
    """The output files (a folder's files, not those of a job folder inside it); [] past `most`."""
    files: list[str] = []
    for output in outputs:
        if Path(output).is_dir():
            files += [str(p) for p in sorted(Path(output).rglob("*")) if p.is_file() and job_dir not in p.parents
                      and not any(part.endswith(".tfjob") for part in p.relative_to(output).parts)]
        else:
            files.append(str(output))
    return list(dict.fromkeys(files)) if len(files) <= most else []


def job_folder(text: bytes, job_file: Path, args: argparse.Namespace) -> Path | None:
    """The job folder the engine would use for this job file and options (api.locations), read
    from the YAML alone; None when the file says something this reading does not follow."""
    if args.job_dir:
        return Path(args.job_dir).resolve()
    import yaml  # ~10 ms; only once a job file is there to read

    raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(raw, dict) or not isinstance(raw.get("output"), dict):
        return None
    base = job_file.parent
    limit = getattr(args, "limit", None)
    if raw.get("job_dir") is not None:
        return _local(base, raw["job_dir"])
    if "sources" in raw:  # models x sources: workflows/sweep.locations
        out_dir, name = raw["output"].get("dir"), raw.get("name")
        if not isinstance(out_dir, str) or not isinstance(name, str):
            return None
        folder = _local(base, out_dir)
        return None if folder is None else (folder / f".{name}{f'.limit{limit}' if limit else ''}.tfjob").resolve()
    path = raw["output"].get("path")
    output = _local(base, path) if isinstance(path, str) else None
    if output is None:
        return None
    if limit:  # engine/run_types.final_output_path
        output = output.with_name(f"{output.stem}.limit{limit}{output.suffix}")
    return output.with_name(output.name + ".tfjob")  # engine/run_types.default_job_dir


def _local(base: Path, path: Any) -> Path | None:
    """A spec path made absolute as the spec does (spec.absolute); None for a URL or a non-string."""
    if not isinstance(path, str) or "://" in path:
        return None
    return (base / path).resolve()


def _job_bytes(job_file: Path) -> bytes | None:
    with open(job_file, "rb") as handle:
        text = handle.read(_MAX_JOB_BYTES + 1)
    return text if len(text) <= _MAX_JOB_BYTES else None


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The options that change what a run computes or where (every option but the ignored ones,
    so one added later is compared too)."""
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in sorted(vars(args).items()) if key not in _IGNORED_OPTIONS}


def _stat(path: Path | str, role: str) -> list[int]:
    """What tells a file that changed from one that did not, without reading it."""
    stat = os.stat(path)
    if role == "input":
        return [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns]
