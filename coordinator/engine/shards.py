"""The end of a shard's run: the merge of every shard's parts into the job's one output, once
every shard of that run is complete (the last shard to finish does it; `tensorfleet merge` too).

A run (a plain job, a pipeline's last stage, a sweep's (model, source) pair, an in-context run)
is computed by every shard in its own folder, `<job folder>/shards/I-of-N/<run>`; the merge
reads those N manifests as one (`ShardManifests`): the chunks of all shards in input order, the
plan every shard made (the same, checked), the ids digest of the whole input (checked over
every part, as a one-coordinator merge checks it). One merge runs at a time (a lock in
`<job folder>/shards/`); what it wrote is recorded in `shards/merged/`, with the shards'
commits it read, so a finished job is not merged again and a shard computed again is.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..fleet.model_info import ModelInfo
from ..io.joblock import JobLock, JobLocked
from ..io.objectstore import is_url
from ..io.row_error import RowError
from ..spec.errors import JobFatal
from .job_dir import close_progress, same_file
from .manifest import Manifest
from .merge_phase import merge_output
from .plan_phase import adapt_run
from .planner import Chunk, InputFingerprint
from .provenance import output_provenance
from .run_types import Adapted, Dispatched, RunContext, RunResult, Serving
from .shard_plan import SHARDS_DIR, ShardRole, recorded_info, shard_folder, write_json_once

MERGED_DIR = "merged"
_POLL_S = 0.2


class ShardManifests:
    """One run's manifests in every shard's folder, read as the one manifest the merge reads."""

    def __init__(self, top: Path, count: int, run: Path) -> None:
        self.top, self.count, self.run = top, count, run
        self.manifests: list[Manifest | None] = [
            Manifest.open_existing(shard_folder(top, index, count) / run) for index in range(count)
        ]
        self._owners: dict[int, int] | None = None

    def close(self) -> None:
        for manifest in self.manifests:
            if manifest is not None:
                manifest.close()

    def _planned(self) -> list[tuple[int, Manifest]]:
        return [(i, m) for i, m in enumerate(self.manifests) if m is not None and m.has_plan()]

    # --- completeness ------------------------------------------------------------------------
    def incomplete(self) -> list[str]:
        """Each shard of this run not complete yet, with its progress, e.g. `shard 1/3 (rows 64/128, chunks 1/2)`."""
        waiting = []
        for index, manifest in enumerate(self.manifests):
            label = f"shard {index}/{self.count}"
            if manifest is None or not manifest.has_plan():
                waiting.append(f"{label} (not started)")
                continue
            counts = manifest.counts()
            if counts["chunks_done"] < counts["chunks"]:
                waiting.append(f"{label} (rows {counts['rows_done']}/{counts['rows']}, "
                               f"chunks {counts['chunks_done']}/{counts['chunks']})")
        return waiting

    def check_same_plan(self) -> None:
        """Every shard planned the same job (settings and ids digest): their slices fit together."""
        planned = self._planned()
        first_index, first = planned[0]
        for index, manifest in planned[1:]:
            if manifest.plan_settings() != first.plan_settings():
                raise JobFatal(
                    f"{self.run}: shard {index}/{self.count} was planned with other settings or input than shard "
                    f"{first_index}/{self.count}; run it again with --shard {index}/{self.count} --restart"
                )

    def fingerprint(self) -> list[list[Any]]:
        """What the shards have committed: a merge of other commits is out of date."""
        out = []
        for index, manifest in self._planned():
            commits = manifest.commits()
            counts = manifest.counts()
            out.append([index, counts["chunks_done"], counts["rows_failed"], commits[-1][0] if commits else 0.0])
        return out

    # --- the Manifest the merge reads ------------------------------------------------------------
    def chunks(self) -> list[Chunk]:
        return sorted((c for _, m in self._planned() for c in m.chunks()), key=lambda chunk: chunk.index)

    def done_chunks(self) -> set[int]:
        return {index for _, m in self._planned() for index in m.done_chunks()}

    def _owner(self) -> dict[int, int]:
        """chunk -> the shard that planned it (read once: the merge reads complete shards)."""
        if self._owners is None:
            self._owners = {chunk.index: shard for shard, m in self._planned() for chunk in m.chunks()}
        return self._owners

    def part_of(self, chunk: int) -> str | None:
        """The part's name relative to `<job folder>/shards` (a URL as it is)."""
        shard = self._owner().get(chunk)
        manifest = self.manifests[shard] if shard is not None else None
        name = manifest.part_of(chunk) if manifest is not None else None
        if name is None or is_url(name):
            return name
        return str(Path(f"{shard}-of-{self.count}") / self.run / name)

    def counts(self) -> dict[str, int]:
        total = {"chunks": 0, "chunks_done": 0, "rows": 0, "rows_done": 0, "rows_failed": 0}
        for _, manifest in self._planned():
            for key, value in manifest.counts().items():
                total[key] += value
        total["rows"] = int(self.plan_settings().get("rows", total["rows"]))  # the plan's rows: all covered?
        return total

    def errors(self, start: int = 0, stop: int | None = None) -> list[RowError]:
        return sorted((e for _, m in self._planned() for e in m.errors(start, stop)), key=lambda e: e.row)

    def plan_settings(self) -> dict:
        planned = self._planned()
        return planned[0][1].plan_settings() if planned else {}

    def inputs(self) -> list[InputFingerprint]:
        planned = self._planned()
        return planned[0][1].inputs() if planned else []

    def servers(self) -> list[str]:
        return sorted({address for _, m in self._planned() for address in m.servers()})

    def meta(self, key: str, default: Any = None) -> Any:
        if key == "merged":
            try:
                return json.loads(self._merged_path().read_text())
            except (OSError, ValueError):
                return default
        for _, manifest in sorted(self._planned(), key=lambda item: not item[1].counts()["chunks"]):
            value = manifest.meta(key)  # a shard that computed rows first: its servers' model build
            if value is not None:
                return value
        return default

    def set_meta(self, key: str, value: Any) -> None:
        if key != "merged":
            raise ValueError(f"a sharded job's manifests are the shards' own; '{key}' is not set here")
        self._merged_path().parent.mkdir(parents=True, exist_ok=True)
        write_json_once(self._merged_path(), {**value, "shards": self.fingerprint()})

    def _merged_path(self) -> Path:
        name = "__".join(self.run.parts) or "job"
        return self.top / SHARDS_DIR / MERGED_DIR / f"{name}.json"


# --- one merge at a time ------------------------------------------------------------------------------
_held: dict[str, tuple[JobLock, int]] = {}
_held_lock = threading.Lock()


@contextlib.contextmanager
def merge_lock(top: Path) -> Iterator[None]:
    """Held while a shard checks whether every shard is complete and merges: one merge at a time,
    across processes and hosts (a JobLock in `<job folder>/shards/`), re-entrant in a process
    (a sweep's sheets are written under the lock its pairs' merges took)."""
    folder = top / SHARDS_DIR
    key = str(folder)
    while True:
        with _held_lock:
            if key in _held:
                lock, depth = _held[key]
                _held[key] = (lock, depth + 1)
                break
            try:
                folder.mkdir(parents=True, exist_ok=True)
                _held[key] = (JobLock(folder), 1)
                break
            except JobLocked:
                pass
        time.sleep(_POLL_S)  # another shard merges: a merge takes as long as it takes to write
    try:
        yield
    finally:
        with _held_lock:
            lock, depth = _held[key]
            if depth == 1:
                del _held[key]
                lock.release()
            else:
                _held[key] = (lock, depth - 1)


# --- the end of a shard's run ---------------------------------------------------------------------------
def merged_path(ctx: RunContext, role: ShardRole) -> Path:
    """Where this run's merged output goes: the job's output, or, for a run whose output lives in
    its folder (a sweep's pair, an in-context run), the same place under the job folder."""
    try:
        return role.top / ctx.output.relative_to(role.folder)  # type: ignore[operator]
    except ValueError:
        return ctx.output


def finish_shard(ctx: RunContext, manifest: Manifest, adapted: Adapted | None, serving: Serving | None,
                 dispatched: Dispatched, servers: list[str]) -> RunResult:
    """This shard's run is complete: merge every shard's parts when they all are, else say who is left."""
    role = ctx.options.shard
    assert role is not None and role.top is not None
    own = manifest.counts()
    close_progress(ctx, dispatched.progress, "done" if not own["rows_failed"] else "done_with_errors")
    run = ctx.job_dir.relative_to(role.folder)
    output = merged_path(ctx, role)
    with merge_lock(role.top):
        shards = ShardManifests(role.top, role.count, run)
        try:
            waiting = shards.incomplete()
            if waiting:
                if role.merge_only:
                    raise JobFatal(f"the merge needs every shard complete; not yet: {', '.join(waiting)}")
                text = f"{role.label}: done; the merge waits for {', '.join(waiting)}"
                return RunResult(None, ctx.job_dir, own["rows"], own["rows_failed"], dispatched.rows_computed,
                                 dispatched.seconds, servers=servers, plan_text=text)
            shards.check_same_plan()
            merged = shards.meta("merged")
            if merged and same_file(output, merged.get("stat")) and merged.get("shards") == shards.fingerprint():
                counts = shards.counts()
                return RunResult(output, role.top, counts["rows"], merged["rows_failed"], dispatched.rows_computed,
                                 dispatched.seconds, columns={k: (v[0], v[1]) for k, v in merged["columns"].items()},
                                 servers=servers)
            info = _model_info(ctx, serving)
            adapted = adapted or adapt_run(ctx, info)  # the merge copies input columns from its reader
            made = output_provenance(ctx.spec, shards, info, ctx.hooks.provenance)  # type: ignore[arg-type]
            output.parent.mkdir(parents=True, exist_ok=True)
            at_top = replace(ctx, job_dir=role.top / SHARDS_DIR, output=output)  # part names are relative to it
            result = merge_output(at_top, shards, adapted, made,  # type: ignore[arg-type]
                                  Dispatched(None, dispatched.rows_computed, dispatched.seconds), servers)
            result.job_dir = role.top
            return result
        finally:
            shards.close()


def _model_info(ctx: RunContext, serving: Serving | None) -> ModelInfo:
    """The served model's description; else the one this shard recorded (no server is asked: a
    merge job runs where the servers are gone); else the fleet's (a local fleet's config)."""
    if serving is not None:
        return serving.info
    return recorded_info(ctx.job_dir) or ctx.fleet.info()
