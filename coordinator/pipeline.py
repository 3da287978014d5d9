"""Multi-stage jobs: stage k's model reads stage k-1's outputs; the last stage writes the output.

Step-first, as DPAM's batch mode: each stage is one ordinary run (its own fleet, model loaded
once, its own manifest under `<job dir>/stages/NN-name/`, so progress is checkpointed per
(stage, chunk)). Stages run side by side: a later stage reads an earlier one's committed
chunks as they appear (`StageReader`), so it starts before the earlier stage ends. A resume
finds finished stages and chunks done and skips them at once.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from .job import (
    JobFatal,
    RunOptions,
    RunResult,
    _dry_run,
    _run,
    default_job_dir,
    final_output_path,
    local_model_info,
)
from .joblock import JobLocked
from .manifest import MANIFEST_NAME, Manifest
from .part_store import drop_damaged_parts
from .progress import write_json_atomic
from .readers import InputError, open_reader
from .spec import ChunkingSpec, InputSpec, JobSpec, ModelSpec, OutputSpec, PolicySpec, _Strict
from .stage_reader import StageReader, carry_failures

PIPELINE_NAME = "pipeline.json"


class StageSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", description="Stage name (its folder and status line).")
    model: ModelSpec
    tensors: dict[str, str] = Field(
        default_factory=dict,
        description="model input -> field: of the job's input for the first stage, of the previous "
        "stage's outputs for the others. Unset: input.tensors (first stage) or same-named outputs.",
    )
    batch_rows: int | None = Field(default=None, ge=1, description="Rows per request for this stage's model.")
    token_budget: int | None = Field(default=None, ge=1)


class PipelineSpec(_Strict):
    name: str = Field(default="pipeline", pattern=r"^[A-Za-z0-9_.\-]+$")
    input: InputSpec
    stages: list[StageSpec] = Field(min_length=1)
    output: OutputSpec
    chunking: ChunkingSpec = Field(default_factory=ChunkingSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    job_dir: str | None = None

    def resolved(self, base: Path) -> PipelineSpec:
        data = self.model_dump()
        data["input"]["path"] = _absolute(base, data["input"]["path"])
        data["output"]["path"] = _absolute(base, data["output"]["path"])
        if data["job_dir"]:
            data["job_dir"] = _absolute(base, data["job_dir"])
        for stage in data["stages"]:
            resolve_model(stage["model"], base)
        return PipelineSpec.model_validate(data)


def _absolute(base: Path, path: str) -> str:
    return str((base / path).resolve()) if "://" not in path else path


def resolve_model(model: dict, base: Path) -> None:
    """Make a dumped ModelSpec's local repository absolute, in place."""
    if model.get("local"):
        model["local"]["repository"] = _absolute(base, model["local"]["repository"])


def stage_dirs(job_dir: Path, spec: PipelineSpec) -> list[Path]:
    return [job_dir / "stages" / f"{i:02d}-{stage.name}" for i, stage in enumerate(spec.stages)]


def _stage_job(spec: PipelineSpec, index: int, stage_dir: Path) -> JobSpec:
    stage = spec.stages[index]
    tensors = stage.tensors or (spec.input.tensors if index == 0 else {})
    return JobSpec(
        name=f"{spec.name}.{stage.name}",
        input=spec.input.model_copy(update={"tensors": tensors}),
        model=stage.model,
        output=spec.output,
        chunking=ChunkingSpec(
            batch_rows=stage.batch_rows, token_budget=stage.token_budget, chunk_rows=spec.chunking.chunk_rows
        ),
        policy=spec.policy,
        job_dir=str(stage_dir),
    )


def _prepare(job_dir: Path, options: RunOptions, spec: PipelineSpec, output: Path) -> None:
    marker = job_dir / PIPELINE_NAME
    if marker.is_file() and options.restart:
        shutil.rmtree(job_dir)
    elif marker.is_file() and not options.resume:
        raise JobFatal(f"{job_dir} already holds this job; pass --resume to continue it or --restart to start over")
    elif options.restart:
        output.unlink(missing_ok=True)
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {
        "name": spec.name, "output": str(output),
        "stages": [{"name": s.name, "model": s.model.name, "dir": str(d.relative_to(job_dir))}
                   for s, d in zip(spec.stages, stage_dirs(job_dir, spec), strict=True)],
    })


def run_pipeline(spec: PipelineSpec, options: RunOptions) -> RunResult:
    output = final_output_path(spec, options.limit)  # type: ignore[arg-type]
    job_dir = options.job_dir.resolve() if options.job_dir else default_job_dir(spec, output)  # type: ignore[arg-type]
    if options.limit is not None and options.limit < 1:
        raise JobFatal("--limit must be at least 1")
    if options.dry_run:
        return _dry_run_pipeline(spec, options, output, job_dir)
    _prepare(job_dir, options, spec, output)
    dirs = stage_dirs(job_dir, spec)
    for stage_dir in dirs:  # before any stage reads another's parts
        try:
            manifest = Manifest.open_existing(stage_dir, lock=True)
        except JobLocked as error:
            raise JobFatal(str(error)) from None
        if manifest is not None:
            try:
                drop_damaged_parts(stage_dir, manifest)
            finally:
                manifest.close()
    failed = threading.Event()
    results: list[RunResult | None] = [None] * len(spec.stages)
    errors: list[BaseException | None] = [None] * len(spec.stages)
    started = time.monotonic()

    def stage_run(index: int) -> None:
        reader = None
        try:
            sub = _stage_job(spec, index, dirs[index])
            if index == 0:
                reader = open_reader(spec.input)
                wrap = None
            else:
                reader = StageReader(dirs[index - 1], spec.input, failed.is_set)
                wrap = carry_failures(reader, spec.stages[index - 1].name)
            resume = (dirs[index] / MANIFEST_NAME).is_file()
            sub_options = RunOptions(
                job_dir=dirs[index], resume=resume, limit=options.limit,
                progress_stream=options.progress_stream if index == len(spec.stages) - 1 else _Quiet(),
            )
            last = index == len(spec.stages) - 1
            if resume and not last and _finished(dirs[index]):
                results[index] = RunResult(None, dirs[index], 0, 0, 0, 0.0)
                return
            results[index] = _run(sub, reader, sub_options, output, dirs[index], merge_output=last, wrap_commit=wrap)
        except InputError as error:
            errors[index] = JobFatal(str(error))
            failed.set()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors[index] = error
            failed.set()
        finally:
            if reader is not None:
                reader.close()

    threads = [threading.Thread(target=stage_run, args=(i,), name=f"stage-{s.name}") for i, s in enumerate(spec.stages)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, error in enumerate(errors):
        if error is not None and not (index and errors[index - 1] is not None and "stopped before" in str(error)):
            if isinstance(error, JobFatal):
                raise JobFatal(f"stage {spec.stages[index].name}: {error}")
            raise error
    final = results[-1]
    assert final is not None
    final.seconds = time.monotonic() - started
    final.job_dir = job_dir
    return final


def _finished(stage_dir: Path) -> bool:
    manifest = Manifest.open_existing(stage_dir)
    if manifest is None:
        return False
    try:
        counts = manifest.counts()
        return manifest.has_plan() and counts["chunks"] == counts["chunks_done"]
    finally:
        manifest.close()


def _dry_run_pipeline(spec: PipelineSpec, options: RunOptions, output: Path, job_dir: Path) -> RunResult:
    first = _stage_job(spec, 0, stage_dirs(job_dir, spec)[0])
    try:
        reader = open_reader(spec.input)
    except InputError as error:
        raise JobFatal(str(error)) from None
    with reader:
        plan = _dry_run(first, reader, options, output, job_dir)
    lines = [f"pipeline: {spec.name}, {len(spec.stages)} stages, run side by side"]
    for index, stage in enumerate(spec.stages):
        model = stage.model
        where = f"{model.local.count} local server(s)" if model.local else ", ".join(model.servers)
        outputs = ""
        if model.local:
            info = local_model_info(_stage_job(spec, index, job_dir))
            outputs = " -> " + ", ".join(f"{k} {v[0]}{v[1]}" for k, v in info.outputs.items())
        lines.append(f"stage {index + 1} {stage.name}: model {model.name} on {where}{outputs}")
    plan.plan_text = "\n".join(lines) + "\n" + plan.plan_text
    return plan


class _Quiet:
    """Progress stream for the earlier stages: only the last stage draws a bar."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def stage_status(job_dir: Path) -> list[dict[str, Any]] | None:
    """Per-stage progress of a pipeline's folder, or None when the folder is not a pipeline's."""
    marker = job_dir / PIPELINE_NAME
    if not marker.is_file():
        return None
    out = []
    for stage in json.loads(marker.read_text())["stages"]:
        manifest = Manifest.open_existing(job_dir / stage["dir"])
        counts = manifest.counts() if manifest is not None else {}
        if manifest is not None:
            manifest.close()
        out.append({"stage": stage["name"], "model": stage["model"], **counts})
    return out


def print_stage_status(job_dir: Path, as_json: bool) -> bool:
    """`tensorfleet status` for a pipeline folder: progress per stage. False if not a pipeline."""
    from .progress import pid_alive, read_status

    stages = stage_status(job_dir)
    if stages is None:
        return False
    for stage in stages:
        status = read_status(job_dir / _stage_dir(job_dir, stage["stage"])) or {}
        state = status.get("state", "waiting")
        if state in ("running", "starting", "merging") and status.get("pid") and not pid_alive(status["pid"]):
            state = "stopped"
        stage["state"] = state
    if as_json:
        print(json.dumps({"job_dir": str(job_dir), "stages": stages}, indent=1, sort_keys=True))
        return True
    print(f"job folder: {job_dir}")
    for index, stage in enumerate(stages, start=1):
        rows, done = stage.get("rows", 0), stage.get("rows_done", 0)
        share = f" ({done / rows:.1%})" if rows else ""
        print(
            f"stage {index} {stage['stage']} ({stage['model']}): {stage['state']}, rows {done}/{rows}{share}, "
            f"chunks {stage.get('chunks_done', 0)}/{stage.get('chunks', 0)}, rows failed {stage.get('rows_failed', 0)}"
        )
    return True


def _stage_dir(job_dir: Path, name: str) -> str:
    stages = json.loads((job_dir / PIPELINE_NAME).read_text())["stages"]
    return next(stage["dir"] for stage in stages if stage["name"] == name)
