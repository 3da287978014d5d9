"""The settings and plan phases: fit the input to the model, settle the run's settings, then make
the plan (a fresh run) or check the resume against the manifest (the same settings, the same
inputs). Every check that can fail on the inputs runs here, before any server starts; a failure is
JobFatal with a message that says what to fix.
"""

from __future__ import annotations

from pathlib import Path

from ..fleet.model_fleet import ModelFleet
from ..fleet.model_info import ModelInfo
from ..io.readers import InputError, Reader
from ..spec import JobSpec
from ..spec.errors import JobFatal
from .adapt import AlignmentError, InputReport, adapt_input
from .manifest import Manifest
from .output_checks import check_output_slots
from .planner import PLAN_PRODUCTS, Plan, PlanError, PlanSettings, fingerprint, plan_with
from .run_types import Adapted, RunContext, RunResult
from .source import FieldMappingError, resolve_fields


def batching(spec: JobSpec, info: ModelInfo) -> tuple[int, int | None]:
    batch_rows = spec.chunking.batch_rows or min(info.max_batch_size, 64)
    if batch_rows > info.max_batch_size:
        raise JobFatal(
            f"chunking.batch_rows {batch_rows} exceeds model '{info.name}' max_batch_size "
            f"{info.max_batch_size}; lower chunking.batch_rows"
        )
    return batch_rows, spec.chunking.token_budget or info.token_budget or None


def checked_fields(spec: JobSpec, reader: Reader, info: ModelInfo) -> dict[str, str]:
    """Model input -> input field, checked (and the stored outputs checked) against the model."""
    try:
        fields = resolve_fields(spec.input.tensors, reader, info.inputs, info.optional_inputs)
    except FieldMappingError as error:
        raise JobFatal(str(error)) from None
    stored_outputs(spec, info)  # checked before anything is planned or sent
    return fields


def stored_outputs(spec: JobSpec, info: ModelInfo) -> list[str] | None:
    """The outputs the job keeps (output.tensors and the lengths of its ragged ones); only
    these are asked for, so an output nobody stores (per-residue states beside a mean) is
    neither sent nor written to parts. None: the job keeps every output."""
    if not spec.output.tensors:
        return None
    wanted = [*spec.output.tensors, *(v for v in spec.output.ragged.values() if v not in spec.output.tensors)]
    unknown = [name for name in wanted if name not in info.outputs]
    if unknown:
        raise JobFatal(
            f"output.tensors / output.ragged name {unknown}, which model '{info.name}' does not return "
            f"(it returns: {sorted(info.outputs)})"
        )
    return wanted


def adapt_reader(spec: JobSpec, reader: Reader, info: ModelInfo) -> tuple[Reader, InputReport]:
    try:
        return adapt_input(spec, reader, info)
    except (AlignmentError, InputError) as error:
        raise JobFatal(str(error)) from None


def adapt_run(ctx: RunContext, info: ModelInfo) -> Adapted:
    """Fit the run's readers to the model once (duplicate ids, over-length rows, gene alignment),
    and make the prompt of an in-context run for it."""
    reader, report = adapt_reader(ctx.spec, ctx.reader, info)
    plan_reader = adapt_reader(ctx.spec, ctx.plan_reader, info)[0] if ctx.plan_reader is not None else None
    context = ctx.hooks.context
    if callable(context):
        try:
            context = context(info, report)
        except AlignmentError as error:
            raise JobFatal(str(error)) from None
    return Adapted(reader, plan_reader, report, context)


def plan_settings(spec: JobSpec, reader: Reader, info: ModelInfo, limit: int | None) -> PlanSettings:
    """The run's settings (fields, batching, rows, parameters): one definition for a fresh run's
    plan and a resume's check."""
    fields = checked_fields(spec, reader, info)
    batch_rows, token_budget = batching(spec, info)
    rows = reader.num_rows if limit is None else min(limit, reader.num_rows)
    return PlanSettings(rows, batch_rows, token_budget, spec.chunking.chunk_rows, limit, fields,
                        dict(spec.model.parameters))


def plan_run(spec: JobSpec, reader: Reader, info: ModelInfo, limit: int | None) -> tuple[Plan, dict[str, str]]:
    """The one plan of a run, with every check that can fail on the inputs (fields, shapes,
    stored outputs, batch size, duplicate ids); needs the model's description, no server."""
    if reader.num_rows == 0:
        raise JobFatal(f"input {spec.input.path} has no rows")
    settings = plan_settings(spec, reader, info, limit)
    try:
        plan = plan_with(reader, settings)
    except PlanError as error:
        raise JobFatal(str(error)) from None
    return plan, settings.fields


def describe_plan(spec: JobSpec, fleet: ModelFleet, reader: Reader, limit: int | None, output: Path, job_dir: Path,
                  *, reads_input: bool = True, writes_output: bool = True) -> RunResult:
    """--dry-run: the plan as text; nothing started (a local fleet's model is read from its config).
    `reads_input` / `writes_output`: this run reads the job's input / writes its output, so their
    slots are checked (engine/output_checks.py), as a run checks them."""
    info = fleet.info(wait_s=10.0)
    reader, report = adapt_reader(spec, reader, info)
    plan, _ = plan_run(spec, reader, info, limit)
    check_output_slots(spec, reader, info, reads_input=reads_input, writes_output=writes_output)
    text = "\n".join(
        [
            f"job: {spec.name} (dry run: nothing computed, nothing written)",
            f"model: {info.name} version {info.version} (max_batch_size {info.max_batch_size}) on {fleet.describe()}",
            plan.describe(),
            *report.lines,
            f"output: {output} ({spec.output.format})",
            f"job folder: {job_dir}",
        ]
    )
    return RunResult(None, job_dir, plan.settings.rows, 0, 0, 0.0, plan_text=text)


# --- the resume checks -------------------------------------------------------------------------------
def check_inputs(manifest: Manifest) -> None:
    for stored in manifest.inputs():
        path = Path(stored.path)
        if not path.is_file():
            raise JobFatal(f"input {path} is gone since this job began; restore it, or --restart with a new input")
        now = fingerprint(path)
        if (now.size, now.sha256) != (stored.size, stored.sha256):
            raise JobFatal(
                f"input {path} changed since this job began (size {stored.size} -> {now.size}, "
                f"sha256 {stored.sha256[:12]} -> {now.sha256[:12]}); its committed chunks came from the old "
                f"file. Restore the old file to --resume, or run with --restart to start over"
            )


def check_resume(manifest: Manifest, settings: PlanSettings) -> None:
    """The settings are those the manifest's chunks were planned with (its plan's products, the
    ids digest, are the merge's to check)."""
    stored = {k: v for k, v in manifest.plan_settings().items() if k not in PLAN_PRODUCTS}
    now = settings.as_dict()
    changed = [
        f"{key} {stored.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(now) | set(stored))
        if stored.get(key) != now.get(key)
    ]
    if changed:
        raise JobFatal(
            "the job changed since it began (" + "; ".join(changed) + "); "
            "run with --restart to start over with the new settings"
        )


def check_build(manifest: Manifest, info: ModelInfo) -> None:
    """The served model is the build the done chunks came from (checked only when chunks remain)."""
    model = manifest.meta("model") or {}
    if model and model.get("model_artifact_sha256") != info.artifact_sha256:
        raise JobFatal(
            f"the servers now serve a different build of model '{info.name}' (sha256 "
            f"{str(model.get('model_artifact_sha256'))[:12]} -> {info.artifact_sha256[:12]}) than the chunks "
            f"already done; serve the old build to --resume, or --restart"
        )


def finished_unchanged(ctx: RunContext, manifest: Manifest) -> bool:
    """Every chunk done and the spec as it was: nothing to check against a model."""
    counts = manifest.counts()
    settings = manifest.plan_settings()
    return (
        counts["chunks"] == counts["chunks_done"]
        and manifest.meta("spec_sha256") == ctx.spec.digest()
        and settings.get("limit") == ctx.options.limit
    )
