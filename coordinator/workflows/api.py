"""The one public engine: load, plan (dry run), run, resume and status for a job of any kind.

The CLI (`tensorfleet run`, `status`), the coordinator service's job process and the SLURM
launcher all call these functions and nothing below them. A job is any kind of one spec
(coordinator/spec/kinds.py); the engine opens its own inputs (local files or object-store URLs),
hands the job to its kind's runner, and uploads object-store outputs at the end.

Kinds' runners are imported when a job of that kind runs, so a plain `run` never imports them
(tests/coordinator/test_lazy_imports.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..engine.job import RunOptions, RunResult, default_job_dir, final_output_path
from ..engine.rerun import rerun_guard
from ..io.objectstore import ObjectStoreError, RemoteOutput, is_url, stage_dir, stage_input, upload
from ..spec import InputSpec, JobSpec, SpecError
from ..spec.errors import JobFatal
from ..spec.kinds import (
    AnyJob,
    InContextSpec,
    PipelineSpec,
    SweepSpec,
    kind_of,
    load_job,
    parse_job,
    with_servers,
)

__all__ = ["JobFatal", "RunOptions", "RunResult", "load", "locations", "merge", "parse", "plan", "resume", "run",
           "status"]


def load(path: Path | str, servers: list[str] | None = None) -> AnyJob:
    """A job file of any kind, validated, its paths absolute; `servers` replaces every model's fleet."""
    try:
        spec = load_job(path)
    except SpecError as error:
        raise JobFatal(str(error)) from None
    return with_servers(spec, servers) if servers else spec


def parse(raw: Any, source: str, base: Path) -> AnyJob:
    """A job of any kind from parsed YAML/JSON (the coordinator service's submissions); SpecError if invalid."""
    return parse_job(raw, source, base)


def locations(spec: AnyJob, options: RunOptions) -> tuple[str, Path]:
    """(where the output goes: a file, a folder for a sweep's sheets, or a URL; the local job folder)."""
    if isinstance(spec, SweepSpec):
        from .sweep import locations as sweep_locations

        return spec.output.dir, sweep_locations(spec, options)[1]
    output = final_output_path(spec, options.limit)  # type: ignore[arg-type]
    job_dir = options.job_dir.resolve() if options.job_dir else default_job_dir(spec, output)  # type: ignore[arg-type]
    return str(output) if not is_url(spec.output.path) else spec.output.path, job_dir


def plan(spec: AnyJob, options: RunOptions) -> RunResult:
    """--dry-run: every stage, model x source or run planned, with every check that can fail on
    the inputs; no server started, nothing written."""
    return run(spec, replace(options, dry_run=True))


def resume(spec: AnyJob, options: RunOptions) -> RunResult:
    """Continue the job in its folder: finished parts are a manifest read, unfinished ones start only their servers."""
    return run(spec, replace(options, resume=True, restart=False))


def run(spec: AnyJob, options: RunOptions) -> RunResult:
    """Run (or, with options.dry_run, plan) a job of any kind to its merged output."""
    if options.limit is not None and options.limit < 1:
        raise JobFatal("--limit must be at least 1")
    if options.servers:
        spec = with_servers(spec, options.servers)
    if options.models and not isinstance(spec, SweepSpec):
        raise JobFatal(f"--models picks models of a models x sources job; this job is {kind_of(spec)}")
    per_file = getattr(getattr(spec, "output", None), "per_file", False)
    if per_file and not isinstance(spec, JobSpec):
        raise JobFatal(f"output.per_file is for plain jobs (one model over many files); this job is {kind_of(spec)}")
    if per_file and options.shard is not None:
        raise JobFatal("a job with output.per_file cannot be sharded (each file is its own job); "
                       "run it without --shard, or give each file its own job")
    if not options.dry_run:  # --shard I/N, or a sharded job folder (workflows/sharded.py)
        from .sharded import run_sharded

        sharded = run_sharded(spec, options, locations(spec, replace(options, shard=None))[1], _run_kind)
        if sharded is not None:
            return sharded
    return _run_kind(spec, options)


def merge(spec: AnyJob, options: RunOptions, wait: bool = False) -> RunResult:
    """`tensorfleet merge`: a sharded job's one output, once every shard is complete (JobFatal naming
    the shards that are not; with `wait`, once they are)."""
    from .sharded import merge_shards

    if options.servers:
        spec = with_servers(spec, options.servers)
    return merge_shards(spec, options, locations(spec, options)[1], _run_kind, wait=wait)


def _run_kind(spec: AnyJob, options: RunOptions) -> RunResult:
    """The job, of its kind, in options.job_dir (a shard's folder for a sharded job)."""
    spec, remote = _localize(spec, options)
    if options.dry_run:
        result = _runner(spec)(spec, options)
    else:
        # the same job in its folder is continued with no flag (docs/coordinator.md, "Re-running a job")
        job_dir = locations(spec, options)[1]
        with rerun_guard(job_dir, spec, options.restart):
            result = _runner(spec)(spec, replace(options, resume=not options.restart))
    if remote is not None and result.output is not None:
        try:
            result.uploaded = remote(result)
        except ObjectStoreError as error:
            raise JobFatal(f"{error}; the merged output is in {result.output}; --resume uploads it again") from None
    return result


def _runner(spec: AnyJob):
    if isinstance(spec, PipelineSpec):
        from .pipeline import run_pipeline

        return run_pipeline
    if isinstance(spec, SweepSpec):
        from .sweep import run_sweep

        return run_sweep
    if isinstance(spec, InContextSpec):
        from .incontext import run_incontext

        return run_incontext
    if spec.output.per_file:
        from .per_file import run_per_file

        return run_per_file
    from ..engine.job import run_plain

    return run_plain


def status(job_dir: Path) -> dict[str, Any] | None:
    """Progress of the job in `job_dir` (any kind; for workflows one entry per part and a total); None: no job."""
    from ..engine.shard_status import sharded_status
    from ..engine.status import job_status

    return sharded_status(job_dir) or job_status(job_dir)


# --- object storage -------------------------------------------------------------------------


def _localize(spec: AnyJob, options: RunOptions):
    """Object-store (fsspec URL) inputs staged beside the local job folder, outputs written there
    first; returns the spec on local paths and the upload to run after it (None: nothing remote)."""
    if not any(is_url(path) for _, path in _remote_paths(spec)):
        return spec, None
    job_dir = options.job_dir or (Path(spec.job_dir) if spec.job_dir else None)
    if job_dir is None:
        raise JobFatal("an object-store input or output needs a local job folder: set job_dir or pass --job-dir")
    staging = stage_dir(job_dir.resolve())
    try:
        return _localized(spec, staging)
    except ObjectStoreError as error:
        raise JobFatal(str(error)) from None


def _remote_paths(spec: AnyJob):
    if isinstance(spec, SweepSpec):
        yield from (("source", s.path) for s in spec.sources)
        yield "output", spec.output.dir
        return
    yield "input", spec.input.path
    yield "output", spec.output.path
    if isinstance(spec, InContextSpec):
        yield "prompt", spec.prompt.path
        if isinstance(spec.control, InputSpec):
            yield "control", spec.control.path


def _staged(section: InputSpec, folder: Path) -> InputSpec:
    if not is_url(section.path):
        return section
    return section.model_copy(update={"path": str(stage_input(section.path, folder))})


def _localized(spec: AnyJob, staging: Path):
    out = staging / "output"
    if isinstance(spec, SweepSpec):
        sources = [_staged(s, staging / "sources" / s.label) for s in spec.sources]
        url = spec.output.dir if is_url(spec.output.dir) else None
        output = spec.output.model_copy(update={"dir": str(out)}) if url else spec.output
        spec = spec.model_copy(update={"sources": sources, "output": output})

        def upload_sheets(result: RunResult) -> list[str]:
            assert url is not None
            targets = []
            for sheet in getattr(result, "sheets", []):
                targets.append(f"{url.rstrip('/')}/{sheet.name}")
                upload(sheet, targets[-1])
            return targets

        return spec, (upload_sheets if url else None)
    updates: dict[str, Any] = {"input": _staged(spec.input, staging / "input")}
    if isinstance(spec, InContextSpec):
        updates["prompt"] = _staged(spec.prompt, staging / "prompt")
        if isinstance(spec.control, InputSpec):
            updates["control"] = _staged(spec.control, staging / "control")
    remote = None
    if is_url(spec.output.path):
        out.mkdir(parents=True, exist_ok=True)
        remote = RemoteOutput(spec.output.path, out)
        updates["output"] = spec.output.model_copy(update={"path": str(out / spec.output.path.rsplit("/", 1)[-1])})
    spec = spec.model_copy(update=updates)
    return spec, ((lambda result: remote.upload_all(result.output)) if remote else None)
