"""Multi-stage jobs: each stage's model reads the previous stage's outputs (or, by qualified
name, the job's input and any earlier stage's); the last stage writes the output.

Step-first, as DPAM's batch mode: each stage is one ordinary run (its own fleet, model loaded
once, its own manifest under `<job dir>/stages/NN-name/`, so progress is checkpointed per
(stage, chunk)). Stages run side by side: a later stage reads an earlier one's committed
chunks as they appear (`StageReader`), so it starts before the earlier stage ends. A resume
finds finished stages and chunks done and skips them at once, without starting their servers.

A stage may run a command instead of a model (a tool stage, tool_stage.py), and may emit several
rows per row (`fan_out`): the stages after it run over the children (stage_graph.py, fan_out.py).
`output.stages` keeps chosen stages' own outputs beside the output (stage_outputs.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..engine.job import (
    JobFatal,
    RunContext,
    RunOptions,
    RunResult,
    StageHooks,
    default_job_dir,
    describe_plan,
    final_output_path,
    open_input,
    reopen_failed_chunks,
    run_one,
)
from ..engine.manifest import MANIFEST_NAME, Manifest, drop_damaged_parts
from ..engine.provenance import run_facts
from ..engine.status import MARKER_NAME, open_workflow_folder
from ..fleet.model_fleet import ModelFleet
from ..io.joblock import JobLocked
from ..io.readers import InputError, Reader
from ..spec import ChunkingSpec, JobSpec, OutputSpec
from ..spec.kinds import PipelineSpec
from .pipeline_stages import (
    check_tools,
    children_line,
    declared_outputs,
    dry_run_tool,
    forget_children,
    plans_on_lengths,
    with_lost_parents,
)
from .stage_graph import StageGraph, referenced, row_spaces
from .stage_outputs import merge_stage, write_stage_outputs
from .stage_reader import DeclaredOutputs, StagesReader, carry_failures
from .tool_stage import ToolStage

KIND = "multi-stage"


def stage_dirs(job_dir: Path, spec: PipelineSpec) -> list[Path]:
    return [job_dir / "stages" / f"{i:02d}-{stage.name}" for i, stage in enumerate(spec.stages)]


def locations(spec: PipelineSpec, options: RunOptions) -> tuple[Path, Path]:
    """(final output, job folder)."""
    output = final_output_path(spec, options.limit)  # type: ignore[arg-type]
    job_dir = options.job_dir.resolve() if options.job_dir else default_job_dir(spec, output)  # type: ignore[arg-type]
    return output, job_dir


def _stage_job(spec: PipelineSpec, index: int, stage_dir: Path) -> JobSpec:
    stage = spec.stages[index]
    tensors = stage.tensors or (spec.input.tensors if index == 0 else {})
    if index == 0:
        tensors = {name: field.removeprefix("input:") for name, field in tensors.items()}
    return JobSpec(
        name=f"{spec.name}.{stage.name}",
        input=spec.input.model_copy(update={"tensors": tensors}),
        model=stage.model,
        output=OutputSpec.model_validate(spec.output.model_dump(exclude={"stages"})),
        chunking=ChunkingSpec(
            batch_rows=stage.batch_rows, token_budget=stage.token_budget, chunk_rows=spec.chunking.chunk_rows
        ),
        policy=spec.policy,
        job_dir=str(stage_dir),
    )


def _referenced(spec: PipelineSpec, index: int) -> set[str]:
    """The qualifiers ('input' or an earlier stage's name) stage `index` reads by qualified name."""
    return referenced(spec, index)


def _label(stage) -> str:  # noqa: ANN001 - a StageSpec
    return stage.model.name if stage.model is not None else f"tool {Path(stage.command[0]).name}"


def _prepare(job_dir: Path, options: RunOptions, spec: PipelineSpec, output: Path) -> None:
    if options.restart and not (job_dir / MARKER_NAME).is_file():
        output.unlink(missing_ok=True)  # a folder gone but an output left: start over means both
    open_workflow_folder(job_dir, {
        "kind": KIND, "name": spec.name, "output": str(output),
        "parts": [{"label": f"stage {i + 1} {s.name}", "model": _label(s), "dir": str(d.relative_to(job_dir))}
                  for i, (s, d) in enumerate(zip(spec.stages, stage_dirs(job_dir, spec), strict=True))],
    }, restart=options.restart, resume=options.resume)


def run_pipeline(spec: PipelineSpec, options: RunOptions) -> RunResult:
    output, job_dir = locations(spec, options)
    if options.dry_run:
        return dry_run_pipeline(spec, options, output, job_dir)
    check_tools(spec)
    _prepare(job_dir, options, spec, output)
    dirs = stage_dirs(job_dir, spec)
    reopened = _repair_stages(dirs, options)  # before any stage reads another's parts
    forget_children(spec, dirs, reopened)
    failed = threading.Event()
    results: list[RunResult | None] = [None] * len(spec.stages)
    errors: list[BaseException | None] = [None] * len(spec.stages)
    started = time.monotonic()

    fleets = _fleets(spec, dirs)
    graph = StageGraph(spec, dirs, failed.is_set)
    if options.shard is not None and not all((d / MANIFEST_NAME).is_file() for d in dirs):
        if any(fleet is None for fleet in fleets) or any(stage.fan_out for stage in spec.stages):
            raise JobFatal("a pipeline with a tool stage or a fan-out cannot be sharded: its later stages' rows "
                           "are known only once the stages before them ran; run it without --shard")
        from .sharded import common_chunk_unit

        # one unit for every stage: each stage's slice holds the rows the one before it computed
        unit = common_chunk_unit([(_stage_job(spec, i, d), fleets[i].info()) for i, d in enumerate(dirs)])
        options = replace(options, shard=replace(options.shard, unit=unit))

    def stage_run(index: int) -> None:
        reader: Reader | None = None
        planning: Reader | None = None
        planning_input: Reader | None = None  # the input the declared fields give ids and rows of
        fleet = fleets[index]
        try:
            last = index == len(spec.stages) - 1
            resume = (dirs[index] / MANIFEST_NAME).is_file()
            finished = resume and _finished(dirs[index])
            if finished and not last:
                results[index] = RunResult(None, dirs[index], 0, 0, 0, 0.0)
                return
            wrap_commit = None
            previous: Reader | None = None
            if index == 0:
                reader = open_input(spec.input)
            else:
                reader, previous = graph.reader(index)
                wrap_commit = carry_failures(previous, spec.stages[index - 1].name)  # type: ignore[arg-type]
                # a finished last stage plans nothing (no model asked, no server reached); after a
                # fan-out the rows are known only once it has run, so the stage plans on them
                if not finished and fleet is not None and graph.spaces[index] is None:
                    planning_input = open_input(spec.input)
                    planning = _declared_reader(spec, index, planning_input, fleets)
                    if plans_on_lengths(spec, index, planning):  # ragged rows' lengths: known once computed
                        planning = None
            sub_options = RunOptions(
                job_dir=dirs[index], resume=resume,  # failed chunks reopened above
                limit=options.limit if graph.spaces[index] is None else None,  # children: of the limited rows
                progress_stream=options.progress_stream if last else _Quiet(), shard=options.shard,
            )
            if fleet is None:  # a tool stage
                results[index] = ToolStage(spec, index, reader, dirs[index], output, sub_options, wrap_commit,
                                           previous).run()
                return
            sub = _stage_job(spec, index, dirs[index])
            ctx = RunContext(sub, reader, sub_options, output, dirs[index], fleet,
                             _stage_hooks(spec, dirs, last, wrap_commit), plan_reader=planning)
            results[index] = run_one(ctx)
        except InputError as error:
            errors[index] = JobFatal(str(error))
            failed.set()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors[index] = error
            failed.set()
        finally:
            if fleet is not None:
                fleet.stop()
            for item in (reader, planning_input):
                if item is not None:
                    item.close()

    # Daemon threads: an interrupt (Ctrl-C, a service's cancel or timeout) ends the run at once,
    # as a kill would; committed chunks are kept and local servers die with the process.
    threads = [threading.Thread(target=stage_run, args=(i,), name=f"stage-{s.name}", daemon=True)
               for i, s in enumerate(spec.stages)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:
        failed.set()
        raise
    finally:
        graph.close()
    _raise_first_cause(spec, errors)
    final = results[-1]
    assert final is not None
    if spec.stages[-1].command is not None:  # a tool stage last: its parts make the output
        path, rows_failed, columns = merge_stage(spec, len(spec.stages) - 1, dirs[-1], output, options.limit,
                                                 _stages_provenance(spec, dirs))
        final.output, final.rows_failed, final.columns = path, rows_failed, columns
    if spec.output.stages:
        final.notes = [*final.notes, *(f"stage output: {path}" for path in write_stage_outputs(
            spec, dirs, output, options.limit, _stages_provenance(spec, dirs)))]
    final = with_lost_parents(spec, dirs, final)
    final.seconds = time.monotonic() - started
    final.job_dir = job_dir
    return final


def _fleets(spec: PipelineSpec, dirs: list[Path]) -> list[ModelFleet | None]:
    """Each model stage's fleet (None for a tool stage)."""
    return [ModelFleet(stage.model, dirs[i] / "servers", spec.policy.server_wait_s) if stage.model else None
            for i, stage in enumerate(spec.stages)]


def _repair_stages(dirs: list[Path], options: RunOptions) -> int | None:
    """Each stage's damaged parts dropped and (--retry-failed) its failed chunks reopened; the
    first stage whose failed chunks were reopened (None: none)."""
    first = None
    for index, stage_dir in enumerate(dirs):
        try:
            manifest = Manifest.open_existing(stage_dir, lock=True)
        except JobLocked as error:
            raise JobFatal(str(error)) from None
        if manifest is not None:
            try:
                drop_damaged_parts(stage_dir, manifest)
                if options.retry_failed and manifest.chunks_with_failures():
                    reopen_failed_chunks(stage_dir, manifest)  # here, or a finished earlier stage would be skipped
                    first = index if first is None else first
            finally:
                manifest.close()
    return first


def _raise_first_cause(spec: PipelineSpec, errors: list[BaseException | None]) -> None:
    """A stage's error, unless it only stopped because the stage before it failed."""
    for index, error in enumerate(errors):
        if error is not None and not (index and errors[index - 1] is not None and "stopped before" in str(error)):
            if isinstance(error, JobFatal):
                raise JobFatal(f"stage {spec.stages[index].name}: {error}")
            raise error


def _position(spec: PipelineSpec, name: str) -> int:
    return [s.name for s in spec.stages].index(name)


def _declared_reader(spec: PipelineSpec, index: int, source: Reader, fleets: list[ModelFleet | None]) -> Reader:
    """What stage `index` reads, as the earlier stages' models declare it (no server, no waiting)."""

    def declared(position: int) -> Reader:
        return DeclaredOutputs(spec.input, source, declared_outputs(spec, position, fleets, position < index))

    named = {w: (source if w == "input" else declared(_position(spec, w))) for w in _referenced(spec, index)}
    return StagesReader(spec.input, declared(index - 1), named)


def _stage_hooks(spec: PipelineSpec, dirs: list[Path], last: bool, wrap_commit: Callable | None) -> StageHooks:
    """Only the last stage merges, with every stage's provenance; a later stage carries the earlier
    stages' failed rows along (wrap_commit)."""
    provenance = (lambda: _stages_provenance(spec, dirs)) if last else None
    return StageHooks(merge_output=last, wrap_commit=wrap_commit, provenance=provenance)


def _stages_provenance(spec: PipelineSpec, dirs: list[Path]) -> dict:
    """Every stage's model, parameters and input facts, for the output's provenance: the last
    stage's model alone does not say how the output was made."""
    stages = []
    for stage, stage_dir in zip(spec.stages, dirs, strict=True):
        manifest = Manifest.open_existing(stage_dir)
        facts = {}
        if manifest is not None:
            try:
                facts = run_facts(manifest)
            finally:
                manifest.close()
        stages.append({"stage": stage.name, **facts})
    return {"stages": stages}


def _finished(stage_dir: Path) -> bool:
    manifest = Manifest.open_existing(stage_dir)
    if manifest is None:
        return False
    try:
        counts = manifest.counts()
        return manifest.has_plan() and counts["chunks"] == counts["chunks_done"]
    finally:
        manifest.close()


def dry_run_pipeline(spec: PipelineSpec, options: RunOptions, output: Path, job_dir: Path) -> RunResult:
    """Every stage planned against the models' declared inputs and outputs; nothing started or written.
    A tool stage's executable is checked; a stage after a fan-out is checked field by field (its
    rows are known once the fan-out has run)."""
    lines = [f"job: {spec.name} (dry run: nothing computed, nothing written)",
             f"pipeline: {len(spec.stages)} stages, run side by side"]
    dirs = stage_dirs(job_dir, spec)
    rows = 0
    fleets = _fleets(spec, dirs)
    spaces = row_spaces(spec)
    with open_input(spec.input) as source:
        for index, stage in enumerate(spec.stages):
            fleet = fleets[index]
            reader = _declared_reader(spec, index, source, fleets) if index else source
            try:
                if fleet is None:
                    lines += dry_run_tool(spec, index, reader, output, dirs[index], options, spaces[index])
                    continue
                sub = _stage_job(spec, index, dirs[index])
                if spaces[index] is not None:
                    from ..engine.plan_phase import checked_fields

                    fields = checked_fields(sub, reader, fleet.info(wait_s=10.0))
                    body = [children_line(spec, spaces[index]),
                            "fields: " + ", ".join(f"{k} <- {v}" for k, v in sorted(fields.items()))]
                else:
                    plan = describe_plan(sub, fleet, reader, options.limit, output, dirs[index],
                                         reads_input=index == 0, writes_output=index == len(spec.stages) - 1)
                    rows = plan.rows
                    body = plan.plan_lines("fields:")
            except JobFatal as error:
                raise JobFatal(f"stage {stage.name}: {error}") from None
            outputs = ", ".join(f"{k} {v[0]}{v[1]}" for k, v in fleet.info().outputs.items())
            lines.append(f"stage {index + 1} {stage.name}: model {stage.model.name} on {fleet.describe()} -> {outputs}")
            lines += [f"  {line}" for line in body]
            if stage.fan_out:
                lines.append(f"  fan_out: {stage.fan_out} (the next stages run over its entries, ids PARENT:K)")
    lines += [f"output: {output} ({spec.output.format})"]
    from .stage_outputs import stage_output_path

    lines += [f"stage output: {stage_output_path(output, name)}" for name in spec.output.stages]
    lines += [f"job folder: {job_dir}"]
    return RunResult(None, job_dir, rows, 0, 0, 0.0, plan_text="\n".join(lines))


class _Quiet:
    """Progress stream for the earlier stages: only the last stage draws a bar."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False
