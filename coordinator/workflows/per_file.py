"""`output.per_file: true`: a plain job over several input files that writes one output per file.

Each file is one ordinary run in `<job dir>/<file stem>/` (its own plan, manifest, checkpoints
and merge), one after another on one fleet started once, on the first file with work to do; its
output is `<output.path>/<file stem>.<format>`, in the file's own row order. An .h5ad file's own
obs, var and genes are kept (and aligned to the model) file by file. The job as a whole (its
list of files and each file's digest) is the job's identity: a file added, removed or changed
after a partial run is a changed job, refused naming it (engine/rerun.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.job import (
    JobFatal,
    RunContext,
    RunOptions,
    RunResult,
    default_job_dir,
    describe_plan,
    final_output_path,
    open_input,
    run_one,
)
from ..engine.manifest import MANIFEST_NAME
from ..engine.status import open_workflow_folder
from ..fleet.model_fleet import ModelFleet
from ..spec import JobSpec
from ..spec.input_files import as_list, output_stem

KIND = "per file"
#: output.format -> the suffix of each file's output.
SUFFIXES = {"hdf5": ".h5", "parquet": ".parquet", "h5ad": ".h5ad", "csv": ".csv", "tsv": ".tsv"}


def locations(spec: JobSpec, options: RunOptions) -> tuple[Path, Path]:
    """(output folder, job folder): the folder output.path names (with --limit N, `<folder>.limitN`)."""
    folder = final_output_path(spec, options.limit)
    return folder, options.job_dir.resolve() if options.job_dir else default_job_dir(spec, folder)


def file_jobs(spec: JobSpec, folder: Path, job_dir: Path) -> list[tuple[str, JobSpec]]:
    """(stem, the plain job of one file) for every input file, in input order; JobFatal when two
    files would write the same output (the same name in different folders)."""
    files = as_list(spec.input.path)
    seen: dict[str, str] = {}
    jobs = []
    for path in files:
        stem = output_stem(path)
        if stem in seen or stem.startswith("."):
            raise JobFatal(f"output.per_file: {seen.get(stem, path)} and {path} would both write "
                           f"{folder / (stem + SUFFIXES[spec.output.format or ''])}; rename one of them")
        seen[stem] = path
        output = spec.output.model_copy(update={
            "path": str(folder / f"{stem}{SUFFIXES[spec.output.format or '']}"), "per_file": False,
            "parts": f"{spec.output.parts.rstrip('/')}/{stem}" if spec.output.parts else None,
        })
        jobs.append((stem, spec.model_copy(update={
            "name": f"{spec.name}.{stem}", "input": spec.input.model_copy(update={"path": path}), "output": output,
            "job_dir": str(job_dir / stem),
        })))
    return jobs


def run_per_file(spec: JobSpec, options: RunOptions) -> RunResult:
    folder, job_dir = locations(spec, options)
    jobs = file_jobs(spec, folder, job_dir)
    fleet = ModelFleet(spec.model, job_dir / "servers", spec.policy.server_wait_s)
    if options.dry_run:
        return _dry_run(spec, jobs, fleet, options, job_dir)
    open_workflow_folder(job_dir, {
        "kind": KIND, "name": spec.name, "output": str(folder),
        "parts": [{"label": f"file {sub.input.path}", "dir": stem} for stem, sub in jobs],
    }, restart=options.restart, resume=options.resume)
    started = time.monotonic()
    results: list[RunResult] = []
    try:
        for stem, sub in jobs:
            sub_dir = job_dir / stem
            sub_options = RunOptions(
                job_dir=sub_dir, resume=(sub_dir / MANIFEST_NAME).is_file(), limit=options.limit,
                progress_stream=options.progress_stream, retry_failed=options.retry_failed,
            )
            with open_input(sub.input) as reader:
                try:
                    results.append(run_one(RunContext(sub, reader, sub_options, final_output_path(sub, options.limit),
                                                      sub_dir, fleet)))
                except JobFatal as error:
                    raise JobFatal(f"input file {sub.input.path}: {error}") from None
    finally:
        fleet.stop()
    outputs = [result.output for result in results if result.output is not None]
    return PerFileResult(
        outputs[0] if outputs else None, job_dir, sum(r.rows for r in results), sum(r.rows_failed for r in results),
        sum(r.rows_computed for r in results), time.monotonic() - started,
        servers=sorted({s for r in results for s in r.servers}), notes=[n for r in results for n in r.notes],
        outputs=outputs,
    )


def _dry_run(spec: JobSpec, jobs: list[tuple[str, JobSpec]], fleet: ModelFleet, options: RunOptions,
             job_dir: Path) -> RunResult:
    lines = [f"job: {spec.name} (dry run: nothing computed, nothing written)",
             f"{len(jobs)} input files, one output each (output.per_file)"]
    rows = 0
    for stem, sub in jobs:
        output = final_output_path(sub, options.limit)
        with open_input(sub.input) as reader:
            try:
                plan = describe_plan(sub, fleet, reader, options.limit, output, job_dir / stem)
            except JobFatal as error:
                raise JobFatal(f"input file {sub.input.path}: {error}") from None
        rows += plan.rows
        lines.append(f"file {sub.input.path} -> {output}: " + "; ".join(plan.plan_lines()))
    lines.append(f"job folder: {job_dir}")
    return RunResult(None, job_dir, rows, 0, 0, 0.0, plan_text="\n".join(lines))


@dataclass
class PerFileResult(RunResult):
    outputs: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join([
            *(f"output: {path}" for path in self.outputs),
            f"rows: {self.rows} ({self.rows - self.rows_failed} ok, {self.rows_failed} failed) over "
            f"{len(self.outputs)} files",
            self.speed_line(),
            f"job folder: {self.job_dir}",
            *self.notes,
        ])
