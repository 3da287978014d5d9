"""One `tensorfleet run`: spec -> fleet -> plan -> dispatch -> merge, with every fatal error explained.

Fatal problems (exit 2) raise JobFatal with a message that says what to fix. Files only
appear under their final name once complete, so a failed run never leaves a finished-looking
output.

What only some runs need is imported where it is used: the local fleet (model.local), the
merge and the output writers (after the last chunk), the reader of the job's input format.
The first chunk is leased without them (tests/coordinator/test_lazy_imports.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
import yaml

from tensorfleet.client import ConnectionOptions
from tensorfleet.client import __version__ as tensorfleet_version
from tensorfleet.core.auth import SERVER_TOKEN_FILE_ENV, token_from

from .adapt import AlignmentError, InputReport, adapt_input
from .discovery import Discovery, DiscoveryError, expand
from .dispatcher import CompletedChunk, Dispatcher, DispatchFatal
from .filesystems import is_disk_full
from .fleet import FleetError, ModelInfo, inspect_fleet
from .joblock import JobLocked
from .manifest import MANIFEST_NAME, Manifest
from .objectstore import ObjectStoreError, RemoteOutput, is_url, localize
from .part_store import PARTS_DIR, drop_damaged_parts, missing_parts, part_name, store_part
from .planner import Plan, PlanError, fingerprint, make_plan
from .progress import Progress, write_json_atomic
from .readers import InputError, Reader, open_reader
from .source import FieldMappingError, RequestSource, resolve_fields
from .spec import JobSpec, SpecError, load_spec

if TYPE_CHECKING:
    from .local_fleet import LocalFleet
    from .merge import MergeResult


class JobFatal(Exception):
    """Exit 2: the job cannot run or finish as asked; the message says what to fix."""


@dataclass
class RunOptions:
    job_dir: Path | None = None
    resume: bool = False
    restart: bool = False
    dry_run: bool = False
    limit: int | None = None
    servers: list[str] | None = None
    progress_stream: TextIO | None = None


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

    def summary(self) -> str:
        if self.output is None:
            return self.plan_text
        dims = ", ".join(f"{name} {shape} {dtype}" for name, (shape, dtype) in self.columns.items())
        lines = [
            f"output: {self.output}",
            f"rows: {self.rows} ({self.rows - self.rows_failed} ok, {self.rows_failed} failed)",
            f"outputs: {dims}",
            f"speed: {self.rows_computed} rows computed in {self.seconds:.1f}s = {self.rows_per_second:.1f} rows/s"
            f" on {len(self.servers)} server(s)",
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


def load_job(path: Path | str, servers: list[str] | None = None) -> JobSpec:
    try:
        spec = load_spec(path)
    except SpecError as error:
        raise JobFatal(str(error)) from None
    if servers:
        model = spec.model.model_copy(update={"servers": servers, "local": None})
        spec = spec.model_copy(update={"model": model})
    return spec


def local_model_info(spec: JobSpec) -> ModelInfo:
    """For --dry-run with a local fleet: the model's config.yaml, read as plain YAML."""
    assert spec.model.local is not None
    path = Path(spec.model.local.repository) / spec.model.name / "config.yaml"
    if not path.is_file():
        from .local_fleet import LocalFleet

        LocalFleet(Path(spec.model.local.repository), spec.model.name, 1, "cpu", Path("."), []).check()
        raise JobFatal(f"{path} does not exist")
    config = yaml.safe_load(path.read_text())

    def tensors(items: list[dict]) -> dict[str, tuple[str, list[int]]]:
        return {t["name"]: (t["datatype"], list(t.get("shape", []))) for t in items}

    return ModelInfo(
        name=spec.model.name,
        version=str(config.get("version", "1")),
        max_batch_size=int(config.get("max_batch_size", 0)),
        inputs=tensors(config.get("inputs", [])),
        outputs=tensors(config.get("outputs", [])),
        optional_inputs={t["name"] for t in config.get("inputs", []) if t.get("optional")},
        precision=config.get("precision", "fp32"),
        token_budget=int((config.get("batching") or {}).get("token_budget", 0)),
        max_lengths={t["name"]: int(t["max_length"]) for t in config.get("inputs", []) if t.get("max_length")},
        **_local_features(path.parent, config),
    )


def _local_features(model_dir: Path, config: dict) -> dict:
    """A dry run's view of the model's feature list (a server reads it the same way at load)."""
    declared = config.get("features") or {}
    if not declared.get("file") or not (model_dir / declared["file"]).is_file():
        return {}
    names = [line.strip() for line in (model_dir / declared["file"]).read_text().splitlines() if line.strip()]
    inputs = [t["name"] for t in config.get("inputs", [])]
    return {"features": names, "features_input": declared.get("input") or (inputs[0] if len(inputs) == 1 else "")}


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


def _check_resume(manifest: Manifest, plan_settings: dict, info: ModelInfo) -> None:
    stored = manifest.plan_settings()
    changed = [
        f"{key} {stored.get(key)!r} -> {value!r}"
        for key, value in plan_settings.items()
        if key != "ids_digest" and stored.get(key) != value
    ]
    if changed:
        raise JobFatal(
            "the job changed since it began (" + "; ".join(changed) + "); "
            "run with --restart to start over with the new settings"
        )
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


def run_job(spec_path: Path | str, options: RunOptions) -> RunResult:
    from .workflows import load_workflow

    workflow = load_workflow(spec_path)  # a multi-stage or many-model job file
    if workflow is not None:
        return workflow(options)
    spec = load_job(spec_path, options.servers)
    spec, remote = _localize(spec, options)
    output = final_output_path(spec, options.limit)
    job_dir = options.job_dir.resolve() if options.job_dir else default_job_dir(spec, output)
    if options.limit is not None and options.limit < 1:
        raise JobFatal("--limit must be at least 1")
    try:
        reader = open_reader(spec.input)
    except InputError as error:
        raise JobFatal(str(error)) from None
    with reader:
        if reader.num_rows == 0:
            raise JobFatal(f"input {spec.input.path} has no rows")
        if options.dry_run:
            return _dry_run(spec, reader, options, output, job_dir)
        result = _run(spec, reader, options, output, job_dir)
    if remote is not None and result.output is not None:
        try:
            result.uploaded = remote.upload_all(result.output)
        except ObjectStoreError as error:
            raise JobFatal(f"{error}; the merged output is in {result.output}; --resume uploads it again") from None
    return result


def _localize(spec: JobSpec, options: RunOptions) -> tuple[JobSpec, RemoteOutput | None]:
    """Object-store (fsspec URL) input and output: staged beside the local job folder."""
    if not (is_url(spec.input.path) or is_url(spec.output.path)):
        return spec, None
    job_dir = options.job_dir or (Path(spec.job_dir) if spec.job_dir else None)
    if job_dir is None:
        raise JobFatal("an object-store input or output needs a local job folder: set job_dir or pass --job-dir")
    try:
        return localize(spec, job_dir.resolve())
    except ObjectStoreError as error:
        raise JobFatal(str(error)) from None


def _dry_run(spec: JobSpec, reader: Reader, options: RunOptions, output: Path, job_dir: Path) -> RunResult:
    if spec.model.local is not None:
        from .local_fleet import LocalFleetError

        try:
            info = local_model_info(spec)
        except LocalFleetError as error:
            raise JobFatal(str(error)) from None
    else:
        try:
            info, _ = asyncio.run(
                inspect_fleet(spec.model.servers, spec.model.name, spec.model.version, _connection(spec), 10.0)
            )
        except FleetError as error:
            raise JobFatal(str(error)) from None
    reader, report = _adapt(spec, reader, info)
    fields = _fields(spec, reader, info)
    batch_rows, token_budget = _batching(spec, info)
    try:
        plan = make_plan(
            reader, fields, batch_rows=batch_rows, chunk_rows=spec.chunking.chunk_rows,
            token_budget=token_budget, limit=options.limit,
        )
    except PlanError as error:
        raise JobFatal(str(error)) from None
    fleet = (
        f"{spec.model.local.count} local server(s) from {spec.model.local.repository} on {spec.model.local.device}"
        if spec.model.local else ", ".join(spec.model.servers)
    )
    text = "\n".join(
        [
            f"job: {spec.name} (dry run: nothing computed, nothing written)",
            f"model: {info.name} version {info.version} (max_batch_size {info.max_batch_size}) on {fleet}",
            plan.describe(),
            *report.lines,
            f"output: {output} ({spec.output.format})",
            f"job folder: {job_dir}",
        ]
    )
    return RunResult(None, job_dir, plan.rows, 0, 0, 0.0, plan_text=text)


def _connection(spec: JobSpec) -> ConnectionOptions:
    """The servers' token: the spec's, else the file in $TENSORFLEET_SERVER_TOKEN_FILE (the service's)."""
    server_token_file = os.environ.get(SERVER_TOKEN_FILE_ENV)
    return ConnectionOptions(token=spec.model.token or token_from(None, server_token_file, use_env=False))


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


def _run(
    spec: JobSpec, reader: Reader, options: RunOptions, output: Path, job_dir: Path,
    *, merge_output: bool = True, wrap_commit: Callable | None = None, context: tuple | None = None,
    verified: dict[str, float] | None = None,
) -> RunResult:
    """One model over one reader. Multi-stage jobs run it per stage: without the merge for the
    stages before the last, and with `wrap_commit` to carry earlier stages' failed rows along."""
    manifest, created = _prepare_job_dir(job_dir, output, options)
    fleet: LocalFleet | None = None
    planned = manifest is not None
    status = job_dir / "status.json"
    try:
        write_json_atomic(status, {"state": "starting", "output": str(output), "updated": time.time()})
        if manifest is not None:
            _check_inputs(manifest)
        if spec.model.local is not None:
            from .local_fleet import LocalFleet, LocalFleetError

            local = spec.model.local
            fleet = LocalFleet(
                Path(local.repository), spec.model.name, local.count, local.device, job_dir / "servers", local.args
            )
            try:
                servers = fleet.start(local.startup_timeout_s)
            except LocalFleetError as error:
                raise JobFatal(str(error)) from None
        else:
            try:
                servers = expand(spec.model.servers)
            except DiscoveryError as error:
                raise JobFatal(str(error)) from None
            if not servers:
                raise JobFatal(f"model.servers {spec.model.servers} name no server right now; check the name or hostfile")
        try:
            info, ready = asyncio.run(
                inspect_fleet(servers, spec.model.name, spec.model.version, _connection(spec), spec.policy.server_wait_s)
            )
        except FleetError as error:
            raise JobFatal(str(error)) from None
        verified = dict.fromkeys(ready, time.monotonic())
        reader, report = _adapt(spec, reader, info)
        fields = _fields(spec, reader, info)
        batch_rows, token_budget = _batching(spec, info)
        if manifest is None:
            try:
                plan = make_plan(
                    reader, fields, batch_rows=batch_rows, chunk_rows=spec.chunking.chunk_rows,
                    token_budget=token_budget, limit=options.limit,
                )
            except PlanError as error:
                raise JobFatal(str(error)) from None
            manifest = _writer_manifest(lambda: Manifest(job_dir / MANIFEST_NAME, lock=True))
            manifest.record_plan(plan)
            manifest.set_meta("model", info.provenance())
            manifest.set_meta("spec_sha256", spec.digest())
            manifest.set_meta("outputs", {k: list(v) for k, v in info.outputs.items()})
            manifest.set_meta("input_report", report.facts)
            planned = True
        else:
            rows = reader.num_rows if options.limit is None else min(options.limit, reader.num_rows)
            settings = Plan(rows, batch_rows, token_budget, spec.chunking.chunk_rows, options.limit, fields, "", []).settings()
            _check_resume(manifest, settings, info)
        result = _execute(
            spec, reader, options, output, job_dir, manifest, info, fields, servers,
            merge_output=merge_output, wrap_commit=wrap_commit, context=context, verified=verified,
        )
        result.notes = report.lines
        return result
    except BaseException as error:
        if created and not planned:
            if fleet is not None:
                fleet.stop()
                fleet = None
            with contextlib.suppress(OSError):
                shutil.rmtree(job_dir)
        else:
            with contextlib.suppress(OSError):
                write_json_atomic(status, {"state": "failed", "output": str(output), "updated": time.time()})
        if is_disk_full(error):  # while planning or starting, too
            raise _disk_full(error, job_dir, output) from None
        raise
    finally:
        if fleet is not None:
            fleet.stop()
        if manifest is not None:
            manifest.close()


def _execute(
    spec: JobSpec, reader: Reader, options: RunOptions, output: Path, job_dir: Path,
    manifest: Manifest, info: ModelInfo, fields: dict[str, str], servers: list[str],
    *, merge_output: bool = True, wrap_commit: Callable | None = None, context: tuple | None = None,
    verified: dict[str, float] | None = None,
) -> RunResult:
    chunks = manifest.chunks()
    drop_damaged_parts(job_dir, manifest)
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
    parts_url = spec.output.parts if merge_output else None
    pending = [chunk for chunk in chunks if chunk.index not in done]
    counts = manifest.counts()
    rows = counts["rows"]
    source = RequestSource(reader, fields, {k: info.inputs[k][0] for k in fields}, info.name, spec.model.version)
    source.context = context  # (id, tensors): a prompt put once per stream (in-context jobs)
    source.outputs = _stored_outputs(spec, info)
    dispatcher = Dispatcher(
        servers=servers, source=source, chunks=pending, commit=(wrap_commit or (lambda commit: commit))(_committer(job_dir, manifest, parts_url)),
        policy=spec.policy, options=_connection(spec),
        on_lease=manifest.note_lease, verified=verified,
    )
    progress = Progress(
        job_dir, total_rows=rows, done_rows=counts["rows_done"], failed_rows=counts["rows_failed"],
        servers=lambda: [s.summary() for s in dispatcher.servers], output=str(output),
        stream=options.progress_stream, computed=lambda: sum(s.rows for s in dispatcher.servers),
    )
    dispatcher._on_commit = lambda item: progress.add(item.chunk.rows, len(item.errors))
    started = time.monotonic()

    async def dispatch() -> None:
        task = asyncio.create_task(dispatcher.run())
        discovery = Discovery(spec.model.servers, servers)
        while not task.done():
            progress.tick()
            for address in discovery.poll(time.monotonic()):
                dispatcher.add_server(address)
            await asyncio.wait([task], timeout=0.2)
        task.result()

    try:
        asyncio.run(dispatch())
    except DispatchFatal as error:
        progress.close("failed")
        raise JobFatal(str(error)) from None
    except (OSError, sqlite3.OperationalError) as error:
        if not is_disk_full(error):
            raise
        with contextlib.suppress(OSError):
            progress.close("failed")
        raise _disk_full(error, job_dir, output) from None
    except BaseException:
        progress.close("interrupted")
        raise
    seconds = time.monotonic() - started
    computed = sum(chunk.rows for chunk in pending)
    if not merge_output:
        progress.close("done")
        failed = manifest.counts()["rows_failed"]
        return RunResult(None, job_dir, rows, failed, computed, seconds, servers=servers)
    progress.tick("merging", force=True)
    provenance = {
        "tensorfleet_version": tensorfleet_version,
        **(manifest.meta("model") or info.provenance()),
        "spec_sha256": manifest.meta("spec_sha256", spec.digest()),
        "job_name": spec.name,
        "servers": manifest.servers(),
        "inputs": [{"path": i.path, "size": i.size, "sha256": i.sha256} for i in manifest.inputs()],
        "batch_rows": manifest.plan_settings().get("batch_rows"),
        "token_budget": manifest.plan_settings().get("token_budget"),
        **(manifest.meta("input_report") or {}),
    }
    declared = {k: (v[0], tuple(v[1])) for k, v in (manifest.meta("outputs") or {}).items()}
    from .merge import MergeError, merge
    from .writers import Column

    try:
        result: MergeResult = merge(
            job_dir=job_dir, manifest=manifest, chunks=chunks, rows=rows,
            ids_digest=manifest.plan_settings()["ids_digest"], output=spec.output, input_spec=spec.input,
            provenance=provenance, limit=options.limit, final_path=output, declared_outputs=declared,
            input_columns=[Column(f.name, f.name, f.dtype, f.row_shape) for f in reader.stored_fields()],
            input_values=lambda start, stop: {f.name: reader.read(f.name, start, stop) for f in reader.stored_fields()},
        )
    except (MergeError, ObjectStoreError, ValueError, OSError, sqlite3.OperationalError) as error:
        with contextlib.suppress(OSError):
            progress.close("failed")
        if is_disk_full(error):
            raise _disk_full(error, job_dir, output) from None
        raise JobFatal(f"merge failed: {error}") from None
    progress.close("done" if not result.rows_failed else "done_with_errors")
    return RunResult(
        output=result.path, job_dir=job_dir, rows=rows, rows_failed=result.rows_failed, rows_computed=computed,
        seconds=seconds, columns={c.name: (list(c.row_shape), str(np.dtype(c.dtype))) for c in result.columns},
        servers=servers,
    )
