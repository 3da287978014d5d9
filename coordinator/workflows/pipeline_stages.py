"""The multi-stage job's pieces for tool stages and fan-out (pipeline.py runs them): what a stage
declares it outputs, a tool stage's dry run, the exit code when rows failed before a fan-out, and
the stages planned again when --retry-failed recomputes rows before a fan-out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..engine.job import JobFatal, RunOptions, RunResult
from ..engine.manifest import Manifest
from ..fleet.model_fleet import ModelFleet
from ..io.readers import Reader
from ..spec.kinds import PipelineSpec
from .stage_graph import fanned_outputs, row_spaces
from .stage_outputs import stage_output_path
from .tool_stage import ToolStage, tool_outputs


@dataclass
class PipelineResult(RunResult):
    """A multi-stage result: rows that failed before a fan-out have no rows in the output, yet the
    job did not compute them: the exit code says so (1), as for failed rows in the output."""

    rows_lost: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.rows_failed or self.rows_lost else 0


def with_lost_parents(spec: PipelineSpec, dirs: list[Path], final: RunResult) -> RunResult:
    lost, notes = 0, []
    for index, stage in enumerate(spec.stages[:-1]):
        if not stage.fan_out:
            continue
        manifest = Manifest.open_existing(dirs[index])
        if manifest is None:
            continue
        try:
            failed = manifest.counts()["rows_failed"]
        finally:
            manifest.close()
        if failed:
            lost += failed
            kept = stage.name in spec.output.stages and final.output is not None
            where = str(stage_output_path(final.output, stage.name)) if kept else f"`tensorfleet status` and {dirs[index]}"  # type: ignore[arg-type]
            notes.append(f"{failed} row(s) failed up to stage {stage.name} (a fan-out): they have no rows in the "
                         f"output; their errors are in {where}")
    if not lost:
        return final
    return PipelineResult(**{**final.__dict__, "notes": [*final.notes, *notes]}, rows_lost=lost)


def plans_on_lengths(spec: PipelineSpec, index: int, declared: Reader) -> bool:
    """A token budget over a ragged field of an earlier stage: the plan needs the rows' real lengths."""
    if not (spec.stages[index].token_budget or spec.chunking.token_budget):
        return False
    fields = declared.fields()
    return any(-1 in fields[f].row_shape for f in spec.stages[index].tensors.values() if f in fields)


def forget_children(spec: PipelineSpec, dirs: list[Path], reopened: int | None) -> None:
    """Rows computed again at or before a fan-out may gain or lose children: the stages over those
    children are planned again (their folders emptied)."""
    if reopened is None:
        return
    import shutil

    for index, space in enumerate(row_spaces(spec)):
        if space is not None and space >= reopened and dirs[index].exists():
            print(f"{dirs[index]}: planned again (--retry-failed recomputes rows of stage "
                  f"{spec.stages[reopened].name}, before its fan-out)", file=sys.stderr)
            shutil.rmtree(dirs[index])


def declared_outputs(spec: PipelineSpec, position: int, fleets: list[ModelFleet | None], per_child: bool) -> dict:
    """Stage `position`'s outputs as its model (or its tool's `read`) declares them; `per_child`:
    as the stages after its fan-out see them (one entry of each fanned output)."""
    stage, fleet = spec.stages[position], fleets[position]
    outputs = tool_outputs(stage) if fleet is None else dict(fleet.info().outputs)
    if per_child and stage.fan_out:
        fanned = fanned_outputs(stage)
        outputs = {name: (datatype, list(shape[1:]) if name in fanned else list(shape))
                   for name, (datatype, shape) in outputs.items()}
    return outputs


def children_line(spec: PipelineSpec, space: int) -> str:
    fan = spec.stages[space]
    return f"rows: the entries of stage {fan.name}'s {fan.fan_out} (known once it has run)"


def dry_run_tool(spec: PipelineSpec, index: int, reader: Reader, output: Path, stage_dir: Path,
                  options: RunOptions, space: int | None) -> list[str]:
    """A tool stage's plan: its executable checked, its fields checked, its chunks (before any fan-out)."""
    from ..engine.planner import PlanError, chunk_sizes, make_plan

    stage = spec.stages[index]
    tool = ToolStage(spec, index, reader, stage_dir, output, options)
    tool.check()
    fields = tool.fields()
    assert stage.write is not None and stage.read is not None and stage.command is not None
    outputs = ", ".join(f"{k} {v[0]}{v[1]}" for k, v in tool_outputs(stage).items())
    lines = [f"stage {index + 1} {stage.name}: tool {stage.command[0]} on this host ({stage.concurrency} chunk(s) at "
             f"once, timeout {stage.timeout_s:g}s each) -> {outputs}",
             f"  command: {stage.command}",
             f"  writes: {stage.write.format} of {fields}; reads: {stage.read.format} {stage.read.name} "
             f"by {stage.read.id_column if stage.read.format != 'npy' else 'file name'}"]
    if space is not None:
        return [*lines, f"  {children_line(spec, space)}"]
    rows = spec.chunking.chunk_rows
    try:
        plan = make_plan(reader, {f: f for f in fields}, batch_rows=rows, chunk_rows=rows, limit=options.limit)
    except PlanError as error:
        raise JobFatal(str(error)) from None
    return [*lines, f"  rows: {plan.settings.rows}", f"  chunks: {chunk_sizes(plan.chunks, rows)}"]


def check_tools(spec: PipelineSpec) -> None:
    """Every tool stage's executable can run: checked before the job folder or any server exists."""
    from ..spec.tool_stage import executable_problem

    for stage in spec.stages:
        if stage.command is not None:
            problem = executable_problem(stage.command[0])
            if problem:
                raise JobFatal(f"stage {stage.name}: cannot run the tool: {problem}")
