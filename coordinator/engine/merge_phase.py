"""The merge phase: the committed parts into the job's one output (skipped when an earlier run's
output is still there, untouched), with the run's provenance."""

from __future__ import annotations

import contextlib
import sqlite3

import numpy as np

from ..fleet.model_info import ModelInfo
from ..io.filesystems import is_disk_full
from ..io.objectstore import ObjectStoreError
from ..spec.errors import JobFatal
from .job_dir import close_progress, disk_full, file_stat, same_file
from .manifest import Manifest
from .provenance import output_provenance
from .run_types import Adapted, Dispatched, RunContext, RunResult


def provenance(ctx: RunContext, manifest: Manifest, info: ModelInfo | None) -> dict:
    """What the output records about how it was made (engine/provenance.py), with the workflow's own."""
    return output_provenance(ctx.spec, manifest, info, ctx.hooks.provenance)


def unchanged_output(ctx: RunContext, manifest: Manifest, dispatched: Dispatched) -> RunResult | None:
    """Finished before and its output untouched since: nothing to compute, nothing to write."""
    merged = manifest.meta("merged")
    if dispatched.rows_computed or not merged or not same_file(ctx.output, merged.get("stat")):
        return None
    close_progress(ctx, dispatched.progress, "done" if not merged["rows_failed"] else "done_with_errors")
    return RunResult(
        output=ctx.output, job_dir=ctx.job_dir, rows=manifest.counts()["rows"], rows_failed=merged["rows_failed"],
        rows_computed=0, seconds=dispatched.seconds, columns={k: (v[0], v[1]) for k, v in merged["columns"].items()},
        servers=[],
    )


def merge_output(ctx: RunContext, manifest: Manifest, adapted: Adapted, made: dict, dispatched: Dispatched,
                 servers: list[str]) -> RunResult:
    """Merge the parts into ctx.output; `made` is the provenance (see provenance())."""
    from ..io.writers import Column
    from .merge import MergeError, MergeInputs, merge

    reader, progress = adapted.reader, dispatched.progress  # the merge copies input columns from this reader
    fields = reader.fields()
    kept = [Column(name, name, fields[name].dtype, fields[name].row_shape, from_input=True, kept=True)
            for name in ctx.spec.output.keep_input if name in fields]  # output.keep_input, checked by the plan
    columns = (*kept, *(Column(f.name, f.name, f.dtype, f.row_shape, from_input=True) for f in reader.stored_fields()))
    inputs = MergeInputs(
        job_dir=ctx.job_dir, output=ctx.spec.output, input_spec=ctx.spec.input, provenance=made,
        limit=ctx.options.limit, final_path=ctx.output, input_columns=columns, leading=len(kept),
        input_values=lambda start, stop: {c.name: reader.read(c.source, start, stop) for c in columns},
    )
    try:
        result = merge(manifest, inputs)
    except (MergeError, ObjectStoreError, ValueError, OSError, sqlite3.OperationalError) as error:
        with contextlib.suppress(OSError):
            close_progress(ctx, progress, "failed")
        if is_disk_full(error):
            raise disk_full(error, ctx.job_dir, ctx.output) from None
        raise JobFatal(f"merge failed: {error}") from None
    columns = {c.name: (list(c.row_shape), str(np.dtype(c.dtype))) for c in result.columns}
    manifest.set_meta("merged", {"stat": file_stat(result.path), "rows_failed": result.rows_failed, "columns": columns})
    close_progress(ctx, progress, "done" if not result.rows_failed else "done_with_errors")
    return RunResult(
        output=result.path, job_dir=ctx.job_dir, rows=manifest.counts()["rows"], rows_failed=result.rows_failed,
        rows_computed=dispatched.rows_computed, seconds=dispatched.seconds, columns=columns, servers=servers,
    )
