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

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tensorfleet.core.hashing import file_sha256

from ..engine.adapt import InputReport, align_field, has_feature_axis
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
    run_one,
    up_to_date,
)
from ..engine.manifest import MANIFEST_NAME
from ..engine.status import open_workflow_folder
from ..fleet.model_fleet import ModelFleet
from ..fleet.model_info import ModelInfo
from ..io.output_files import OutputFolder
from ..spec import InputSpec, JobSpec
from ..spec.kinds import InContextSpec

KIND = "in-context"


def read_prompt(spec: InputSpec, info: ModelInfo | None = None, report: InputReport | None = None) -> dict[str, np.ndarray]:
    """Every row of the prompt's mapped fields, as model-input arrays. Given the model's
    description, a field that feeds an input the model's feature list describes is aligned to
    it by gene name, as the query is (the prompt's genes may come in another order)."""
    if not spec.tensors:
        raise JobFatal(f"prompt {spec.path}: set tensors (context input -> field)")
    with open_input(spec) as opened:
        reader = opened
        out = {}
        for name, field in spec.tensors.items():
            if field not in reader.fields():
                raise JobFatal(f"prompt {spec.path}: no field '{field}' (has {sorted(reader.fields())})")
            if info is not None and has_feature_axis(info, name) and hasattr(reader, "feature_names"):
                reader = align_field(spec.align, reader, field, info, report or InputReport(), label=f"prompt {spec.path}: ")
            out[name] = np.ascontiguousarray(reader.read(field, 0, reader.num_rows), dtype=np.float32)
            if info is not None:
                _check_prompt_tensor(spec, info, name, field, out[name])
        return out


def _check_prompt_tensor(spec: InputSpec, info: ModelInfo, name: str, field: str, values: np.ndarray) -> None:
    """Before any server starts: a prompt the model cannot take would fail every stream."""
    if name not in info.inputs:
        raise JobFatal(f"prompt {spec.path}: tensors name '{name}', which model '{info.name}' does not take "
                       f"(its inputs: {sorted(info.inputs)})")
    want = info.inputs[name][1]
    have = list(values.shape[1:])
    if len(have) != len(want) or any(w not in (-1, h) for w, h in zip(want, have, strict=False)):
        raise JobFatal(f"prompt {spec.path}: field '{field}' has rows of {have}; model '{info.name}' input '{name}' "
                       f"takes rows of {want}")


def _prompt_context(job: str, run: str, spec: InputSpec) -> Callable[[ModelInfo, InputReport], tuple[str, dict[str, np.ndarray]]]:
    """The run's context, made once the model's description is known (its gene list)."""
    return lambda info, report: (_context_id(job, run, spec), read_prompt(spec, info, report))


def _context_id(job: str, run: str, spec: InputSpec) -> str:
    digest = file_sha256(spec.path)[:16]
    return f"{job}.{run}.{digest}"


def locations(spec: InContextSpec, options: RunOptions) -> tuple[Path, Path]:
    """(final output, job folder)."""
    output = final_output_path(spec, options.limit)  # type: ignore[arg-type]
    job_dir = options.job_dir.resolve() if options.job_dir else default_job_dir(spec, output)  # type: ignore[arg-type]
    return output, job_dir


def _runs(spec: InContextSpec) -> list[tuple[str, InputSpec]]:
    return [("prompt", spec.prompt)] + ([("control", spec.control)] if isinstance(spec.control, InputSpec) else [])


def _sub_job(spec: InContextSpec, run: str, run_dir: Path) -> JobSpec:
    parts = f"{spec.output.parts.rstrip('/')}/{run}" if spec.output.parts else None
    return JobSpec(
        name=f"{spec.name}.{run}", input=spec.input, model=spec.model,
        output=spec.output.model_copy(
            update={"path": str(run_dir / f"predictions{Path(spec.output.path).suffix}"), "parts": parts}
        ),
        chunking=spec.chunking, policy=spec.policy, job_dir=str(run_dir),
    )


def run_incontext(spec: InContextSpec, options: RunOptions) -> RunResult:
    output, job_dir = locations(spec, options)
    runs = _runs(spec)
    if options.dry_run:
        return dry_run_incontext(spec, options, output, job_dir)
    open_workflow_folder(job_dir, {
        "kind": KIND, "name": spec.name, "output": str(output),
        "parts": [{"label": f"{run} run", "model": spec.model.name, "dir": run} for run, _ in runs],
    }, restart=options.restart, resume=options.resume)
    started = time.monotonic()
    fleet = ModelFleet(spec.model, job_dir / "servers", spec.policy.server_wait_s)
    results: list[tuple[str, RunResult]] = []
    try:
        for run, prompt in runs:
            run_dir = job_dir / run
            sub = _sub_job(spec, run, run_dir)
            context = _prompt_context(spec.name, run, prompt)
            with open_input(spec.input) as reader:
                sub_options = RunOptions(job_dir=run_dir, resume=(run_dir / MANIFEST_NAME).is_file(), limit=options.limit,
                                         retry_failed=options.retry_failed, shard=options.shard,
                                         progress_stream=options.progress_stream)
                ctx = RunContext(sub, reader, sub_options, final_output_path(sub, options.limit), run_dir, fleet,
                                 StageHooks(context=context))
                try:
                    result = run_one(ctx)
                except JobFatal as error:
                    raise JobFatal(f"{run} run: {error}") from None
            results.append((run, result))
    finally:
        fleet.stop()
    if options.shard is not None and not options.shard.final:  # combined once every shard is done (sharded.py)
        return RunResult(None, job_dir, sum(r.rows for _, r in results), sum(r.rows_failed for _, r in results),
                         sum(r.rows_computed for _, r in results), time.monotonic() - started)
    if any(r.rows_computed for _, r in results) or not up_to_date(output, [r.output for _, r in results]):
        _combine(output, results, spec)
    first = results[0][1]
    return RunResult(
        output, job_dir, first.rows, sum(r.rows_failed for _, r in results), sum(r.rows_computed for _, r in results),
        time.monotonic() - started, columns=first.columns, servers=sorted({s for _, r in results for s in r.servers}),
        notes=[f"{run} run: {line}" for run, result in results for line in result.notes],
    )


def dry_run_incontext(spec: InContextSpec, options: RunOptions, output: Path, job_dir: Path) -> RunResult:
    """Each run (prompt, and control) planned: the prompt read and checked, the query's rows cut; nothing started."""
    fleet = ModelFleet(spec.model, job_dir / "servers", spec.policy.server_wait_s)
    lines = [f"job: {spec.name} (dry run: nothing computed, nothing written)",
             f"in-context: {len(_runs(spec))} run(s), control: {'the query' if spec.control == 'query' else spec.control.path}"]
    rows = 0
    for run, prompt in _runs(spec):
        tensors = read_prompt(prompt)
        sub = _sub_job(spec, run, job_dir / run)
        with open_input(spec.input) as reader:
            plan = describe_plan(sub, fleet, reader, options.limit, output, job_dir / run)
        rows = plan.rows
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
        lines.append(f"{run} run: prompt {prompt.path} ({shapes}), sent once per server stream")
        lines += [f"  {line}" for line in plan.plan_lines("model:", "fields:")]
    lines += [f"output: {output} ({spec.output.format})", f"job folder: {job_dir}"]
    return RunResult(None, job_dir, rows, 0, 0, 0.0, plan_text="\n".join(lines))


def _combine(output: Path, results: list[tuple[str, RunResult]], spec: InContextSpec) -> None:
    """One file: the prompt run's file, plus the control run's outputs as `<name>_control`."""
    import anndata

    first = results[0][1].output
    assert first is not None
    if output.suffix != ".h5ad":
        if len(results) > 1:
            raise JobFatal("a synthetic control is written into .h5ad output only; set output.path to a .h5ad file")
        with OutputFolder(output.parent) as folder:  # checked and held open; never replaces a file we did not write
            folder.check_replaceable(output.name)
            shutil.copyfile(first, folder.at(f".{output.name}.partial"))
            folder.replace(f".{output.name}.partial", output.name)
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
        # the control run's own provenance (its prompt, that prompt's alignment), beside the prompt run's
        adata.uns.setdefault("tensorfleet", {})[f"provenance_{run}"] = dict(
            other.uns.get("tensorfleet", {}).get("provenance", {}))
    with OutputFolder(output.parent) as folder:
        folder.check_replaceable(output.name)
        temp = folder.at(f".{output.stem}.partial{output.suffix}")
        adata.write_h5ad(temp)
        folder.replace(temp.name, output.name)
