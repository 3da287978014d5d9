"""The job folder around the phases: open it for a fresh run or a resume (one writer at a time),
record a fresh plan, write the run's state, and the disk-full message."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..io.joblock import JobLocked
from ..spec.errors import JobFatal
from .manifest import MANIFEST_NAME, Manifest
from .progress import Progress, write_json_atomic
from .run_types import Planned, RunContext, RunOptions, Serving


def writer_manifest(open_manifest: Callable[[], Manifest | None]) -> Manifest | None:
    """The manifest, held for writing (docs/reliability.md: one coordinator per job folder)."""
    try:
        return open_manifest()
    except JobLocked as error:
        raise JobFatal(str(error)) from None


def disk_full(error: BaseException, job_dir: Path, output: Path) -> JobFatal:
    return JobFatal(
        f"no space left to write the job ({error}); free space on the disk holding {job_dir} "
        f"(and {output.parent}), then run again with --resume: committed chunks are kept"
    )


def prepare_job_dir(job_dir: Path, output: Path, options: RunOptions) -> tuple[Manifest | None, bool]:
    """(existing manifest to resume, whether this run created the folder)."""
    existing = writer_manifest(lambda: Manifest.open_existing(job_dir, lock=True))
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


def new_manifest(ctx: RunContext) -> Manifest:
    manifest = writer_manifest(lambda: Manifest(ctx.job_dir / MANIFEST_NAME, lock=True))
    assert manifest is not None
    return manifest


def record_plan(manifest: Manifest, ctx: RunContext, planned: Planned, serving: Serving) -> None:
    """A fresh run's manifest, once its servers serve: the plan, the model's provenance, the spec."""
    assert planned.plan is not None
    manifest.record_plan(planned.plan)
    manifest.set_meta("model", serving.info.provenance())
    manifest.set_meta("spec_sha256", ctx.spec.digest())
    manifest.set_meta("outputs", {k: list(v) for k, v in serving.info.outputs.items()})
    manifest.set_meta("input_report", serving.adapted.report.facts)


def reopen_failed_chunks(job_dir: Path, manifest: Manifest) -> None:
    """--retry-failed: chunks committed with failed rows are computed again, whole (a server
    that was lost, a device that failed, a model since fixed); their rows failed before."""
    chunks = manifest.chunks_with_failures()
    if chunks:
        rows = sum(failed for _, failed in chunks)
        print(f"{job_dir}: computing again {len(chunks)} chunk(s) holding {rows} failed row(s) (--retry-failed)",
              file=sys.stderr)
        manifest.reset_chunks(index for index, _ in chunks)


def write_state(ctx: RunContext, state: str) -> None:
    # the pid lets a reader tell a live "starting" from one whose process was killed (run_progress.live_state)
    write_json_atomic(ctx.status_path, {"state": state, "output": str(ctx.output), "updated": time.time(),
                                        "pid": os.getpid()})


def close_progress(ctx: RunContext, progress: Progress | None, state: str) -> None:
    if progress is not None:
        progress.close(state)
    else:
        write_state(ctx, state)


def up_to_date(target: Path, sources: list[Path | None]) -> bool:
    """`target` exists and is no older than every source: a resume that computed nothing keeps it."""
    if not target.is_file() or any(p is None or not p.is_file() for p in sources):
        return False
    mtime = target.stat().st_mtime_ns
    return all(p.stat().st_mtime_ns <= mtime for p in sources if p is not None)


def file_stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def same_file(path: Path, stat: list[int] | None) -> bool:
    return stat is not None and path.is_file() and file_stat(path) == list(stat)
