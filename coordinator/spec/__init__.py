"""The job file (YAML), validated into typed models; its JSON schema is `tensorfleet schema`.

Relative paths in a job file resolve against the job file's own folder, so a job runs the
same from any working directory. Errors name the field and the problem.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .input_files import as_list, check_listed, first_path, resolve_input
from .safe_yaml import SpecMalformed, SpecTooLarge, load_yaml

InputFormat = Literal["fasta", "hdf5", "h5ad", "parquet", "npy", "csv", "tsv"]
OutputFormat = Literal["hdf5", "parquet", "h5ad", "csv", "tsv"]

_INPUT_SUFFIXES: dict[str, str] = {
    ".fasta": "fasta", ".fa": "fasta", ".faa": "fasta", ".fna": "fasta",
    ".h5": "hdf5", ".hdf5": "hdf5", ".h5ad": "h5ad",
    ".parquet": "parquet", ".pq": "parquet", ".npy": "npy", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
}
#: Compression suffixes looked through to find the format: proteins.fa.gz is FASTA (gzip or bgzip).
_COMPRESSED_SUFFIXES = (".gz", ".bgz")
_OUTPUT_SUFFIXES: dict[str, str] = {
    ".h5": "hdf5", ".hdf5": "hdf5", ".h5ad": "h5ad", ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".tsv": "tsv",
}


def check_file_name(value: str, allow_empty: bool = False) -> str:
    """A name that may become a file or folder name: no separators, NUL, '.' or '..'."""
    if (not value and not allow_empty) or value in (".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError(f"'{value}' cannot be used as a name: no '/', '\\', NUL, '.' or '..'")
    return value


class SpecError(Exception):
    """A job file that cannot run as written; the message says which field and why."""


class Strict(BaseModel):
    """A spec section that refuses unknown fields (a typo is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid")


def _input_suffix(path: str) -> str:
    suffixes = [s.lower() for s in Path(path).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSED_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


class AlignSpec(Strict):
    """Gene alignment: an .h5ad input's features matched to the feature list the model declares."""

    var_column: str | None = Field(
        default=None, description="var column holding the feature names; unset: var_names (raw/X: raw.var_names)."
    )
    fill_value: float = Field(default=0.0, description="Value fed for a model feature the input lacks.")
    min_coverage: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Fail the job (exit 2) when fewer than this fraction of the model's features are in the input.",
    )


class InputSpec(Strict):
    """Where rows come from and which stored field feeds which model input."""

    path: str | list[str] = Field(
        description="Input file (FASTA, HDF5, .h5ad, parquet, .npy, CSV/TSV); or several: a list of files or a "
        "glob pattern (e.g. samples/*.fa, expanded sorted), read as one input in that order, each row's file "
        "name kept in a 'source_file' column (obs field for .h5ad). All files have the same format and fields.",
    )
    format: InputFormat | None = Field(default=None, description="Inferred from the suffix when unset.")
    ids: str | None = Field(
        default=None,
        description="Id source: HDF5 dataset, parquet column; FASTA uses headers, h5ad obs names, "
        "npy row numbers. Unset: the format's default (row numbers where there is none).",
    )
    tensors: dict[str, str] = Field(
        default_factory=dict,
        description="model input name -> stored field (FASTA: 'sequence'; HDF5: dataset path; "
        "h5ad: 'X', 'layers/NAME' or 'obsm/NAME'; parquet: column; npy: 'array'). "
        "Unset with a one-input model: the format's default field.",
    )
    duplicate_ids: Literal["error", "suffix", "first"] = Field(
        default="error",
        description="An id seen again: error (the job fails naming them), suffix (later ones become ID-1, "
        "ID-2, ... as anndata's make_unique does), first (later ones are skipped).",
    )
    over_length: Literal["truncate", "error"] = Field(
        default="truncate",
        description="A row longer than the model's declared max_length: truncate (a 'truncated' column "
        "and a count in the summary) or error (the row fails, naming its position and id).",
    )
    align: AlignSpec = Field(
        default_factory=AlignSpec,
        description="When the model declares its features: how an .h5ad input's genes are aligned to them.",
    )
    delimiter: str | None = Field(
        default=None, min_length=1, max_length=1,
        description="CSV/TSV field separator; unset: ',' for csv, tab for tsv.",
    )

    @model_validator(mode="after")
    def _infer_format(self) -> InputSpec:
        check_listed(self.path)
        if self.format is None:
            found = _INPUT_SUFFIXES.get(_input_suffix(first_path(self.path)))
            if found is None:
                raise ValueError(
                    f"cannot tell the format of '{first_path(self.path)}' from its suffix; set input.format "
                    f"to one of fasta, hdf5, h5ad, parquet, npy, csv, tsv"
                )
            others = sorted({p for p in as_list(self.path) if _INPUT_SUFFIXES.get(_input_suffix(p)) != found})
            if others:
                raise ValueError(f"input.path: {others[:3]} are not {found} like {first_path(self.path)}; "
                                 "one job reads files of one format")
            self.format = found  # type: ignore[assignment]
        return self


class LocalFleetSpec(Strict):
    """Servers the coordinator starts itself, as subprocesses, and stops when the job ends."""

    repository: str = Field(description="Model repository folder.")
    count: int | Literal["auto"] = Field(
        default=1, description="How many servers to start (1-64), or 'auto': one per visible GPU "
        "from device cuda:N on (as a torch.distributed world size would be), 1 on the CPU.",
    )
    device: str = Field(
        default="cpu", description="'cpu', 'cuda:N' (cuda:N..N+count-1 are used) or 'auto' (cuda when a GPU "
        "is visible, else cpu).",
    )
    args: list[str] = Field(default_factory=list, description="Extra server command-line arguments.")
    python: str | None = Field(
        default=None, min_length=1,
        description="The interpreter that runs the servers (a venv's or conda env's bin/python holding "
        "tensorfleet's server and this model's own dependencies); unset: the coordinator's own.",
    )
    launcher: list[str] = Field(
        default_factory=list,
        description="A prefix for the server command, e.g. [apptainer, exec, --nv, image.sif] or "
        "[conda, run, -n, env]: the servers then run `python -m tensorfleet.services ...` (or `local.python`) "
        "inside it. The coordinator checks each server's protocol version once it is up.",
    )
    startup_timeout_s: float = Field(default=300.0, gt=0)
    max_restarts: int = Field(
        default=50, ge=0, le=1000,
        description="Times each server is started again on its port after it dies mid-job (a crash on a "
        "bad row, the OOM killer); 0: never. Finding a row that kills servers takes about policy.retries "
        "+ 2 + log2(batch rows) deaths. A server that dies again while loading is not restarted.",
    )

    @field_validator("count")
    @classmethod
    def _count_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError(f"count {value}: start 1 to 64 servers, or write 'auto'")
        return value


class ModelSpec(Strict):
    name: str = Field(min_length=1, max_length=128,
                      description="Model name as the servers know it (no path separators, not '.' or '..').")
    version: str = Field(default="", max_length=64)
    servers: list[str] = Field(
        default_factory=list,
        description="Running servers: host:port, dns:NAME:PORT (every address NAME resolves to, "
        "re-resolved while the job runs) or hostfile:PATH (one host:port per line, re-read).",
    )
    local: LocalFleetSpec | None = None
    token: str | None = Field(default=None, description="Bearer token for the servers, if any.")
    parameters: dict[str, bool | int | float | str] = Field(
        default_factory=dict,
        description="Open Inference Protocol request parameters sent with every request of this job (e.g. "
        "diffusion steps); a python backend's predict receives them as `parameters`.",
    )

    @field_validator("name", "version")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return check_file_name(value, allow_empty=True)

    @field_validator("servers")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        from .server_entry import DiscoveryError, check_entry

        for address in value:
            try:
                check_entry(address)
            except DiscoveryError as error:
                raise ValueError(str(error)) from None
        return value

    @field_validator("parameters")
    @classmethod
    def _parameter_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(name for name in value if name.startswith("tensorfleet.") or not name)
        if "trust_remote_code" in value:
            raise ValueError("parameters.trust_remote_code: a job cannot allow a checkpoint's own code; the "
                             "operator sets transformers.trust_remote_code in the model's config.yaml")
        if reserved:
            raise ValueError(f"parameters {reserved}: names starting with 'tensorfleet.' are the coordinator's own")
        return value

    @model_validator(mode="after")
    def _one_fleet(self) -> ModelSpec:
        if bool(self.servers) == bool(self.local):
            raise ValueError("give exactly one of model.servers (running servers) or model.local")
        return self


class OutputSpec(Strict):
    path: str
    format: OutputFormat | None = Field(default=None, description="Inferred from the suffix when unset.")
    tensors: dict[str, str] = Field(
        default_factory=dict,
        description="model output name -> stored name (dataset, column, obsm key). Unset: all outputs.",
    )
    dtype: Literal["float32", "float16"] | None = Field(
        default=None, description="Stored dtype for floating outputs; unset keeps the model's."
    )
    compression: Literal["gzip", "lzf", "zstd", "snappy"] | None = None
    row_group_size: int = Field(default=65536, ge=1, description="parquet rows per row group.")
    h5ad_slot: Literal["obsm", "layers"] = "obsm"
    ragged: dict[str, str] = Field(
        default_factory=dict,
        description="model output -> model output holding each row's length: the first output's rows "
        "differ in length along their first axis (e.g. per-residue vectors). HDF5 only: stored flat, "
        "[total, ...], with '<name>_offsets' [rows + 1] (row i is values[offsets[i]:offsets[i+1]]).",
    )
    parts: str | None = Field(
        default=None,
        description="fsspec URL of a folder (e.g. s3://bucket/jobs/name/parts) for this job's part files; "
        "one folder per job. Unset: parts stay in the local job folder. The manifest stays local.",
    )
    per_file: bool = Field(
        default=False,
        description="With several input files: one output per input file, <output.path>/<input name>.<format> "
        "(output.path is then a folder and output.format is required), each in its file's row order.",
    )
    keep_input: list[str] = Field(
        default_factory=list,
        description="Input fields (CSV/parquet columns, HDF5 datasets, FASTA 'sequence') copied into the output "
        "beside each row's outputs, in this order, after the id (e.g. [smiles]). Not for .h5ad outputs, which "
        "keep an .h5ad input's obs whole.",
    )

    @model_validator(mode="after")
    def _infer_format(self) -> OutputSpec:
        if self.per_file and self.format is None:
            raise ValueError("output.per_file: output.path names a folder; set output.format "
                             "(hdf5, parquet, h5ad, csv or tsv)")
        if self.format is None:
            found = _OUTPUT_SUFFIXES.get(Path(self.path).suffix.lower())
            if found is None:
                raise ValueError(
                    f"cannot tell the format of '{self.path}' from its suffix; set output.format "
                    f"to one of hdf5, parquet, h5ad, csv, tsv"
                )
            self.format = found  # type: ignore[assignment]
        if self.compression in ("zstd", "snappy") and self.format != "parquet":
            raise ValueError(f"compression '{self.compression}' is for parquet; HDF5 takes gzip or lzf")
        if self.ragged and self.format != "hdf5":
            raise ValueError(f"ragged outputs {sorted(self.ragged)} are stored in HDF5 only; use an .h5 output")
        if self.parts is not None and ("://" not in self.parts or self.parts.startswith("file://")):
            raise ValueError(
                f"output.parts '{self.parts}' must be an object-store URL (s3://bucket/prefix, gs://...); "
                "leave it unset to keep parts in the local job folder"
            )
        if self.compression == "lzf" and self.format == "parquet":
            raise ValueError("parquet takes compression gzip, zstd or snappy")
        if self.compression and self.format in ("csv", "tsv"):
            raise ValueError("csv/tsv outputs are written uncompressed; unset output.compression")
        if self.keep_input:
            from .output_options import check_keep_input

            check_keep_input(self.keep_input, self.format)
        return self


class ChunkingSpec(Strict):
    """How rows are grouped: into requests (computed together) and chunks (checkpointed together)."""

    batch_rows: int | None = Field(
        default=None, ge=1, description="Rows per request; unset: the model's max_batch_size (<= 64)."
    )
    token_budget: int | None = Field(
        default=None, ge=1, description="Cap rows x longest row per request (ragged/BYTES inputs)."
    )
    chunk_rows: int = Field(default=1024, ge=1, description="About this many rows per part file.")


class PolicySpec(Strict):
    window: int = Field(default=4, ge=1, description="Requests in flight per server.")
    retries: int = Field(
        default=3, ge=0, description="Times a chunk may be lost with a dead server before its requests go one "
        "at a time, halved at each death down to the row that kills servers, which alone fails."
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="A request unanswered this long marks its server stalled."
    )
    on_row_error: Literal["record", "fail"] = Field(
        default="record", description="record: errors table and exit 1; fail: stop with exit 2."
    )
    server_wait_s: float = Field(
        default=60.0, gt=0, description="Give up (exit 2) after this long with no server reachable."
    )
    shared_memory: bool = Field(
        default=True,
        description="Pass large tensors (64 KiB and up per request) through system shared memory to "
        "servers on this host (loopback addresses); false: always over gRPC.",
    )


def absolute(base: Path, path: str) -> str:
    """`path` made absolute against `base`; object-store URLs stay as they are."""
    return str((base / path).resolve()) if "://" not in path else path


def resolve_model(model: dict[str, Any], base: Path) -> None:
    """Make a dumped ModelSpec's hostfile and local repository paths absolute, in place."""
    model["servers"] = [
        "hostfile:" + absolute(base, s.removeprefix("hostfile:")) if s.startswith("hostfile:") else s
        for s in model.get("servers") or []
    ]
    if model.get("local"):
        model["local"]["repository"] = absolute(base, model["local"]["repository"])
        python = model["local"].get("python")
        if python and ("/" in python or python.startswith(".")):  # a path, not a name on PATH
            model["local"]["python"] = str(Path(base, python).absolute())


class JobSpec(Strict):
    name: str = Field(default="job", max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    input: InputSpec
    model: ModelSpec
    output: OutputSpec
    chunking: ChunkingSpec = Field(default_factory=ChunkingSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    job_dir: str | None = Field(default=None, description="Checkpoint folder; default <output>.tfjob")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return check_file_name(value)

    @model_validator(mode="after")
    def _h5ad_keeps_obs_names(self) -> JobSpec:
        if self.input.format == "h5ad" and self.output.format == "h5ad" and self.input.duplicate_ids != "error":
            raise ValueError(
                f"input.duplicate_ids '{self.input.duplicate_ids}': an .h5ad output keeps the input's obs names; "
                "make them unique first (adata.obs_names_make_unique()) or write hdf5/parquet"
            )
        return self

    def resolved(self, base: Path) -> JobSpec:
        """A copy with every relative path made absolute against `base`."""
        data = self.model_dump()
        data["input"]["path"] = resolve_input(base, data["input"]["path"])
        data["output"]["path"] = absolute(base, data["output"]["path"])
        resolve_model(data["model"], base)
        if data["job_dir"]:
            data["job_dir"] = absolute(base, data["job_dir"])
        return JobSpec.model_validate(data)

    def digest(self) -> str:
        """sha256 of the canonical spec: provenance for the output file."""
        return hashlib.sha256(
            json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest()


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)


def parse_spec(raw: Any, source: str = "job") -> JobSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping (input, model, output, ...) at the top level")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(format_validation_error(error, source)) from None


def read_job_file(path: Path) -> Any:
    """A job file's YAML (or JSON) as data, bounded in size and aliases (safe_yaml.py)."""
    if not path.is_file():
        raise SpecError(f"{path}: no such job file")
    try:
        return load_yaml(path.read_bytes(), str(path))
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    except (SpecTooLarge, SpecMalformed) as error:
        raise SpecError(str(error)) from None


def load_spec(path: Path | str) -> JobSpec:
    """Read a job file, validate it, and resolve its paths against its folder."""
    path = Path(path)
    try:
        return parse_spec(read_job_file(path), str(path)).resolved(path.resolve().parent)
    except ValidationError as error:
        raise SpecError(format_validation_error(error, str(path))) from None
    except ValueError as error:  # a glob pattern that matches no file (input_files.py)
        raise SpecError(f"{path}: {error}") from None


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()
