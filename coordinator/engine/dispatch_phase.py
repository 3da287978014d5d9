"""The dispatch phase: the pending chunks of a checked plan, sent to the serving fleet and
committed (part file first, then its manifest row) as they finish."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

from ..fleet.discovery import Discovery
from ..io.filesystems import is_disk_full
from ..io.part_store import PARTS_DIR, part_name, store_part
from ..io.readers import InputError
from ..spec.errors import JobFatal
from .dispatcher import CompletedChunk, Dispatcher, DispatchFatal
from .job_dir import disk_full
from .manifest import Manifest
from .plan_phase import stored_outputs
from .planner import Chunk
from .progress import Progress
from .run_types import Dispatched, RunContext, Serving
from .source import RequestSource


def committer(job_dir: Path, manifest: Manifest, parts_url: str | None = None):
    """Part first (complete: local rename, or a closed upload), then its manifest row."""
    if parts_url is None:
        (job_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)

    def commit(done: CompletedChunk) -> None:
        name = part_name(done.chunk.index, parts_url)
        checksum = store_part(job_dir, name, arrays={**done.outputs, "ok": done.ok}, strings={"ids": done.ids})
        manifest.note_server(done.server)
        manifest.commit_chunk(done.chunk.index, name, done.errors, done.server, checksum)

    return commit


def dispatch(ctx: RunContext, manifest: Manifest, serving: Serving, pending: list[Chunk],
             counts: dict[str, int]) -> Dispatched:
    """Send the pending chunks to the servers; the progress stays open for the merge."""
    started = time.monotonic()
    progress = _send(ctx, manifest, serving, pending, counts)
    return Dispatched(progress, sum(chunk.rows for chunk in pending), time.monotonic() - started)


def _send(ctx: RunContext, manifest: Manifest, serving: Serving, pending: list[Chunk],
          counts: dict[str, int]) -> Progress:
    spec, info = ctx.spec, serving.info
    fields = dict(serving.fields)
    parts_url = spec.output.parts if ctx.hooks.merge_output else None
    source = RequestSource(serving.adapted.reader, fields, {k: info.inputs[k][0] for k in fields}, info.name,
                           spec.model.version)
    source.context = serving.adapted.context
    source.outputs = stored_outputs(spec, info)
    source.parameters = dict(spec.model.parameters)
    source.sparse = {name for name in fields if name in info.sparse_inputs}
    progress: Progress | None = None

    def counted(item: CompletedChunk) -> None:
        if progress is not None:
            progress.add(item.chunk.rows, len(item.errors))

    commit = (ctx.hooks.wrap_commit or (lambda commit: commit))(committer(ctx.job_dir, manifest, parts_url))
    dispatcher = Dispatcher(
        servers=list(serving.servers), source=source, chunks=pending, commit=commit,
        policy=spec.policy, options=ctx.fleet.connection,
        on_lease=manifest.note_lease, on_commit=counted, verified=serving.verified, on_stall=ctx.fleet.stalled,
    )
    progress = Progress(
        ctx.job_dir, total_rows=counts["rows"], done_rows=counts["rows_done"], failed_rows=counts["rows_failed"],
        servers=lambda: [s.summary() for s in dispatcher.servers], output=str(ctx.output),
        stream=ctx.options.progress_stream, computed=lambda: sum(s.rows for s in dispatcher.servers),
    )

    async def run() -> None:
        task = asyncio.create_task(dispatcher.run())
        discovery = Discovery(spec.model.servers, list(serving.servers))
        while not task.done():
            progress.tick()
            for address in discovery.poll(time.monotonic()):
                dispatcher.add_server(address)
            await asyncio.wait([task], timeout=0.2)
        task.result()

    try:
        asyncio.run(run())
    except (DispatchFatal, InputError) as error:  # InputError: the input refused a read mid-run
        progress.close("failed")
        raise JobFatal(str(error)) from None
    except (OSError, sqlite3.OperationalError) as error:
        if not is_disk_full(error):
            raise
        with contextlib.suppress(OSError):
            progress.close("failed")
        raise disk_full(error, ctx.job_dir, ctx.output) from None
    except BaseException:
        progress.close("interrupted")
        raise
    return progress
