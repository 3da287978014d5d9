"""Re-running a job: what `tensorfleet run JOB` does with a job folder that already holds a job.

A pipeline manager (Snakemake, Nextflow, a SLURM requeue) runs the same command again after a
failure, and expects it to carry on; run again after success, it expects a quick exit 0 that
names the output. So a job folder is continued, with no flag, when it holds the same job: the
same spec (up to how its servers are reached and how requests are sent, which change no
result) and the same input files. A changed job is refused with the difference named;
`--restart` starts over. `--resume` is accepted and means what no flag means.

The job's identity is kept in `job.json` at the top of its job folder (docs/coordinator.md,
"Re-running a job"). A folder from before `job.json` is continued as `--resume` continued it,
each run's manifest still refusing a changed plan or input.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorfleet.core.hashing import file_sha256_once

from ..spec.errors import JobFatal
from ..spec.input_files import as_list

IDENTITY_NAME = "job.json"
#: What a job folder holds once a run of it got as far as planning (any kind, any depth).
_WORK_MARKERS = ("manifest.sqlite", "workflow.json", "pipeline.json", "sweep.json")
#: Model fields that say how its servers are reached, not what is computed: a re-run may
#: change them (another fleet, `--servers`, a new token); the served build is checked by each
#: run's manifest when chunks remain (the model's artifact sha256).
_FLEET_FIELDS = ("servers", "local", "token")
#: Top-level spec fields that change no result: how requests are sent, where the folder is.
_RUN_FIELDS = ("policy", "job_dir")
_SHOWN = 6


@dataclass(frozen=True)
class JobIdentity:
    """What makes two runs the same job: the result-defining spec and every input's digest."""

    spec: dict[str, Any]
    inputs: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "inputs": self.inputs}


def result_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec (model_dump in json mode) without the fields that change no result."""
    out = {k: v for k, v in spec.items() if k not in _RUN_FIELDS}
    models: list[dict[str, Any]] = []
    if isinstance(out.get("model"), dict):
        out["model"] = dict(out["model"])
        models.append(out["model"])
    if isinstance(out.get("stages"), list):
        out["stages"] = [{**s, "model": dict(s["model"]) if s.get("model") else None} for s in out["stages"]]
        models += [s["model"] for s in out["stages"] if s["model"]]  # a tool stage has none
    if isinstance(out.get("models"), list):
        out["models"] = [dict(m) for m in out["models"]]
        models += out["models"]
    for model in models:
        for name in _FLEET_FIELDS:
            model.pop(name, None)
    return out


def input_digests(paths: Iterable[str], known: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """path -> {size, mtime_ns, sha256}; a file whose size and mtime match `known` is not read again."""
    out: dict[str, dict[str, Any]] = {}
    for path in dict.fromkeys(paths):
        try:
            stat = os.stat(path)
        except OSError:
            out[path] = {"missing": True}
            continue
        before = (known or {}).get(path) or {}
        if before.get("size") == stat.st_size and before.get("mtime_ns") == stat.st_mtime_ns and before.get("sha256"):
            sha256 = before["sha256"]
        else:
            sha256 = file_sha256_once(path)
        out[path] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    return out


def job_identity(spec: Any, known: dict[str, Any] | None = None) -> JobIdentity:
    """The identity of a job of any kind (a spec of coordinator/spec/kinds.py, paths absolute)."""
    dumped = spec.model_dump(mode="json")
    paths = [path for source in dumped.get("sources", []) for path in as_list(source["path"])]
    paths += [path for name in ("input", "prompt", "control") if isinstance(dumped.get(name), dict)
              for path in as_list(dumped[name]["path"])]
    return JobIdentity(result_spec(dumped), input_digests(paths, (known or {}).get("inputs")))


def stored_identity(job_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((job_dir / IDENTITY_NAME).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def holds_work(job_dir: Path) -> bool:
    """The folder holds a planned job of any kind (a manifest, or a workflow's marker), at the
    depths the job kinds put them (a sweep's runs are two folders down); part folders are not walked."""
    if not job_dir.is_dir():
        return False
    return any(
        next(job_dir.glob(f"{depth}{name}"), None) is not None
        for depth in ("", "*/", "*/*/", "*/*/*/") for name in _WORK_MARKERS
    )


def holds_server_logs(job_dir: Path) -> bool:
    """Servers were started in the folder (their logs, at any kind's depth): a run that failed
    there keeps the folder, since the logs say why (a model that would not load)."""
    if not job_dir.is_dir():
        return False
    return any(next(job_dir.glob(f"{depth}servers/server-*.log"), None) is not None
               for depth in ("", "*/", "*/*/", "*/*/*/"))


def differences(before: dict[str, Any], now: JobIdentity) -> list[str]:
    """What changed between the stored identity and this run's, one line each (spec keys dotted)."""
    lines = [f"{key} {_shown(old)} -> {_shown(new)}" for key, old, new in _diff(_flat(before.get("spec", {})), _flat(now.spec))]
    stored_inputs = before.get("inputs", {})
    for path in sorted(set(stored_inputs) | set(now.inputs)):
        old, new = stored_inputs.get(path), now.inputs.get(path)
        if old is None or new is None:
            continue  # a path that came or went is a spec change, named above
        if new.get("missing"):
            lines.append(f"input {path} is gone since this job began")
        elif (old.get("size"), old.get("sha256")) != (new.get("size"), new.get("sha256")):
            lines.append(
                f"input {path} changed since this job began (size {old.get('size')} -> {new.get('size')}, "
                f"sha256 {str(old.get('sha256'))[:12]} -> {str(new.get('sha256'))[:12]})"
            )
    return lines


def check_same_job(job_dir: Path, identity: JobIdentity) -> None:
    """JobFatal naming the difference when `job_dir` holds another job (or this one changed)."""
    stored = stored_identity(job_dir)
    if stored is None or not holds_work(job_dir):
        return
    changed = differences(stored, identity)
    if changed:
        shown = "; ".join(changed[:_SHOWN]) + (f"; and {len(changed) - _SHOWN} more" if len(changed) > _SHOWN else "")
        raise JobFatal(
            f"{job_dir} holds this job as it was before a change ({shown}); its committed work came from "
            f"the old job. Undo the change to continue it, pass --restart to start over, or give the changed "
            f"job another job folder (--job-dir)"
        )


@contextlib.contextmanager
def rerun_guard(job_dir: Path, spec: Any, restart: bool) -> Iterator[None]:
    """Around one run of a job (not a dry run): refuse a folder that holds a changed job, record
    the job's identity as soon as its folder exists (so a run killed at any point left it), and
    leave no folder behind a run that stopped before planning anything (as before, a failed
    plan leaves nothing to clean up). A --restart is recorded once it succeeded; one killed
    midway leaves a folder without job.json, continued as a folder from before job.json."""
    identity = job_identity(spec, stored_identity(job_dir))
    created = False
    if not restart:
        check_same_job(job_dir, identity)
        if not job_dir.exists():
            job_dir.mkdir(parents=True)
            created = True
        write_identity(job_dir, identity)
    try:
        yield
    except BaseException:
        # A --restart that failed is not recorded: it may have been refused before removing the
        # old folder (another coordinator at work on it), whose job.json must then stay.
        if created and not holds_work(job_dir) and not holds_server_logs(job_dir):
            shutil.rmtree(job_dir, ignore_errors=True)
        raise
    write_identity(job_dir, identity)  # after --restart (which removed the old folder), or the inputs' new stat


def write_identity(job_dir: Path, identity: JobIdentity) -> None:
    """Record the job the folder holds (atomic); nothing when the folder does not exist."""
    if not job_dir.is_dir():
        return
    temp = job_dir / f".{IDENTITY_NAME}.tmp"
    with contextlib.suppress(OSError):
        temp.write_text(json.dumps(identity.to_json(), indent=1, sort_keys=True))
        os.replace(temp, job_dir / IDENTITY_NAME)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for index, item in enumerate(value):
            label = item.get("name") or item.get("label") or index
            out.update(_flat(item, f"{prefix}[{label}]"))
        return out
    return {prefix: value}


_UNSET = object()


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k, _UNSET), new.get(k, _UNSET)) for k in keys if old.get(k, _UNSET) != new.get(k, _UNSET)]


def _shown(value: Any) -> str:
    return "(unset)" if value is _UNSET else repr(value)
