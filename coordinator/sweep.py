"""Many models over many sources (the epistasis embedding pipeline): one parquet sheet per model.

Each (model, source) pair is one ordinary run in `<job dir>/<model>/<source>/`, checkpointed
and resumable like any job; a model's local fleet is started once for all its sources. The
model's sheet stacks its sources in job-file order with a leading `source` column; `outputs`
renames each model's outputs so every sheet has the same columns. Models run one after
another, each on its own fleet.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from .job import JobFatal, RunOptions, RunResult, _dry_run, _run, final_output_path
from .local_fleet import LocalFleet, LocalFleetError
from .manifest import MANIFEST_NAME
from .pipeline import _absolute, resolve_model
from .progress import write_json_atomic
from .readers import InputError, open_reader
from .spec import ChunkingSpec, InputSpec, JobSpec, ModelSpec, OutputSpec, PolicySpec, _Strict

SWEEP_NAME = "sweep.json"
_NAME = r"^[A-Za-z0-9_.\-]+$"


class SourceSpec(InputSpec):
    name: str | None = Field(default=None, pattern=_NAME, description="Source label; default: the file's stem.")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


class SweepModelSpec(ModelSpec):
    batch_rows: int | None = Field(default=None, ge=1, description="Rows per request for this model.")
    token_budget: int | None = Field(default=None, ge=1)
    inputs: dict[str, str] = Field(default_factory=dict, description="model input -> source field (all sources).")
    outputs: dict[str, str] = Field(
        default_factory=dict, description="model output -> stored column; use it to give every sheet the same columns."
    )


class SheetsSpec(_Strict):
    dir: str = Field(description="Folder for the sheets: <dir>/<model>.parquet.")
    dtype: str | None = Field(default=None, pattern=r"^(float32|float16)$")
    compression: str | None = Field(default=None, pattern=r"^(gzip|zstd|snappy)$")


class SweepSpec(_Strict):
    name: str = Field(default="sweep", pattern=_NAME)
    sources: list[SourceSpec] = Field(min_length=1)
    models: list[SweepModelSpec] = Field(min_length=1)
    output: SheetsSpec
    chunking: ChunkingSpec = Field(default_factory=ChunkingSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    job_dir: str | None = None

    @model_validator(mode="after")
    def _unique(self) -> SweepSpec:
        for kind, names in (("sources", [s.label for s in self.sources]), ("models", [m.name for m in self.models])):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{kind} {repeated} appear more than once; give each a distinct name")
        return self

    def resolved(self, base: Path) -> SweepSpec:
        data = self.model_dump()
        for source in data["sources"]:
            source["path"] = _absolute(base, source["path"])
        for model in data["models"]:
            resolve_model(model, base)
        data["output"]["dir"] = _absolute(base, data["output"]["dir"])
        if data["job_dir"]:
            data["job_dir"] = _absolute(base, data["job_dir"])
        return SweepSpec.model_validate(data)


def sheet_path(spec: SweepSpec, model: str, limit: int | None) -> Path:
    suffix = f".limit{limit}" if limit else ""
    return Path(spec.output.dir) / f"{model}{suffix}.parquet"


def _sub_job(spec: SweepSpec, model: SweepModelSpec, source: SourceSpec, sub_dir: Path, servers: list[str] | None) -> JobSpec:
    fleet = {"servers": servers, "local": None} if servers is not None else {}
    base = ModelSpec.model_validate({**model.model_dump(include=set(ModelSpec.model_fields)), **fleet})
    return JobSpec(
        name=f"{spec.name}.{model.name}.{source.label}",
        input=InputSpec.model_validate(
            {**source.model_dump(exclude={"name"}), "tensors": model.inputs or source.tensors}
        ),
        model=base,
        output=OutputSpec(
            path=str(sub_dir / "rows.parquet"), tensors=model.outputs, dtype=spec.output.dtype,
            compression=spec.output.compression,
        ),
        chunking=ChunkingSpec(batch_rows=model.batch_rows, token_budget=model.token_budget,
                              chunk_rows=spec.chunking.chunk_rows),
        policy=spec.policy,
        job_dir=str(sub_dir),
    )


def run_sweep(spec: SweepSpec, options: RunOptions) -> RunResult:
    if options.limit is not None and options.limit < 1:
        raise JobFatal("--limit must be at least 1")
    suffix = f".limit{options.limit}" if options.limit else ""
    job_dir = (options.job_dir or Path(spec.job_dir or Path(spec.output.dir) / f".{spec.name}{suffix}.tfjob")).resolve()
    if options.dry_run:
        return _dry_run_sweep(spec, options, job_dir)
    marker = job_dir / SWEEP_NAME
    if marker.is_file() and options.restart:
        shutil.rmtree(job_dir)
    elif marker.is_file() and not options.resume:
        raise JobFatal(f"{job_dir} already holds this job; pass --resume to continue it or --restart to start over")
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"name": spec.name, "models": [m.name for m in spec.models],
                               "sources": [s.label for s in spec.sources]})
    started = time.monotonic()
    rows = failed = computed = 0
    sheets: list[Path] = []
    columns: list[str] | None = None
    for model in spec.models:
        sheet = sheet_path(spec, model.name, options.limit)
        parts = _run_model(spec, model, options, job_dir / model.name)
        for result in parts:
            rows, failed, computed = rows + result.rows, failed + result.rows_failed, computed + result.rows_computed
        names = _write_sheet(sheet, [(s.label, r.output) for s, r in zip(spec.sources, parts, strict=True)], model.name)
        if columns is not None and names != columns:
            raise JobFatal(
                f"model '{model.name}' gives the columns {names}, the sheets before it {columns}; "
                f"map its outputs with models[].outputs so every sheet has the same columns"
            )
        columns = names
        sheets.append(sheet)
    return SweepResult(sheets[0], job_dir, rows, failed, computed, time.monotonic() - started, sheets=sheets)


def _run_model(spec: SweepSpec, model: SweepModelSpec, options: RunOptions, model_dir: Path) -> list[RunResult]:
    fleet: LocalFleet | None = None
    servers = list(options.servers or model.servers)
    try:
        if model.local is not None and not options.servers:
            local = model.local
            fleet = LocalFleet(Path(local.repository), model.name, local.count, local.device, model_dir / "servers", local.args)
            try:
                servers = fleet.start(local.startup_timeout_s)
            except LocalFleetError as error:
                raise JobFatal(f"model {model.name}: {error}") from None
        results = []
        for source in spec.sources:
            sub_dir = model_dir / source.label
            sub = _sub_job(spec, model, source, sub_dir, servers)
            sub_options = RunOptions(
                job_dir=sub_dir, resume=(sub_dir / MANIFEST_NAME).is_file(), limit=options.limit,
                progress_stream=options.progress_stream,
            )
            try:
                reader = open_reader(sub.input)
            except InputError as error:
                raise JobFatal(str(error)) from None
            with reader:
                try:
                    results.append(_run(sub, reader, sub_options, final_output_path(sub, options.limit), sub_dir))
                except JobFatal as error:
                    raise JobFatal(f"model {model.name}, source {source.label}: {error}") from None
        return results
    finally:
        if fleet is not None:
            fleet.stop()


def _write_sheet(sheet: Path, parts: list[tuple[str, Path | None]], model: str) -> list[str]:
    """Stack the sources' parquet files under a `source` column; atomic; returns the column names."""
    tables = []
    for label, path in parts:
        assert path is not None
        table = pq.read_table(path)
        tables.append(table.add_column(0, "source", pa.array([label] * table.num_rows, pa.string())))
    names = tables[0].column_names
    for (label, _), table in zip(parts, tables, strict=True):
        if table.column_names != names:
            raise JobFatal(f"model {model}: source {label} gives columns {table.column_names}, not {names}")
    metadata = dict(tables[0].schema.metadata or {})
    provenance = json.loads(metadata.get(b"tensorfleet", b"{}"))
    provenance["sources"] = [label for label, _ in parts]
    metadata[b"tensorfleet"] = json.dumps(provenance, sort_keys=True).encode()
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables]).replace_schema_metadata(metadata)
    sheet.parent.mkdir(parents=True, exist_ok=True)
    temp = sheet.with_name(f".{sheet.name}.partial")
    pq.write_table(table, temp)
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, sheet)
    return names


def _dry_run_sweep(spec: SweepSpec, options: RunOptions, job_dir: Path) -> RunResult:
    lines = [f"job: {spec.name} (dry run: nothing computed, nothing written)",
             f"{len(spec.models)} models x {len(spec.sources)} sources, models one after another"]
    rows = 0
    for model in spec.models:
        lines.append(f"model {model.name} -> {sheet_path(spec, model.name, options.limit)}")
        for source in spec.sources:
            sub = _sub_job(spec, model, source, job_dir / model.name / source.label, None)
            try:
                reader = open_reader(sub.input)
            except InputError as error:
                raise JobFatal(str(error)) from None
            with reader:
                plan = _dry_run(sub, reader, options, Path(spec.output.dir), job_dir)
            rows += plan.rows
            body = [line for line in plan.plan_text.splitlines() if line.startswith(("rows:", "requests:", "chunks:"))]
            lines.append(f"  source {source.label} ({source.path}): " + "; ".join(body))
    lines.append(f"job folder: {job_dir}")
    return RunResult(None, job_dir, rows, 0, 0, 0.0, plan_text="\n".join(lines))


@dataclass
class SweepResult(RunResult):
    sheets: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join([
            *(f"sheet: {path}" for path in self.sheets),
            f"rows: {self.rows} ({self.rows - self.rows_failed} ok, {self.rows_failed} failed) over all models",
            f"speed: {self.rows_computed} rows computed in {self.seconds:.1f}s = {self.rows_per_second:.1f} rows/s",
            f"job folder: {self.job_dir}",
        ])
