"""One model over one input, as a short sequence of phases, each taking the frozen result of the one
before (the hand-offs are in run_types.py):

    settings   adapt the input to the model, settle fields/batching/rows  (plan_phase.py)
    plan       a fresh run: the plan; a resume: the inputs and settings checked against the manifest
    fleet      servers start only when chunks are pending; the served model is checked again
    dispatch   the pending chunks, committed as parts                    (dispatch_phase.py)
    merge      the parts into the one output                             (merge_phase.py, merge.py)

A resume of finished work is a manifest read (and a merge if its output is missing). Fatal
problems (exit 2) raise JobFatal with a message that says what to fix. Files only appear under
their final name once complete. The public pieces every job kind is built from
(coordinator/workflows/api.py puts them together) are exported here.

What only some runs need is imported where it is used: the local fleet (model.local), the
merge and the output writers (after the last chunk), the reader of the job's input format.
The first chunk is leased without them (tests/coordinator/test_lazy_imports.py).
"""

from __future__ import annotations

import contextlib
import shutil

from ..fleet.model_fleet import ModelFleet
from ..fleet.model_info import ModelInfo
from ..io.filesystems import is_disk_full
from ..io.objectstore import ObjectStoreError
from ..io.part_store import missing_parts
from ..io.readers import InputError, Reader, open_reader
from ..spec import InputSpec, JobSpec
from ..spec.errors import JobFatal
from .dispatch_phase import dispatch
from .job_dir import (
    close_progress,
    disk_full,
    new_manifest,
    prepare_job_dir,
    record_plan,
    reopen_failed_chunks,
    up_to_date,
    write_state,
)
from .manifest import Manifest, drop_damaged_parts
from .merge_phase import merge_output, provenance, unchanged_output
from .output_checks import check_output_slots
from .plan_phase import (
    adapt_run,
    check_build,
    check_inputs,
    check_resume,
    checked_fields,
    describe_plan,
    finished_unchanged,
    plan_run,
    plan_settings,
)
from .rerun import holds_server_logs
from .run_types import (
    Adapted,
    Dispatched,
    Planned,
    RunContext,
    RunOptions,
    RunResult,
    Serving,
    StageHooks,
    default_job_dir,
    final_output_path,
)
from .shard_plan import slice_plan, write_record

__all__ = [
    "JobFatal", "RunContext", "RunOptions", "RunResult", "StageHooks", "default_job_dir", "describe_plan",
    "final_output_path", "open_input", "plan_run", "reopen_failed_chunks", "run_one", "run_plain", "up_to_date",
]


def open_input(spec: InputSpec) -> Reader:
    try:
        return open_reader(spec)
    except InputError as error:
        raise JobFatal(str(error)) from None


def run_plain(spec: JobSpec, options: RunOptions) -> RunResult:
    """A plain job: one model over one input (or, with options.dry_run, its plan)."""
    output = final_output_path(spec, options.limit)
    job_dir = options.job_dir.resolve() if options.job_dir else default_job_dir(spec, output)
    fleet = ModelFleet(spec.model, job_dir / "servers", spec.policy.server_wait_s)
    with open_input(spec.input) as reader:
        if options.dry_run:
            return describe_plan(spec, fleet, reader, options.limit, output, job_dir)
        try:
            return run_one(RunContext(spec, reader, options, output, job_dir, fleet))
        finally:
            fleet.stop()


# --- the phases, in order ----------------------------------------------------------------------------
def plan_fresh(ctx: RunContext) -> Planned:
    """settings + plan: the model's description (config.yaml for a local fleet), no server."""
    info = ctx.fleet.info()
    adapted = adapt_run(ctx, info)  # duplicate ids, over-length rows, gene alignment: before any server
    plan, fields = plan_run(ctx.spec, adapted.planned_from, info, ctx.options.limit)
    check_slots(ctx, adapted, info)
    if ctx.options.shard is not None:  # --shard I/N: this shard's chunks of the whole plan
        plan = slice_plan(plan, ctx.options.shard)
        write_record(ctx.job_dir, ctx.options.shard, plan, info)
    return Planned(plan, fields, adapted, pending=bool(plan.chunks) or ctx.options.shard is None)


def check_slots(ctx: RunContext, adapted: Adapted, info: ModelInfo) -> None:
    """The output slots against the model (engine/output_checks.py): the input's policies where
    this run reads the job's input, the output's where it writes the job's output."""
    check_output_slots(ctx.spec, adapted.planned_from, info, reads_input=ctx.plan_reader is None,
                       writes_output=ctx.hooks.merge_output)


def check_resumed(ctx: RunContext, manifest: Manifest) -> Planned:
    """settings + resume check: the inputs unchanged, damaged parts dropped, the settings as planned."""
    check_inputs(manifest)
    drop_damaged_parts(ctx.job_dir, manifest)  # before deciding what is left to compute
    if ctx.options.retry_failed:
        reopen_failed_chunks(ctx.job_dir, manifest)
    pending = len(manifest.done_chunks()) < manifest.counts()["chunks"]
    if finished_unchanged(ctx, manifest) or (ctx.options.shard is not None and ctx.options.shard.merge_only):
        # (`tensorfleet merge` asks no model: the shards planned alike, engine/shards.py checks it)
        return Planned(None, dict(manifest.plan_settings().get("fields", {})), None, pending)
    info = ctx.fleet.info()
    adapted = adapt_run(ctx, info)
    settings = plan_settings(ctx.spec, adapted.planned_from, info, ctx.options.limit)
    check_resume(manifest, settings)
    check_slots(ctx, adapted, info)
    return Planned(None, settings.fields, adapted, pending)


def start_fleet(ctx: RunContext, planned: Planned) -> Serving:
    """fleet: the servers, and the served model checked against the input again."""
    servers, info, verified = ctx.fleet.start()
    adapted = planned.adapted or adapt_run(ctx, info)
    fields = checked_fields(ctx.spec, adapted.reader, info)  # the served model, checked again
    return Serving(tuple(servers), info, dict(verified), fields, adapted)


def run_one(ctx: RunContext) -> RunResult:
    """One model over one reader, from plan to merged output (or, for earlier stages, to parts).

    Servers start only when chunks are pending; a finished run is a manifest read (and a merge
    if its output is missing).
    """
    manifest, created = prepare_job_dir(ctx.job_dir, ctx.output, ctx.options)
    planned_in_manifest = manifest is not None
    try:
        write_state(ctx, "starting")
        planned = check_resumed(ctx, manifest) if manifest is not None else plan_fresh(ctx)
        if planned.pending and ctx.options.shard is not None and ctx.options.shard.merge_only:
            raise JobFatal(f"{ctx.job_dir} has chunks to compute; run its shard again before the merge")
        serving = start_fleet(ctx, planned) if planned.pending else None
        if serving is not None and manifest is None:
            manifest = new_manifest(ctx)
            record_plan(manifest, ctx, planned, serving)
            planned_in_manifest = True
        elif serving is not None:
            assert manifest is not None
            check_build(manifest, serving.info)
        elif manifest is None:  # a shard with no rows (fewer chunks than shards): recorded, no server started
            manifest = new_manifest(ctx)
            record_plan(manifest, ctx, planned, Serving((), ctx.fleet.info(), {}, planned.fields, planned.adapted))
            planned_in_manifest = True
        assert manifest is not None
        return execute(ctx, manifest, planned, serving)
    except BaseException as error:
        if created and not planned_in_manifest:
            ctx.fleet.stop()
        if created and not planned_in_manifest and not holds_server_logs(ctx.job_dir):
            with contextlib.suppress(OSError):
                shutil.rmtree(ctx.job_dir)
        else:  # a folder with work, or with the logs of servers that would not start: kept
            with contextlib.suppress(OSError):
                write_state(ctx, "failed")
        if is_disk_full(error):  # while planning or starting, too
            raise disk_full(error, ctx.job_dir, ctx.output) from None
        raise
    finally:
        if manifest is not None:
            manifest.close()


def execute(ctx: RunContext, manifest: Manifest, planned: Planned, serving: Serving | None) -> RunResult:
    """dispatch, then merge: the pending chunks computed, then the output (or, for an earlier
    stage, the parts alone)."""
    done = manifest.done_chunks()
    names = {index: manifest.part_of(index) for index in done}
    try:
        gone = [i for i, name in names.items() if name is None] + missing_parts(
            ctx.job_dir, {i: name for i, name in names.items() if name is not None}
        )
    except ObjectStoreError as error:
        raise JobFatal(str(error)) from None
    if gone:
        index = min(gone)
        raise JobFatal(f"chunk {index} is marked done but its part file {names[index]} is missing; run with --restart")
    pending = [chunk for chunk in manifest.chunks() if chunk.index not in done]
    counts = manifest.counts()
    servers = list(serving.servers) if serving else []
    if pending:
        assert serving is not None
        dispatched = dispatch(ctx, manifest, serving, pending, counts)
    else:
        dispatched = Dispatched(None, 0, 0.0)
    adapted = serving.adapted if serving else planned.adapted
    if not ctx.hooks.merge_output:
        close_progress(ctx, dispatched.progress, "done")
        failed = manifest.counts()["rows_failed"]
        return noted(ctx, adapted, RunResult(None, ctx.job_dir, counts["rows"], failed, dispatched.rows_computed,
                                             dispatched.seconds, servers=servers))
    if ctx.options.shard is not None:  # the merge reads every shard's parts (engine/shards.py)
        from .shards import finish_shard

        return noted(ctx, adapted, finish_shard(ctx, manifest, adapted, serving, dispatched, servers))
    unchanged = unchanged_output(ctx, manifest, dispatched)
    if unchanged is not None:
        return noted(ctx, adapted, unchanged)
    if dispatched.progress is not None:
        dispatched.progress.tick("merging", force=True)
    made = provenance(ctx, manifest, serving.info if serving else None)
    adapted = adapted or adapt_run(ctx, ctx.fleet.info())  # the merge copies input columns from its reader
    return noted(ctx, adapted, merge_output(ctx, manifest, adapted, made, dispatched, servers))


def noted(ctx: RunContext, adapted: Adapted | None, result: RunResult) -> RunResult:
    """The result, with what was done to fit the input to the model and the fleet's restarts."""
    result.notes = [*(adapted.report.lines if adapted else []), *filter(None, [ctx.fleet.restart_note()])]
    return result
