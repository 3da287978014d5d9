"""Sharded jobs: `tensorfleet run JOB --shard I/N`, `tensorfleet merge JOB`, and a plain `run` of a
sharded job folder, for a job of any kind.

Shard I runs the job, of its kind, in its own folder `<job folder>/shards/I-of-N/`, on the I-th
of N contiguous slices of every run's plan (engine/shard_plan.py); the last shard to finish
merges every shard's parts into the job's one output (engine/shards.py), as `tensorfleet merge`
does once every shard is complete. Nothing but `shards.json` (N, the same bytes from every
shard, written atomically) is written by two shards, so N coordinators on N hosts sharing the
folder never race. `tensorfleet run JOB` with no --shard on a sharded folder runs every shard
in turn in this process (a resume, or a --retry-failed, of the whole job), then the merge.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..engine.job import JobFatal, RunOptions, RunResult
from ..engine.manifest import MANIFEST_NAME
from ..engine.shard_plan import MARKER_NAME, SHARDS_DIR, ShardRole, shard_count, write_json_once
from ..engine.status import MARKER_NAME as WORKFLOW_MARKER

RunKind = Callable[[Any, RunOptions], RunResult]
#: How often `tensorfleet merge --wait` looks at the shards again.
WAIT_POLL_S = 2.0


class ShardsIncomplete(JobFatal):
    """`tensorfleet merge` before every shard is complete (exit 2); the message names them."""


def run_sharded(spec: Any, options: RunOptions, top: Path, run_kind: RunKind) -> RunResult | None:
    """A run of a sharded job (None: the job in `top` is not sharded and no --shard was given)."""
    role = options.shard
    top = top.resolve()
    count = shard_count(top)
    if role is None:
        if count is None:
            return None
        if options.restart:  # start over, with one coordinator
            shutil.rmtree(top / SHARDS_DIR, ignore_errors=True)
            (top / MARKER_NAME).unlink(missing_ok=True)
            return None
        result = None
        for index in range(count):
            result = run_shard(spec, options, ShardRole(index, count, top), run_kind)
        assert result is not None
        return result
    if count is not None and count != role.count:
        raise JobFatal(f"{top} holds this job in {count} shards, not {role.count}: run --shard I/{count}, "
                       f"or give {role.count} shards another --job-dir")
    if (top / MANIFEST_NAME).is_file() or (top / WORKFLOW_MARKER).is_file():
        raise JobFatal(f"{top} holds this job run by one coordinator; finish it with `tensorfleet run` (no --shard), "
                       f"or give the sharded run another --job-dir")
    top.mkdir(parents=True, exist_ok=True)
    write_json_once(top / MARKER_NAME, {"count": role.count})
    return run_shard(spec, options, replace(role, top=top), run_kind)


def run_shard(spec: Any, options: RunOptions, role: ShardRole, run_kind: RunKind) -> RunResult:
    """One shard of the job, in its folder; the merge too when it is the last to finish.

    Each run merges when the shard finishing it last finds every shard has it (engine/shards.py).
    A job that combines runs (a sweep's sheets, an in-context job's control) is combined by a
    last pass, once every shard is complete: under the merge lock, so one shard at a time goes
    through the job again (a finished run is a manifest read; what is merged already is kept)."""
    from ..engine.shard_status import incomplete_shards
    from ..engine.shards import merge_lock

    assert role.top is not None
    result = run_kind(spec, replace(options, job_dir=role.folder, shard=role))
    if result.output is None and not role.final and not incomplete_shards(role.top, role.count):
        last = replace(options, job_dir=role.folder, shard=replace(role, final=True), resume=True, restart=False,
                       retry_failed=False)
        with merge_lock(role.top):
            result = run_kind(spec, last)
    if result.output is None and not result.plan_text:
        waiting = incomplete_shards(role.top, role.count)
        result.plan_text = f"{role.label}: done" + (f"; the merge waits for {', '.join(waiting)}" if waiting else "")
    if result.output is None:
        result.plan_text += f"\njob folder: {result.job_dir}\n(the last shard to finish merges; or `tensorfleet merge`)"
    return result


def merge_shards(spec: Any, options: RunOptions, top: Path, run_kind: RunKind, wait: bool = False) -> RunResult:
    """`tensorfleet merge JOB`: the one output from every shard's parts; ShardsIncomplete (naming
    each shard not complete, with its progress) while one is not, unless `wait`: then it waits."""
    from ..engine.shard_status import incomplete_shards
    from ..engine.shards import merge_lock

    top = top.resolve()
    count = shard_count(top)
    while wait and count is None:  # the merge Job may start before any shard
        time.sleep(WAIT_POLL_S)
        count = shard_count(top)
    if count is None:
        raise JobFatal(f"{top} holds no sharded job (no {MARKER_NAME}); `tensorfleet merge` merges the shards "
                       f"of `tensorfleet run JOB --shard I/N`")
    waiting = incomplete_shards(top, count)
    shown = None
    while wait and waiting:
        if waiting != shown:
            print(f"tensorfleet: waiting for {'; '.join(waiting)}", file=sys.stderr, flush=True)
            shown = waiting
        time.sleep(WAIT_POLL_S)
        waiting = incomplete_shards(top, count)
    if waiting:
        raise ShardsIncomplete(f"not merged: {len(waiting)} of {count} shards are not complete: {'; '.join(waiting)}. "
                               f"Run each with `tensorfleet run JOB --shard I/{count}` (the last to finish merges)")
    merging = replace(options, resume=True, restart=False, retry_failed=False)
    with merge_lock(top):
        result = run_shard(spec, merging, ShardRole(0, count, top, merge_only=True, final=True), run_kind)
    if result.output is None:
        raise JobFatal(f"the merge of {top} did not complete: {result.plan_text}")
    return result


def common_chunk_unit(runs: list[tuple[Any, Any]]) -> int:
    """Rows every shard edge is a multiple of, for runs that read each other's rows (a pipeline's
    stages, each (JobSpec, ModelInfo)): a chunk edge of every run's plan."""
    from ..engine.plan_phase import batching
    from ..engine.shard_plan import chunk_unit, common_unit

    units = []
    for sub, info in runs:
        batch_rows, token_budget = batching(sub, info)
        units.append(chunk_unit(batch_rows, token_budget, sub.chunking.chunk_rows))
    return common_unit(units)

