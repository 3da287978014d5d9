"""Many models over many sources (the epistasis embedding pipeline): one parquet sheet per model,
or one table for the whole job.

Each (model, source) pair is one ordinary run in `<job dir>/<model>/<source>/`, checkpointed
and resumable like any job; a model's local fleet starts once, on the first pair with work
to do, so a finished model starts no server. A model may run on some sources only
(`models[].sources`). Each model's sheet stacks its sources in job-file order under a leading
`source` column (`output.layout: one_table`: one file, with a `model` column before it);
`outputs` renames each model's outputs so every sheet has the same columns. Models run one
after another, each on its own fleet.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..engine.job import (
    JobFatal,
    RunContext,
    RunOptions,
    RunResult,
    describe_plan,
    final_output_path,
    open_input,
    run_one,
    up_to_date,
)
from ..engine.manifest import MANIFEST_NAME
from ..engine.status import open_workflow_folder
from ..fleet.model_fleet import ModelFleet
from ..io.output_files import OutputFolder
from ..spec import ChunkingSpec, InputSpec, JobSpec, ModelSpec, OutputSpec
from ..spec.kinds import SourceSpec, SweepModelSpec, SweepSpec
from .sheet_table import check_stored_columns, write_table
from .source_groups import expand_groups, grouped_reader

KIND = "models x sources"


def sheet_path(spec: SweepSpec, model: str, limit: int | None) -> Path:
    suffix = f".limit{limit}" if limit else ""
    return Path(spec.output.dir) / f"{model}{suffix}.parquet"


def table_path(spec: SweepSpec, limit: int | None) -> Path:
    return sheet_path(spec, spec.name, limit)


def locations(spec: SweepSpec, options: RunOptions) -> tuple[Path, Path]:
    """(output folder, job folder)."""
    suffix = f".limit{options.limit}" if options.limit else ""
    job_dir = (options.job_dir or Path(spec.job_dir or Path(spec.output.dir) / f".{spec.name}{suffix}.tfjob")).resolve()
    return Path(spec.output.dir), job_dir


def selected_models(spec: SweepSpec, options: RunOptions) -> list[SweepModelSpec]:
    """The models this run runs: all, or --models (names checked against the job)."""
    if not options.models:
        return list(spec.models)
    names = [m.name for m in spec.models]
    unknown = [name for name in options.models if name not in names]
    if unknown:
        raise JobFatal(f"--models {unknown}: the job has no such model (it has {names})")
    return [m for m in spec.models if m.name in options.models]


def _sub_job(spec: SweepSpec, model: SweepModelSpec, source: SourceSpec, sub_dir: Path) -> JobSpec:
    return JobSpec(
        name=f"{spec.name}.{model.name}.{source.label}",
        input=InputSpec.model_validate(
            {**source.model_dump(exclude={"name", "group_by", "group"}), "tensors": model.inputs or source.tensors}
        ),
        model=ModelSpec.model_validate(model.model_dump(include=set(ModelSpec.model_fields))),
        output=OutputSpec(
            path=str(sub_dir / "rows.parquet"), tensors=model.outputs, dtype=spec.output.dtype,
            compression=spec.output.compression,
            parts=f"{spec.output.parts.rstrip('/')}/{model.name}/{source.label}" if spec.output.parts else None,
        ),
        chunking=ChunkingSpec(batch_rows=model.batch_rows, token_budget=model.token_budget,
                              chunk_rows=spec.chunking.chunk_rows),
        policy=spec.policy,
        job_dir=str(sub_dir),
    )


def run_sweep(spec: SweepSpec, options: RunOptions) -> RunResult:
    spec = expand_groups(spec)  # a source split by a column: one source per value (source_groups.py)
    models = selected_models(spec, options)
    _, job_dir = locations(spec, options)
    check_stored_columns(spec, models, job_dir)  # before any compute, from the models' declared outputs
    if options.dry_run:
        return dry_run_sweep(spec, models, options, job_dir)
    open_workflow_folder(job_dir, {
        "kind": KIND, "name": spec.name, "output": spec.output.dir,
        "parts": [{"label": f"model {m.name} source {s.label}", "model": m.name, "dir": f"{m.name}/{s.label}"}
                  for m in spec.models for s in spec.sources_of(m)],
    }, restart=options.restart, resume=options.resume)
    started = time.monotonic()
    rows = failed = computed = 0
    sheets: list[Path] = []
    columns: list[str] | None = None
    tables: list[tuple[str, list[tuple[str, Path | None]]]] = []
    fresh = False  # some part computed rows: the combined files are written again
    for model in models:
        parts = _run_model(spec, model, options, job_dir / model.name)
        for _, result in parts:
            rows, failed, computed = rows + result.rows, failed + result.rows_failed, computed + result.rows_computed
            fresh = fresh or bool(result.rows_computed)
        if options.shard is not None and not options.shard.final:
            continue  # a shard's sheets are written once every shard is done (workflows/sharded.py)
        files = [(label, r.output) for label, r in parts]
        names = _column_names(files, model.name)
        if columns is not None and names != columns:
            raise JobFatal(
                f"model '{model.name}' gives the columns {names}, the sheets before it {columns}; "
                f"map its outputs with models[].outputs so every sheet has the same columns"
            )
        columns = names
        if spec.output.layout == "per_model":
            sheet = sheet_path(spec, model.name, options.limit)
            if fresh or not up_to_date(sheet, [path for _, path in files]):
                _write_sheet(sheet, [("source", [label for label, _ in files])], [path for _, path in files])
            sheets.append(sheet)
        else:
            tables.append((model.name, files))
    if options.shard is not None and not options.shard.final:
        return RunResult(None, job_dir, rows, failed, computed, time.monotonic() - started)
    if spec.output.layout == "one_table":
        table = table_path(spec, options.limit)
        keys = [("model", [m for m, files in tables for _ in files]), ("source", [s for _, files in tables for s, _ in files])]
        paths = [path for _, files in tables for _, path in files]
        if fresh or not up_to_date(table, paths):
            write_table(table, keys, [path for path in paths if path is not None])  # widths may differ by model
        sheets.append(table)
    return SweepResult(sheets[0], job_dir, rows, failed, computed, time.monotonic() - started, sheets=sheets)


def _run_model(
    spec: SweepSpec, model: SweepModelSpec, options: RunOptions, model_dir: Path
) -> list[tuple[str, RunResult]]:
    fleet = ModelFleet(model, model_dir / "servers", spec.policy.server_wait_s, label=f"model {model.name}")
    results = []
    try:
        for source in spec.sources_of(model):
            sub_dir = model_dir / source.label
            sub = _sub_job(spec, model, source, sub_dir)
            sub_options = RunOptions(
                job_dir=sub_dir, resume=(sub_dir / MANIFEST_NAME).is_file(), limit=options.limit,
                progress_stream=options.progress_stream, retry_failed=options.retry_failed, shard=options.shard,
            )
            with open_input(sub.input) as table:
                reader = grouped_reader(table, source)
                try:
                    result = run_one(RunContext(sub, reader, sub_options, final_output_path(sub, options.limit),
                                                sub_dir, fleet))
                except JobFatal as error:
                    raise JobFatal(f"model {model.name}, source {source.label}: {error}") from None
            results.append((source.label, result))
        return results
    finally:
        fleet.stop()


def _column_names(parts: list[tuple[str, Path | None]], model: str) -> list[str]:
    names: list[str] | None = None
    for label, path in parts:
        assert path is not None
        have = pq.read_schema(path).names
        if names is not None and have != names:
            raise JobFatal(f"model {model}: source {label} gives columns {have}, not {names}")
        names = have
    return ["source", *(names or [])]


def _write_sheet(sheet: Path, keys: list[tuple[str, list[str]]], paths: list[Path | None]) -> None:
    """Stack parquet files under leading key columns (one value per file); atomic."""
    tables = []
    parts = []  # each (model, source) file's own provenance: models differ in build and parameters
    for index, path in enumerate(paths):
        assert path is not None
        table = pq.read_table(path)
        parts.append({**{name: values[index] for name, values in keys},
                      **json.loads((table.schema.metadata or {}).get(b"tensorfleet", b"{}"))})
        for position, (name, values) in enumerate(keys):
            table = table.add_column(position, name, pa.array([values[index]] * table.num_rows, pa.string()))
        tables.append(table)
    metadata = dict(tables[0].schema.metadata or {})
    provenance = json.loads(metadata.get(b"tensorfleet", b"{}"))
    for name, values in keys:
        provenance[f"{name}s"] = list(dict.fromkeys(values))
    provenance["parts"] = parts
    metadata[b"tensorfleet"] = json.dumps(provenance, sort_keys=True).encode()
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables]).replace_schema_metadata(metadata)
    with OutputFolder(sheet.parent) as folder:  # checked and held open; never replaces a file we did not write
        folder.check_replaceable(sheet.name)
        temp = folder.at(f".{sheet.name}.partial")
        pq.write_table(table, temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        folder.replace(temp.name, sheet.name)


def dry_run_sweep(spec: SweepSpec, models: list[SweepModelSpec], options: RunOptions, job_dir: Path) -> RunResult:
    lines = [f"job: {spec.name} (dry run: nothing computed, nothing written)",
             f"{len(models)} models x {len(spec.sources)} sources, models one after another"]
    rows = 0
    for model in models:
        fleet = ModelFleet(model, job_dir / model.name / "servers", spec.policy.server_wait_s, label=f"model {model.name}")
        target = sheet_path(spec, model.name, options.limit) if spec.output.layout == "per_model" else table_path(spec, options.limit)
        lines.append(f"model {model.name} -> {target}")
        for source in spec.sources_of(model):
            sub = _sub_job(spec, model, source, job_dir / model.name / source.label)
            with open_input(sub.input) as table:
                reader = grouped_reader(table, source)
                try:
                    plan = describe_plan(sub, fleet, reader, options.limit, Path(spec.output.dir), job_dir)
                except JobFatal as error:
                    raise JobFatal(f"model {model.name}, source {source.label}: {error}") from None
            rows += plan.rows
            lines.append(f"  source {source.label} ({source.path}): " + "; ".join(plan.plan_lines()))
    lines.append(f"job folder: {job_dir}")
    return RunResult(None, job_dir, rows, 0, 0, 0.0, plan_text="\n".join(lines))


@dataclass
class SweepResult(RunResult):
    sheets: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join([
            *(f"sheet: {path}" for path in self.sheets),
            f"rows: {self.rows} ({self.rows - self.rows_failed} ok, {self.rows_failed} failed) over all models",
            self.speed_line(),
            f"job folder: {self.job_dir}",
        ])
