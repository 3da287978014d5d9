"""What a multi-stage job's tool stage declares: a command run over one chunk of rows at a time.

DPAM's steps are mostly outside tools (Foldseek, DALI, HHsuite) that want a whole batch of
structures at once and write one result file. A tool stage writes a chunk's rows into a scratch
folder (`write`), runs `command` once over it, and reads the tool's output file back by id
(`read`). The placeholders `{inputs}` (the written folder or file), `{outputs}` (an empty folder
for the tool's results), `{scratch}` (the chunk's folder, also the working directory), `{chunk}`
(the chunk's number) and `{threads}` (the stage's `threads`) may appear inside any argument.

The command is an argv list, never a shell line. Its first item is the executable: a path
(relative ones resolve against the job file's folder) or a name found on PATH when the job is
read; the coordinator service runs only the executables its operator allow-listed
(`--allow-tool`, docs/security.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from . import Strict, check_file_name

#: Placeholders a command's arguments may hold.
PLACEHOLDERS = ("{inputs}", "{outputs}", "{scratch}", "{chunk}", "{threads}")
#: Output datatypes a tool's columns may be read as.
ToolDatatype = Literal["FP32", "FP64", "INT32", "INT64", "BYTES"]


class ToolWriteSpec(Strict):
    """How a chunk's rows are handed to the tool."""

    format: Literal["files", "fasta", "tsv"] = Field(
        default="files",
        description="files: one file per row in the folder {inputs}, named <id><suffix>, holding the field's "
        "value (bytes as they are, numbers as .npy); fasta: one FASTA file {inputs} ('>id' then the sequence); "
        "tsv: one table {inputs} with an 'id' column and one column per field (vectors as FIELD_0, FIELD_1, ...).",
    )
    fields: list[str] = Field(
        min_length=1, description="The stage's input fields written: previous stage outputs, 'input:FIELD' or "
        "'STAGE:OUTPUT' (files and fasta: exactly one).",
    )
    suffix: str = Field(default="", max_length=32, description="files: each row's file name is <id><suffix>.")
    name: str | None = Field(default=None, max_length=128,
                             description="fasta/tsv: the file's name in the scratch folder (default inputs.fasta / inputs.tsv).")

    @field_validator("suffix")
    @classmethod
    def _plain_suffix(cls, value: str) -> str:
        if any(c in value for c in "/\\\0"):
            raise ValueError(f"suffix '{value}' may not hold '/', '\\' or NUL")
        return value

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        return value if value is None else check_file_name(value)

    @model_validator(mode="after")
    def _one_field(self) -> ToolWriteSpec:
        if self.format in ("files", "fasta") and len(self.fields) != 1:
            raise ValueError(f"write.format {self.format} writes one field per row; got fields {self.fields}")
        return self

    @property
    def file_name(self) -> str:
        return self.name or {"fasta": "inputs.fasta", "tsv": "inputs.tsv"}.get(self.format, "inputs")


class ToolReadSpec(Strict):
    """How the tool's results are read back, keyed by the rows' ids."""

    format: Literal["tsv", "csv", "parquet", "npy"] = Field(
        default="tsv", description="tsv/csv/parquet: one table in {outputs}, one row per input row (several with "
        "fan_out), matched by id_column; npy: one file per row, `name` holding '{id}'.",
    )
    name: str = Field(max_length=256, description="The result file in {outputs} (npy: a pattern with '{id}').")
    id_column: str = Field(default="id", description="tsv/csv/parquet: the column holding each result row's id.")
    header: bool = Field(default=True, description="tsv/csv: the first line names the columns.")
    columns: list[str] = Field(default_factory=list,
                               description="tsv/csv without a header: the columns' names, in order.")
    outputs: dict[str, str | list[str]] = Field(
        min_length=1, description="stage output -> column (a scalar per row) or columns (a vector per row); "
        "npy: {OUTPUT: array}.",
    )
    datatypes: dict[str, ToolDatatype] = Field(default_factory=dict,
                                               description="stage output -> datatype; default FP32.")
    shapes: dict[str, list[int]] = Field(default_factory=dict, description="npy: each output's row shape.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return check_file_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> ToolReadSpec:
        unknown = sorted((set(self.datatypes) | set(self.shapes)) - set(self.outputs))
        if unknown:
            raise ValueError(f"read.datatypes/shapes name {unknown}, which are not in read.outputs")
        if self.format == "npy":
            if "{id}" not in self.name or len(self.outputs) != 1:
                raise ValueError("read.format npy reads one output from one file per row: name holds '{id}' "
                                 "(e.g. '{id}.npy') and outputs one entry")
            if not self.shapes:
                raise ValueError("read.format npy: give each output's row shape in read.shapes")
            if any(d < 1 for shape in self.shapes.values() for d in shape):
                raise ValueError("read.shapes: every dimension is a fixed size >= 1")
        elif not self.header and not self.columns:
            raise ValueError("read.header false: name the file's columns in read.columns")
        return self

    def declared(self) -> dict[str, tuple[str, list[int]]]:
        """output -> (datatype, row shape), as a model's metadata would say."""
        out = {}
        for name, columns in self.outputs.items():
            shape = self.shapes.get(name) or ([len(columns)] if isinstance(columns, list) else [])
            out[name] = (self.datatypes.get(name, "FP32"), list(shape))
        return out


def resolve_command(command: list[str], base: Path) -> list[str]:
    """The command with its executable made absolute: a path against `base`, a bare name through PATH
    (left as it is when not found: the run then says so)."""
    program = command[0]
    if "/" in program:
        resolved = str((base / program).absolute()) if not Path(program).is_absolute() else program
    else:
        resolved = shutil.which(program) or program
    return [resolved, *command[1:]]


def executable_problem(program: str) -> str:
    """Why `program` cannot run as a tool ('' when it can)."""
    if not Path(program).is_absolute():
        return f"'{program}' is not on PATH"
    if not Path(program).is_file():
        return f"{program} does not exist"
    if not os.access(program, os.X_OK):
        return f"{program} is not executable (chmod +x)"
    return ""


def check_tool_stage(stage) -> None:  # noqa: ANN001 - a kinds.StageSpec (imported there, not here)
    """A stage is a model stage or a tool stage, and its fan-out names an output it has."""
    where = f"stage {stage.name}"
    if (stage.model is None) == (stage.command is None):
        raise ValueError(f"{where}: give exactly one of model (a model stage) or command (a tool stage)")
    if stage.command is None:
        if stage.write is not None or stage.read is not None:
            raise ValueError(f"{where}: write/read describe a tool stage's files; this stage has a model")
        if stage.fan_out and stage.fan_out not in stage.ragged:
            raise ValueError(f"{where}: fan_out '{stage.fan_out}' needs its per-row count: "
                             f"ragged: {{{stage.fan_out}: OUTPUT_HOLDING_THE_COUNT}}")
        return
    if stage.read is None:
        raise ValueError(f"{where}: a tool stage needs `read` (the file its tool writes and the columns to keep)")
    if stage.write is None:
        raise ValueError(f"{where}: a tool stage needs `write` (how its rows are handed to the tool)")
    if any(not part or "\0" in part for part in stage.command):
        raise ValueError(f"{where}: command items must be non-empty and hold no NUL")
    if stage.tensors:
        raise ValueError(f"{where}: a tool stage names what it reads in write.fields, not tensors")
    if stage.fan_out and stage.fan_out not in stage.read.outputs:
        raise ValueError(f"{where}: fan_out '{stage.fan_out}' is not one of read.outputs {sorted(stage.read.outputs)}")
    if stage.ragged:
        raise ValueError(f"{where}: a tool stage's outputs are one value per row; with fan_out each result row is "
                         "one child (no ragged)")


def fan_out_count(stage) -> str | None:  # noqa: ANN001
    """The output holding each row's number of children: declared (model) or `<fan_out>_count` (tool)."""
    if not stage.fan_out:
        return None
    return stage.ragged[stage.fan_out] if stage.command is None else f"{stage.fan_out}_count"
