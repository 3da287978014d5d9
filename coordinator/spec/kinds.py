"""One job spec, four kinds, one loader.

A job file is one of:
- plain: `input` + `model` + `output` (JobSpec, coordinator/spec/__init__.py);
- multi-stage: `stages:` (PipelineSpec): stage k's model reads stage k-1's outputs (and, by
  `STAGE:FIELD` or `input:FIELD`, any earlier stage's or the input's fields);
- models x sources: `models:` + `sources:` (SweepSpec);
- in-context: `prompt:` (InContextSpec): query rows predicted in the context of prompt rows.

`parse_job` tells the kind from the top-level keys and validates the file against that kind's
model, so an unknown field is an error naming it. Everything that takes a job (the CLI, the
coordinator service, the SLURM launcher) reads it through here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from . import (
    ChunkingSpec,
    InputSpec,
    JobSpec,
    ModelSpec,
    OutputSpec,
    PolicySpec,
    SpecError,
    Strict,
    absolute,
    check_file_name,
    format_validation_error,
    read_job_file,
    resolve_model,
)
from .input_files import as_list, first_path, resolve_input
from .tool_stage import ToolReadSpec, ToolWriteSpec, check_tool_stage, resolve_command

NAME = r"^[A-Za-z0-9_.\-]+$"


class Named(Strict):
    """A spec section whose `name` becomes a file or folder name."""

    @field_validator("name", check_fields=False)
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        return value if value is None else check_file_name(value)


class StageSpec(Named):
    name: str = Field(max_length=128, pattern=NAME, description="Stage name (its folder and status line).")
    model: ModelSpec | None = Field(default=None, description="The stage's model; or give `command` (a tool stage).")
    command: list[str] | None = Field(
        default=None, min_length=1, max_length=256,
        description="A tool stage: argv run once per chunk (never through a shell), with {inputs}, {outputs}, "
        "{scratch}, {chunk}, {threads} replaced (spec/tool_stage.py).",
    )
    write: ToolWriteSpec | None = Field(default=None, description="Tool stage: how a chunk's rows are written.")
    read: ToolReadSpec | None = Field(default=None, description="Tool stage: how the tool's results are read back.")
    concurrency: int = Field(default=1, ge=1, le=256, description="Tool stage: chunks run at once.")
    threads: int = Field(default=1, ge=1, le=1024, description="Tool stage: the value of {threads}.")
    timeout_s: float = Field(default=3600.0, gt=0, description="Tool stage: a chunk's run is killed after this long.")
    fan_out: str | None = Field(
        default=None, description="An output with several entries per row: the next stages run over its entries "
        "(ids PARENT:K, K from 0), in parent order then K. A model stage names its length in `ragged`.",
    )
    ragged: dict[str, str] = Field(
        default_factory=dict,
        description="output -> output holding each row's length along its first axis (as output.ragged).",
    )
    tensors: dict[str, str] = Field(
        default_factory=dict,
        description="model input -> field. A plain name is a field of the job's input for the first stage and "
        "an output of the previous stage for the others; 'input:FIELD' reads the job's input and "
        "'STAGE:OUTPUT' an earlier stage's output. Unset: input.tensors (first stage) or same-named outputs.",
    )
    batch_rows: int | None = Field(default=None, ge=1, description="Rows per request for this stage's model.")
    token_budget: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _model_or_tool(self) -> StageSpec:
        check_tool_stage(self)
        return self

    @property
    def is_tool(self) -> bool:
        return self.command is not None


class PipelineOutputSpec(OutputSpec):
    stages: list[str] = Field(
        default_factory=list,
        description="Stages whose own outputs are kept too: one file per stage beside the output, "
        "<output stem>.<stage><suffix>, each in its stage's row order (docs/workloads.md).",
    )


class PipelineSpec(Named):
    name: str = Field(default="pipeline", max_length=128, pattern=NAME)
    input: InputSpec
    stages: list[StageSpec] = Field(min_length=1)
    output: PipelineOutputSpec
    chunking: ChunkingSpec = Field(default_factory=ChunkingSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    job_dir: str | None = None

    @model_validator(mode="after")
    def _stage_references(self) -> PipelineSpec:
        names = [stage.name for stage in self.stages]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated or "input" in names:
            raise ValueError(f"stage names must be distinct and not 'input' (got {names})")
        for index, stage in enumerate(self.stages):
            for model_input, field in stage.tensors.items():
                where, _, _ = field.partition(":")
                if ":" in field and where != "input" and where not in names[:index]:
                    raise ValueError(
                        f"stages[{index}] ({stage.name}).tensors.{model_input}: '{field}' names no earlier stage "
                        f"(earlier: {['input', *names[:index]]})"
                    )
        unknown = [name for name in self.output.stages if name not in names]
        if unknown:
            raise ValueError(f"output.stages names {unknown}, which are not stages (stages: {names})")
        if any(stage.fan_out for stage in self.stages[:-1]) and self.output.format == "h5ad":
            raise ValueError("a job with fan_out writes rows that are not the input's cells; use an hdf5, parquet "
                             "or csv output")
        return self

    def resolved(self, base: Path) -> PipelineSpec:
        data = self.model_dump()
        data["input"]["path"] = resolve_input(base, data["input"]["path"])
        data["output"]["path"] = absolute(base, data["output"]["path"])
        if data["job_dir"]:
            data["job_dir"] = absolute(base, data["job_dir"])
        for stage in data["stages"]:
            if stage["model"]:
                resolve_model(stage["model"], base)
            if stage["command"]:
                stage["command"] = resolve_command(stage["command"], base)
        return PipelineSpec.model_validate(data)


class SourceSpec(InputSpec):
    name: str | None = Field(default=None, max_length=128, pattern=NAME,
                             description="Source label; default: the file's stem.")
    group_by: str | None = Field(
        default=None, min_length=1,
        description="A column of this table input (CSV/TSV/parquet) whose values split its rows into sources, "
        "one per distinct value in order of first appearance, each labelled by its value (models[].sources "
        "names them): one file with a `source` column drives a models x sources job.",
    )
    group: str | None = Field(
        default=None, min_length=1,
        description="With group_by: run only the rows whose group_by column holds this value (one source); "
        "unset: one source per value.",
    )

    @model_validator(mode="after")
    def _grouping(self) -> SourceSpec:
        if self.group is not None and not self.group_by:
            raise ValueError("group picks the rows of one value of group_by; set group_by too")
        if self.group_by and self.format is not None and self.format not in ("csv", "tsv", "parquet"):
            raise ValueError(f"group_by splits a table input (csv, tsv, parquet); this source is {self.format}")
        return self

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        return value if value is None else check_file_name(value)

    @property
    def label(self) -> str:
        return self.name or self.group or Path(first_path(self.path)).stem


class SweepModelSpec(ModelSpec):
    batch_rows: int | None = Field(default=None, ge=1, description="Rows per request for this model.")
    token_budget: int | None = Field(default=None, ge=1)
    inputs: dict[str, str] = Field(default_factory=dict, description="model input -> source field (all sources).")
    outputs: dict[str, str] = Field(
        default_factory=dict, description="model output -> stored column; use it to give every sheet the same columns."
    )
    sources: list[str] | None = Field(
        default=None, description="Labels of the sources this model runs on; unset: every source."
    )


class SheetsSpec(Strict):
    dir: str = Field(description="Folder for the output: <dir>/<model>.parquet, or <dir>/<name>.parquet.")
    layout: Literal["per_model", "one_table"] = Field(
        default="per_model",
        description="per_model: one parquet per model, its sources stacked under a `source` column; "
        "one_table: one parquet <dir>/<job name>.parquet with `model` and `source` columns.",
    )
    dtype: str | None = Field(default=None, pattern=r"^(float32|float16)$")
    compression: str | None = Field(default=None, pattern=r"^(gzip|zstd|snappy)$")
    parts: str | None = Field(
        default=None, description="fsspec URL of a folder for the part files (<parts>/<model>/<source>/...); "
        "unset: parts stay in the local job folder.",
    )


class SweepSpec(Named):
    name: str = Field(default="sweep", max_length=128, pattern=NAME)
    sources: list[SourceSpec] = Field(min_length=1)
    models: list[SweepModelSpec] = Field(min_length=1)
    output: SheetsSpec
    chunking: ChunkingSpec = Field(default_factory=ChunkingSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    job_dir: str | None = None

    @model_validator(mode="after")
    def _unique(self) -> SweepSpec:
        labels = [s.label for s in self.sources]
        for kind, names in (("sources", labels), ("models", [m.name for m in self.models])):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{kind} {repeated} appear more than once; give each a distinct name")
        grouped = any(s.group_by and s.group is None for s in self.sources)  # labels known once the file is read
        for model in self.models:
            unknown = sorted(set(model.sources or []) - set(labels))
            if unknown and not grouped:
                raise ValueError(f"model {model.name}: sources {unknown} are not in sources (have {labels})")
            if model.sources == []:
                raise ValueError(f"model {model.name}: sources is empty; list at least one source or leave it unset")
        return self

    def sources_of(self, model: SweepModelSpec) -> list[SourceSpec]:
        """The sources `model` runs on, in job-file order."""
        return [s for s in self.sources if model.sources is None or s.label in model.sources]

    def resolved(self, base: Path) -> SweepSpec:
        data = self.model_dump()
        for source in data["sources"]:
            source["path"] = resolve_input(base, source["path"])
        for model in data["models"]:
            resolve_model(model, base)
        data["output"]["dir"] = absolute(base, data["output"]["dir"])
        if data["job_dir"]:
            data["job_dir"] = absolute(base, data["job_dir"])
        return SweepSpec.model_validate(data)


class InContextSpec(Named):
    name: str = Field(default="incontext", max_length=128, pattern=NAME)
    input: InputSpec = Field(description="Query cells (.h5ad): their rows are predicted, their obs/var kept.")
    prompt: InputSpec = Field(description="Prompt cells; tensors maps the model's context inputs to fields.")
    control: Literal["query"] | InputSpec = Field(
        default="query", description="'query' (the query is the control) or a control prompt (a second, paired run)."
    )
    model: ModelSpec
    output: OutputSpec
    chunking: ChunkingSpec = Field(default_factory=ChunkingSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    job_dir: str | None = None

    @model_validator(mode="after")
    def _one_prompt_file(self) -> InContextSpec:
        for field, section in (("prompt", self.prompt), ("control", self.control)):
            if isinstance(section, InputSpec) and isinstance(section.path, list):
                raise ValueError(f"{field}.path: a prompt is one file (several files are for input.path)")
        return self

    def resolved(self, base: Path) -> InContextSpec:
        data = self.model_dump()
        for key in ("input", "prompt"):
            data[key]["path"] = resolve_input(base, data[key]["path"])
        data["output"]["path"] = absolute(base, data["output"]["path"])
        if isinstance(data["control"], dict):
            data["control"]["path"] = resolve_input(base, data["control"]["path"])
        resolve_model(data["model"], base)
        if data["job_dir"]:
            data["job_dir"] = absolute(base, data["job_dir"])
        return InContextSpec.model_validate(data)


AnyJob = JobSpec | PipelineSpec | SweepSpec | InContextSpec

#: The key that marks each kind other than plain, checked in this order.
KIND_KEYS: tuple[tuple[str, str, type[Strict]], ...] = (
    ("stages", "multi-stage", PipelineSpec),
    ("prompt", "in-context", InContextSpec),
    ("models", "models x sources", SweepSpec),
)


def kind_of(spec: AnyJob) -> str:
    """'plain', 'multi-stage', 'models x sources' or 'in-context'."""
    for _, kind, model in KIND_KEYS:
        if isinstance(spec, model):
            return kind
    return "plain"


def parse_job(raw: Any, source: str = "job", base: Path | None = None) -> AnyJob:
    """Validate a job of any kind; with `base`, relative paths resolve against it."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping (input, model, output, ...) at the top level")
    model: type[Strict] = JobSpec
    for key, _, kind_model in KIND_KEYS:
        if key in raw:
            model = kind_model
            break
    try:
        spec = model.model_validate(raw)
        return spec.resolved(base) if base is not None else spec  # type: ignore[attr-defined]
    except ValidationError as error:
        raise SpecError(format_validation_error(error, source)) from None
    except ValueError as error:  # a glob pattern that matches no file (input_files.py)
        raise SpecError(f"{source}: {error}") from None


def load_job(path: Path | str) -> AnyJob:
    """Read a job file of any kind, validate it and resolve its paths against its folder."""
    path = Path(path)
    return parse_job(read_job_file(path), str(path), path.resolve().parent)


def models_of(spec: AnyJob) -> list[ModelSpec]:
    """Every model the job uses, in the order it uses them."""
    if isinstance(spec, PipelineSpec):
        return [stage.model for stage in spec.stages if stage.model is not None]
    if isinstance(spec, SweepSpec):
        return list(spec.models)
    return [spec.model]


def with_servers(spec: AnyJob, servers: list[str]) -> AnyJob:
    """The job with every model served by `servers` (running servers that serve all its models)."""

    def served(model: ModelSpec) -> ModelSpec:
        return model.model_copy(update={"servers": list(servers), "local": None})

    if isinstance(spec, PipelineSpec):
        return spec.model_copy(update={"stages": [s.model_copy(update={"model": served(s.model)}) if s.model else s
                                                  for s in spec.stages]})
    if isinstance(spec, SweepSpec):
        return spec.model_copy(update={"models": [served(m) for m in spec.models]})
    return spec.model_copy(update={"model": served(spec.model)})


def tools_of(spec: AnyJob) -> list[tuple[str, list[str]]]:
    """(stage name, command) of every tool stage: what runs on the coordinator's own host."""
    if isinstance(spec, PipelineSpec):
        return [(stage.name, list(stage.command)) for stage in spec.stages if stage.command]
    return []


def paths_of(spec: AnyJob) -> Iterator[tuple[str, str]]:
    """(field, path) of every file the job reads or writes: what a service's policy checks."""
    if isinstance(spec, SweepSpec):
        for index, source in enumerate(spec.sources):
            yield from _each_path(f"sources[{index}].path", source.path)
        yield "output.dir", spec.output.dir
    else:
        yield from _each_path("input.path", spec.input.path)
        yield "output.path", spec.output.path
        if spec.output.parts:
            yield "output.parts", spec.output.parts
    if isinstance(spec, InContextSpec):
        yield from _each_path("prompt.path", spec.prompt.path)
        if isinstance(spec.control, InputSpec):
            yield from _each_path("control.path", spec.control.path)
    if spec.job_dir:
        yield "job_dir", spec.job_dir


def _each_path(field: str, path: str | list[str]) -> Iterator[tuple[str, str]]:
    """(field, path) of one input path, or (field[i], path) of each file of a list."""
    if isinstance(path, str):
        yield field, path
    else:
        yield from ((f"{field}[{index}]", item) for index, item in enumerate(as_list(path)))


def json_schema() -> dict[str, Any]:
    """One schema for every kind: a job file is any one of them."""
    from pydantic import TypeAdapter

    return TypeAdapter(AnyJob).json_schema()
