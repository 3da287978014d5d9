"""One model over one input: plan -> (servers, only for pending chunks) -> dispatch -> merge.

The public pieces every job kind is built from (coordinator/workflows/api.py puts them together):
`plan_run` makes the plan once, with every check that can fail on the inputs, before any
server starts; `run_one` carries one `RunContext` from there to the merged output; a resume of
finished work is a manifest read. Fatal problems (exit 2) raise JobFatal with a message that
says what to fix. Files only appear under their final name once complete.

What only some runs need is imported where it is used: the local fleet (model.local), the
merge and the output writers (after the last chunk), the reader of the job's input format.
The first chunk is leased without them (tests/coordinator/test_lazy_imports.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from ..fleet.discovery import Discovery
from ..fleet.model_fleet import ModelFleet
from ..fleet.model_info import ModelInfo
from ..io.filesystems import is_disk_full
from ..io.joblock import JobLocked
from ..io.objectstore import ObjectStoreError
from ..io.part_store import PARTS_DIR, missing_parts, part_name, store_part
from ..io.readers import InputError, Reader, open_reader
from ..spec import InputSpec, JobSpec
from ..spec.errors import JobFatal
from .adapt import AlignmentError, InputReport, adapt_input
from .dispatcher import CompletedChunk, Dispatcher, DispatchFatal
from .manifest import MANIFEST_NAME, Manifest, drop_damaged_parts
from .planner import Plan, PlanError, fingerprint, make_plan
from .progress import Progress, write_json_atomic
from .provenance import output_provenance
from .source import FieldMappingError, RequestSource, resolve_fields

if TYPE_CHECKING:
    from .merge import MergeResult

__all__ = [
    "JobFatal", "RunContext", "RunOptions", "RunResult", "StageHooks",
    "describe_plan", "open_input", "plan_run", "run_one", "run_plain", "up_to_date",
]


@dataclass
class RunOptions:
    """What a command line asks of a run (the same for every job kind)."""

    job_dir: Path | None = None
    resume: bool = False
    restart: bool = False
    dry_run: bool = False
    limit: int | None = None
    servers: list[str] | None = None
    progress_stream: TextIO | None = None
    #: models x sources jobs: run only these models (None: all).
    models: list[str] | None = None
    #: With resume: the committed chunks holding failed rows are computed again.
    retry_failed: bool = False


@dataclass
class RunResult:
    output: Path | None
    job_dir: Path
    rows: int
    rows_failed: int
    rows_computed: int
    seconds: float
    columns: dict[str, tuple[list[int], str]] = field(default_factory=dict)
    servers: list[str] = field(default_factory=list)
    plan_text: str = ""
    #: Object-store URLs the output was uploaded to.
    uploaded: list[str] = field(default_factory=list)
    #: What was done to fit the input to the model (alignment, truncation, duplicate ids).
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.rows_failed else 0

    @property
    def rows_per_second(self) -> float:
        return self.rows_computed / self.seconds if self.seconds > 0 else 0.0

    def speed_line(self, where: str = "") -> str:
        """What this run computed; a re-run of a finished job says so instead of `0 rows in 0.0s`."""
        if not self.rows_computed:
            return "nothing computed: every chunk was already done (--restart computes them again)"
        return (f"speed: {self.rows_computed} rows computed in {self.seconds:.1f}s = {self.rows_per_second:.1f} rows/s"
                + where)

    def summary(self) -> str:
        if self.output is None:
            return self.plan_text
        dims = ", ".join(f"{name} {shape} {dtype}" for name, (shape, dtype) in self.columns.items())
        lines = [
            f"output: {self.output}",
            f"rows: {self.rows} ({self.rows - self.rows_failed} ok, {self.rows_failed} failed)",
            f"outputs: {dims}",
            self.speed_line(f" on {len(self.servers)} server(s)"),
            f"job folder: {self.job_dir}",
        ]
        lines += [f"uploaded: {url}" for url in self.uploaded]
        lines += self.notes
        if self.rows_failed:
            lines.append(f"failed rows: see the errors table in {self.output} ({self.job_dir / MANIFEST_NAME})")
        return "\n".join(lines)


def final_output_path(spec: JobSpec, limit: int | None) -> Path:
    path = Path(spec.output.path)
    return path.with_name(f"{path.stem}.limit{limit}{path.suffix}") if limit else path


def default_job_dir(spec: JobSpec, output: Path) -> Path:
    return Path(spec.job_dir) if spec.job_dir else output.with_name(output.name + ".tfjob")


def _batching(spec: JobSpec, info: ModelInfo) -> tuple[int, int | None]:
    batch_rows = spec.chunking.batch_rows or min(info.max_batch_size, 64)
    if batch_rows > info.max_batch_size:
        raise JobFatal(
            f"chunking.batch_rows {batch_rows} exceeds model '{info.name}' max_batch_size "
            f"{info.max_batch_size}; lower chunking.batch_rows"
        )
    return batch_rows, spec.chunking.token_budget or info.token_budget or None


def _fields(spec: JobSpec, reader: Reader, info: ModelInfo) -> dict[str, str]:
    try:
        fields = resolve_fields(spec.input.tensors, reader, info.inputs, info.optional_inputs)
    except FieldMappingError as error:
        raise JobFatal(str(error)) from None
    _stored_outputs(spec, info)  # checked before anything is planned or sent
    return fields


def _stored_outputs(spec: JobSpec, info: ModelInfo) -> list[str] | None:
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


def _adapt(spec: JobSpec, reader: Reader, info: ModelInfo) -> tuple[Reader, InputReport]:
    try:
        return adapt_input(spec, reader, info)
    except (AlignmentError, InputError) as error:
        raise JobFatal(str(error)) from None


def _check_inputs(manifest: Manifest) -> None:
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


def _check_resume(manifest: Manifest, plan_settings: dict) -> None:
    stored = manifest.plan_settings()
    changed = [
        f"{key} {stored.get(key)!r} -> {plan_settings.get(key)!r}"
        for key in sorted(set(plan_settings) | set(stored))
        if key != "ids_digest" and stored.get(key) != plan_settings.get(key)
    ]
    if changed:
        raise JobFatal(
            "the job changed since it began (" + "; ".join(changed) + "); "
            "run with --restart to start over with the new settings"
        )


def _check_build(manifest: Manifest, info: ModelInfo) -> None:
    """The served model is the build the done chunks came from (checked only when chunks remain)."""
    model = manifest.meta("model") or {}
    if model and model.get("model_artifact_sha256") != info.artifact_sha256:
        raise JobFatal(
            f"the servers now serve a different build of model '{info.name}' (sha256 "
            f"{str(model.get('model_artifact_sha256'))[:12]} -> {info.artifact_sha256[:12]}) than the chunks "
            f"already done; serve the old build to --resume, or --restart"
        )


def _committer(job_dir: Path, manifest: Manifest, parts_url: str | None = None):
    """Part first (complete: local rename, or a closed upload), then its manifest row."""
    if parts_url is None:
        (job_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)

    def commit(done: CompletedChunk) -> None:
        name = part_name(done.chunk.index, parts_url)
        checksum = store_part(job_dir, name, arrays={**done.outputs, "ok": done.ok}, strings={"ids": done.ids})
        manifest.note_server(done.server)
        manifest.commit_chunk(done.chunk.index, name, done.errors, done.server, checksum)

    return commit


def _writer_manifest(open_manifest: Callable[[], Manifest | None]) -> Manifest | None:
    """The manifest, held for writing (docs/reliability.md: one coordinator per job folder)."""
    try:
        return open_manifest()
    except JobLocked as error:
        raise JobFatal(str(error)) from None


def _disk_full(error: BaseException, job_dir: Path, output: Path) -> JobFatal:
    return JobFatal(
        f"no space left to write the job ({error}); free space on the disk holding {job_dir} "
        f"(and {output.parent}), then run again with --resume: committed chunks are kept"
    )


def _prepare_job_dir(job_dir: Path, output: Path, options: RunOptions) -> tuple[Manifest | None, bool]:
    """(existing manifest to resume, whether this run created the folder)."""
    existing = _writer_manifest(lambda: Manifest.open_existing(job_dir, lock=True))
    if existing is not None and not existing.has_plan():
        existing.close()
        existing = None
    if existing is not None and options.restart:
        existing.close()
        existing = None
        shutil.rmtree(job_dir)
    if existing is not None and not options.resume:
        counts = existing.counts()
        existing.close()
        raise JobFatal(
            f"{job_dir} already holds this job ({counts['chunks_done']}/{counts['chunks']} chunks done); "
            f"pass --resume to continue it or --restart to start over"
        )
    if existing is None:
        for stale in (output, output.with_name(output.stem + ".errors.parquet")):
            if options.restart:
                stale.unlink(missing_ok=True)
    created = not job_dir.exists()
    job_dir.mkdir(parents=True, exist_ok=True)
    return existing, created


@dataclass
class StageHooks:
    """How a workflow kind uses one run: multi-stage jobs merge only the last stage and carry
    earlier stages' failed rows along; in-context jobs put a prompt once per stream."""

    merge_output: bool = True
    wrap_commit: Callable | None = None
    #: (context id, tensors): a prompt put once per stream; or a function of the model's
    #: description that makes it (a prompt aligned to the model's genes), called once by adapt().
    context: tuple[str, dict[str, np.ndarray]] | Callable[[ModelInfo, InputReport], tuple[str, dict[str, np.ndarray]]] | None = None
    #: More provenance for the merged output (a multi-stage job's earlier stages), asked at the merge.
    provenance: Callable[[], dict] | None = None


@dataclass
class RunContext:
    """Everything one run carries from its plan to its merged output."""

    spec: JobSpec
    reader: Reader
    options: RunOptions
    output: Path
    job_dir: Path
    fleet: ModelFleet
    hooks: StageHooks = field(default_factory=StageHooks)
    manifest: Manifest | None = None
    plan: Plan | None = None
    info: ModelInfo | None = None
    fields: dict[str, str] = field(default_factory=dict)
    servers: list[str] = field(default_factory=list)
    verified: dict[str, float] = field(default_factory=dict)
    #: What the plan reads instead of `reader` (a later stage plans against the earlier models'
    #: declared outputs, so it plans, and starts its servers, without waiting for them).
    plan_reader: Reader | None = None
    #: What was done to fit the input to the model (coordinator/engine/adapt.py), once adapted.
    report: InputReport | None = None

    @property
    def status_path(self) -> Path:
        return self.job_dir / "status.json"


def adapt(ctx: RunContext, info: ModelInfo) -> None:
    """Fit the run's readers to the model once (duplicate ids, over-length rows, gene alignment)."""
    if ctx.report is not None:
        return
    ctx.reader, ctx.report = _adapt(ctx.spec, ctx.reader, info)
    if ctx.plan_reader is not None:
        ctx.plan_reader, _ = _adapt(ctx.spec, ctx.plan_reader, info)
    if callable(ctx.hooks.context):
        try:
            ctx.hooks.context = ctx.hooks.context(info, ctx.report)
        except AlignmentError as error:
            raise JobFatal(str(error)) from None


def open_input(spec: InputSpec) -> Reader:
    try:
        return open_reader(spec)
    except InputError as error:
        raise JobFatal(str(error)) from None


def plan_run(spec: JobSpec, reader: Reader, info: ModelInfo, limit: int | None) -> tuple[Plan, dict[str, str]]:
    """The one plan of a run, with every check that can fail on the inputs (fields, shapes,
    stored outputs, batch size, duplicate ids); needs the model's description, no server."""
    if reader.num_rows == 0:
        raise JobFatal(f"input {spec.input.path} has no rows")
    fields = _fields(spec, reader, info)
    batch_rows, token_budget = _batching(spec, info)
    try:
        plan = make_plan(
            reader, fields, batch_rows=batch_rows, chunk_rows=spec.chunking.chunk_rows,
            token_budget=token_budget, limit=limit,
        )
    except PlanError as error:
        raise JobFatal(str(error)) from None
    plan.parameters = dict(spec.model.parameters)
    return plan, fields


def describe_plan(spec: JobSpec, fleet: ModelFleet, reader: Reader, limit: int | None, output: Path, job_dir: Path) -> RunResult:
    """--dry-run: the plan as text; nothing started (a local fleet's model is read from its config)."""
    info = fleet.info(wait_s=10.0)
    reader, report = _adapt(spec, reader, info)
    plan, _ = plan_run(spec, reader, info, limit)
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
    return RunResult(None, job_dir, plan.rows, 0, 0, 0.0, plan_text=text)


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


def _finished_unchanged(ctx: RunContext, manifest: Manifest) -> bool:
    """Every chunk done and the spec as it was: nothing to check against a model."""
    counts = manifest.counts()
    settings = manifest.plan_settings()
    return (
        counts["chunks"] == counts["chunks_done"]
        and manifest.meta("spec_sha256") == ctx.spec.digest()
        and settings.get("limit") == ctx.options.limit
    )


def reopen_failed_chunks(job_dir: Path, manifest: Manifest) -> None:
    """--retry-failed: chunks committed with failed rows are computed again, whole (a server
    that was lost, a device that failed, a model since fixed); their rows failed before."""
    chunks = manifest.chunks_with_failures()
    if chunks:
        rows = sum(failed for _, failed in chunks)
        print(f"{job_dir}: computing again {len(chunks)} chunk(s) holding {rows} failed row(s) (--retry-failed)",
              file=sys.stderr)
        manifest.reset_chunks(index for index, _ in chunks)


def run_one(ctx: RunContext) -> RunResult:
    """One model over one reader, from plan to merged output (or, for earlier stages, to parts).

    Servers start only when chunks are pending; a finished run is a manifest read (and a merge
    if its output is missing).
    """
    manifest, created = _prepare_job_dir(ctx.job_dir, ctx.output, ctx.options)
    ctx.manifest = manifest
    planned = manifest is not None
    try:
        write_json_atomic(ctx.status_path, {"state": "starting", "output": str(ctx.output), "updated": time.time()})
        if manifest is not None:
            _check_inputs(manifest)
            drop_damaged_parts(ctx.job_dir, manifest)  # before deciding what is left to compute
            if ctx.options.retry_failed:
                reopen_failed_chunks(ctx.job_dir, manifest)
            if not _finished_unchanged(ctx, manifest):
                info = ctx.fleet.info()
                adapt(ctx, info)
                planned_from = ctx.plan_reader or ctx.reader
                ctx.fields = _fields(ctx.spec, planned_from, info)
                batch_rows, token_budget = _batching(ctx.spec, info)
                rows = planned_from.num_rows if ctx.options.limit is None else min(ctx.options.limit, planned_from.num_rows)
                settings = Plan(
                    rows, batch_rows, token_budget, ctx.spec.chunking.chunk_rows, ctx.options.limit, ctx.fields, "", [],
                    parameters=dict(ctx.spec.model.parameters),
                ).settings()
                _check_resume(manifest, settings)
            else:
                ctx.fields = dict(manifest.plan_settings().get("fields", {}))
        else:
            adapt(ctx, ctx.fleet.info())  # duplicate ids, over-length rows, gene alignment: before any server
            ctx.plan, ctx.fields = plan_run(ctx.spec, ctx.plan_reader or ctx.reader, ctx.fleet.info(), ctx.options.limit)
        pending = manifest is None or len(manifest.done_chunks()) < manifest.counts()["chunks"]
        if pending:
            ctx.servers, ctx.info, ctx.verified = ctx.fleet.start()
            adapt(ctx, ctx.info)
            ctx.fields = _fields(ctx.spec, ctx.reader, ctx.info)  # the served model, checked again
            if manifest is None:
                assert ctx.plan is not None
                manifest = ctx.manifest = _writer_manifest(lambda: Manifest(ctx.job_dir / MANIFEST_NAME, lock=True))
                manifest.record_plan(ctx.plan)
                manifest.set_meta("model", ctx.info.provenance())
                manifest.set_meta("spec_sha256", ctx.spec.digest())
                manifest.set_meta("outputs", {k: list(v) for k, v in ctx.info.outputs.items()})
                manifest.set_meta("input_report", ctx.report.facts if ctx.report else {})
                planned = True
            else:
                _check_build(manifest, ctx.info)
        result = _execute(ctx)
        result.notes = [*(ctx.report.lines if ctx.report else []), *filter(None, [ctx.fleet.restart_note()])]
        return result
    except BaseException as error:
        if created and not planned:
            ctx.fleet.stop()
            with contextlib.suppress(OSError):
                shutil.rmtree(ctx.job_dir)
        else:
            with contextlib.suppress(OSError):
                write_json_atomic(ctx.status_path, {"state": "failed", "output": str(ctx.output), "updated": time.time()})
        if is_disk_full(error):  # while planning or starting, too
            raise _disk_full(error, ctx.job_dir, ctx.output) from None
        raise
    finally:
        if ctx.manifest is not None:
            ctx.manifest.close()

def _execute(ctx: RunContext) -> RunResult:
    manifest, spec, options, job_dir = ctx.manifest, ctx.spec, ctx.options, ctx.job_dir
    assert manifest is not None
    chunks = manifest.chunks()
    done = manifest.done_chunks()
    names = {index: manifest.part_of(index) for index in done}
    try:
        gone = [i for i, name in names.items() if name is None] + missing_parts(
            job_dir, {i: name for i, name in names.items() if name is not None}
        )
    except ObjectStoreError as error:
        raise JobFatal(str(error)) from None
    if gone:
        index = min(gone)
        raise JobFatal(f"chunk {index} is marked done but its part file {names[index]} is missing; run with --restart")
    pending = [chunk for chunk in chunks if chunk.index not in done]
    counts = manifest.counts()
    rows = counts["rows"]
    started = time.monotonic()
    progress: Progress | None = None
    if pending:
        progress = _dispatch(ctx, pending, counts)
    seconds = time.monotonic() - started
    computed = sum(chunk.rows for chunk in pending)
    if not ctx.hooks.merge_output:
        _close(ctx, progress, "done")
        failed = manifest.counts()["rows_failed"]
        return RunResult(None, job_dir, rows, failed, computed, seconds, servers=ctx.servers)
    merged = manifest.meta("merged")
    if not pending and merged and _same_file(ctx.output, merged.get("stat")):
        # Finished before and its output untouched since: nothing to compute, nothing to write.
        _close(ctx, progress, "done" if not merged["rows_failed"] else "done_with_errors")
        return RunResult(
            output=ctx.output, job_dir=job_dir, rows=rows, rows_failed=merged["rows_failed"], rows_computed=0,
            seconds=seconds, columns={k: (v[0], v[1]) for k, v in merged["columns"].items()}, servers=[],
        )
    if progress is not None:
        progress.tick("merging", force=True)
    provenance = output_provenance(spec, manifest, ctx.info, ctx.hooks.provenance)
    adapt(ctx, ctx.info or ctx.fleet.info())  # the merge copies input columns from the reader the job read
    reader = ctx.reader
    declared = {k: (v[0], tuple(v[1])) for k, v in (manifest.meta("outputs") or {}).items()}
    from ..io.writers import Column
    from .merge import MergeError, merge

    try:
        result: MergeResult = merge(
            job_dir=job_dir, manifest=manifest, chunks=chunks, rows=rows,
            ids_digest=manifest.plan_settings()["ids_digest"], output=spec.output, input_spec=spec.input,
            provenance=provenance, limit=options.limit, final_path=ctx.output, declared_outputs=declared,
            input_columns=[Column(f.name, f.name, f.dtype, f.row_shape, from_input=True) for f in reader.stored_fields()],
            input_values=lambda start, stop: {f.name: reader.read(f.name, start, stop) for f in reader.stored_fields()},
        )
    except (MergeError, ObjectStoreError, ValueError, OSError, sqlite3.OperationalError) as error:
        with contextlib.suppress(OSError):
            _close(ctx, progress, "failed")
        if is_disk_full(error):
            raise _disk_full(error, job_dir, ctx.output) from None
        raise JobFatal(f"merge failed: {error}") from None
    columns = {c.name: (list(c.row_shape), str(np.dtype(c.dtype))) for c in result.columns}
    manifest.set_meta("merged", {"stat": _file_stat(result.path), "rows_failed": result.rows_failed, "columns": columns})
    _close(ctx, progress, "done" if not result.rows_failed else "done_with_errors")
    return RunResult(
        output=result.path, job_dir=job_dir, rows=rows, rows_failed=result.rows_failed, rows_computed=computed,
        seconds=seconds, columns=columns, servers=ctx.servers,
    )


def _dispatch(ctx: RunContext, pending: list, counts: dict[str, int]) -> Progress:
    """Send the pending chunks to the servers; returns the progress (still open) once all are committed."""
    manifest, spec, info = ctx.manifest, ctx.spec, ctx.info
    assert manifest is not None and info is not None
    parts_url = spec.output.parts if ctx.hooks.merge_output else None
    source = RequestSource(ctx.reader, ctx.fields, {k: info.inputs[k][0] for k in ctx.fields}, info.name, spec.model.version)
    source.context = ctx.hooks.context
    source.outputs = _stored_outputs(spec, info)
    source.parameters = dict(spec.model.parameters)
    source.sparse = {name for name in ctx.fields if name in info.sparse_inputs}
    progress: Progress | None = None

    def counted(item: CompletedChunk) -> None:
        if progress is not None:
            progress.add(item.chunk.rows, len(item.errors))

    commit = (ctx.hooks.wrap_commit or (lambda commit: commit))(_committer(ctx.job_dir, manifest, parts_url))
    dispatcher = Dispatcher(
        servers=ctx.servers, source=source, chunks=pending, commit=commit,
        policy=spec.policy, options=ctx.fleet.connection,
        on_lease=manifest.note_lease, on_commit=counted, verified=ctx.verified, on_stall=ctx.fleet.stalled,
    )
    progress = Progress(
        ctx.job_dir, total_rows=counts["rows"], done_rows=counts["rows_done"], failed_rows=counts["rows_failed"],
        servers=lambda: [s.summary() for s in dispatcher.servers], output=str(ctx.output),
        stream=ctx.options.progress_stream, computed=lambda: sum(s.rows for s in dispatcher.servers),
    )

    async def dispatch() -> None:
        task = asyncio.create_task(dispatcher.run())
        discovery = Discovery(spec.model.servers, ctx.servers)
        while not task.done():
            progress.tick()
            for address in discovery.poll(time.monotonic()):
                dispatcher.add_server(address)
            await asyncio.wait([task], timeout=0.2)
        task.result()

    try:
        asyncio.run(dispatch())
    except (DispatchFatal, InputError) as error:  # InputError: the input refused a read mid-run
        progress.close("failed")
        raise JobFatal(str(error)) from None
    except (OSError, sqlite3.OperationalError) as error:
        if not is_disk_full(error):
            raise
        with contextlib.suppress(OSError):
            progress.close("failed")
        raise _disk_full(error, ctx.job_dir, ctx.output) from None
    except BaseException:
        progress.close("interrupted")
        raise
    return progress


def _close(ctx: RunContext, progress: Progress | None, state: str) -> None:
    if progress is not None:
        progress.close(state)
    else:
        write_json_atomic(ctx.status_path, {"state": state, "output": str(ctx.output), "updated": time.time()})


def up_to_date(target: Path, sources: list[Path | None]) -> bool:
    """`target` exists and is no older than every source: a resume that computed nothing keeps it."""
    if not target.is_file() or any(p is None or not p.is_file() for p in sources):
        return False
    mtime = target.stat().st_mtime_ns
    return all(p.stat().st_mtime_ns <= mtime for p in sources if p is not None)


def _file_stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _same_file(path: Path, stat: list[int] | None) -> bool:
    return stat is not None and path.is_file() and _file_stat(path) == list(stat)
