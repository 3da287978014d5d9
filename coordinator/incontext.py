"""In-context jobs (the STACK pipeline): query cells predicted in the context of prompt cells.

The prompt is read once and put on each server once per stream (`tensorfleet.context_put`,
see docs/protocol.md); every request carries only its query rows and the context id. Control
strategies, both written by one job into one `.h5ad` that keeps the query's obs and var:
- `control: query` (default): one run with the prompt; the query itself is the control.
- `control: {path: ...}`: a second, paired run of the same query rows with a control prompt;
  its predictions are stored beside the prompt's under `<name>_control`.
Each run is an ordinary checkpointed run in `<job dir>/<run>/`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from .job import JobFatal, RunOptions, RunResult, _run, default_job_dir, final_output_path
from .local_fleet import LocalFleet, LocalFleetError
from .manifest import MANIFEST_NAME
from .pipeline import _absolute, resolve_model
from .progress import write_json_atomic
from .readers import InputError, open_reader
from .spec import ChunkingSpec, InputSpec, JobSpec, ModelSpec, OutputSpec, PolicySpec, _Strict

MARKER = "incontext.json"


class InContextSpec(_Strict):
    name: str = Field(default="incontext", pattern=r"^[A-Za-z0-9_.\-]+$")
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

    def resolved(self, base: Path) -> InContextSpec:
        data = self.model_dump()
        for key in ("input", "prompt", "output"):
            data[key]["path"] = _absolute(base, data[key]["path"])
        if isinstance(data["control"], dict):
            data["control"]["path"] = _absolute(base, data["control"]["path"])
        resolve_model(data["model"], base)
        if data["job_dir"]:
            data["job_dir"] = _absolute(base, data["job_dir"])
        return InContextSpec.model_validate(data)


def read_prompt(spec: InputSpec, datatypes: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Every row of the prompt's mapped fields, as model-input arrays."""
    if not spec.tensors:
        raise JobFatal(f"prompt {spec.path}: set tensors (context input -> field)")
    try:
        reader = open_reader(spec)
    except InputError as error:
        raise JobFatal(str(error)) from None
    with reader:
        out = {}
        for name, field in spec.tensors.items():
            if field not in reader.fields():
                raise JobFatal(f"prompt {spec.path}: no field '{field}' (has {sorted(reader.fields())})")
            out[name] = np.ascontiguousarray(reader.read(field, 0, reader.num_rows), dtype=np.float32)
        return out


def _context_id(job: str, run: str, spec: InputSpec) -> str:
    digest = hashlib.sha256(Path(spec.path).read_bytes()).hexdigest()[:16]
    return f"{job}.{run}.{digest}"


def run_incontext(spec: InContextSpec, options: RunOptions) -> RunResult:
    if options.dry_run:
        raise JobFatal("--dry-run is not supported for in-context jobs yet")
    output = final_output_path(spec, options.limit)  # type: ignore[arg-type]
    job_dir = options.job_dir.resolve() if options.job_dir else default_job_dir(spec, output)  # type: ignore[arg-type]
    marker = job_dir / MARKER
    if marker.is_file() and options.restart:
        shutil.rmtree(job_dir)
    elif marker.is_file() and not options.resume:
        raise JobFatal(f"{job_dir} already holds this job; pass --resume to continue it or --restart to start over")
    job_dir.mkdir(parents=True, exist_ok=True)
    runs = [("prompt", spec.prompt)] + ([("control", spec.control)] if isinstance(spec.control, InputSpec) else [])
    write_json_atomic(marker, {"name": spec.name, "runs": [name for name, _ in runs], "output": str(output)})
    started = time.monotonic()
    fleet: LocalFleet | None = None
    servers = list(options.servers or spec.model.servers)
    results: list[tuple[str, RunResult]] = []
    try:
        if spec.model.local is not None and not options.servers:
            local = spec.model.local
            fleet = LocalFleet(Path(local.repository), spec.model.name, local.count, local.device, job_dir / "servers", local.args)
            try:
                servers = fleet.start(local.startup_timeout_s)
            except LocalFleetError as error:
                raise JobFatal(str(error)) from None
        model = spec.model.model_copy(update={"servers": servers, "local": None})
        for run, prompt in runs:
            run_dir = job_dir / run
            sub = JobSpec(
                name=f"{spec.name}.{run}", input=spec.input, model=model,
                output=spec.output.model_copy(update={"path": str(run_dir / f"predictions{Path(spec.output.path).suffix}")}),
                chunking=spec.chunking, policy=spec.policy, job_dir=str(run_dir),
            )
            context = (_context_id(spec.name, run, prompt), read_prompt(prompt))
            try:
                reader = open_reader(spec.input)
            except InputError as error:
                raise JobFatal(str(error)) from None
            with reader:
                sub_options = RunOptions(job_dir=run_dir, resume=(run_dir / MANIFEST_NAME).is_file(), limit=options.limit,
                                         progress_stream=options.progress_stream)
                try:
                    result = _run(sub, reader, sub_options, final_output_path(sub, options.limit), run_dir, context=context)
                except JobFatal as error:
                    raise JobFatal(f"{run} run: {error}") from None
            results.append((run, result))
    finally:
        if fleet is not None:
            fleet.stop()
    _combine(output, results, spec)
    first = results[0][1]
    return RunResult(
        output, job_dir, first.rows, sum(r.rows_failed for _, r in results), sum(r.rows_computed for _, r in results),
        time.monotonic() - started, columns=first.columns, servers=servers,
    )


def _combine(output: Path, results: list[tuple[str, RunResult]], spec: InContextSpec) -> None:
    """One file: the prompt run's file, plus the control run's outputs as `<name>_control`."""
    import anndata

    first = results[0][1].output
    assert first is not None
    if output.suffix != ".h5ad":
        if len(results) > 1:
            raise JobFatal("a synthetic control is written into .h5ad output only; set output.path to a .h5ad file")
        shutil.copyfile(first, output)
        return
    adata = anndata.read_h5ad(first)
    slot = spec.output.h5ad_slot
    adata.uns["tensorfleet_control"] = "query" if len(results) == 1 else "synthetic"
    for run, result in results[1:]:
        assert result.output is not None
        other = anndata.read_h5ad(result.output)
        if list(other.obs_names) != list(adata.obs_names):
            raise JobFatal(f"the {run} run's rows differ from the prompt run's")
        for key, values in getattr(other, slot).items():
            getattr(adata, slot)[f"{key}_{run}"] = values
        for key in ("tensorfleet_ok", "tensorfleet_error"):
            if key in other.obs:
                adata.obs[f"{key}_{run}"] = other.obs[key].values
    temp = output.with_name(f".{output.stem}.partial{output.suffix}")
    output.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(temp)
    os.replace(temp, output)
