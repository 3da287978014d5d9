"""A tool stage of a multi-stage job: a command over one chunk of rows at a time, checkpointed
per (stage, chunk) exactly like a model stage.

The stage plans its rows into chunks (`chunking.chunk_rows`), records the plan in its own
manifest, and runs up to `concurrency` chunks at once on the coordinator's host. For each chunk
it writes the rows into a fresh scratch folder, runs the tool (tool_io.py), reads the results
back by id and commits them as a part file, so the next stage, `status`, `--retry-failed`, the
resume and the merge treat it as any stage. A resume skips the committed chunks; a chunk whose
tool failed (non-zero exit, timeout, no readable result) is committed with its rows failed,
the tool's stderr tail in their error, so one bad chunk does not stop the job.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from threading import Lock

import numpy as np

from tensorfleet.core.hashing import file_sha256
from tensorfleet.core.version import __version__ as tensorfleet_version

from ..engine.dispatch_phase import committer
from ..engine.job import JobFatal, RunOptions, RunResult
from ..engine.job_dir import prepare_job_dir, writer_manifest
from ..engine.leases import CompletedChunk
from ..engine.manifest import MANIFEST_NAME, Manifest, RowError, drop_damaged_parts
from ..engine.plan_phase import check_inputs
from ..engine.planner import Chunk, PlanError, make_plan
from ..engine.progress import write_json_atomic
from ..io.readers import InputError, Reader
from ..spec.kinds import PipelineSpec, StageSpec
from ..spec.tool_stage import executable_problem
from .tool_io import (
    ToolFailed,
    argv_for,
    assemble,
    kill_group,
    read_results,
    run_tool,
    write_inputs,
)

SCRATCH_DIR = "scratch"


def tool_outputs(stage: StageSpec) -> dict[str, tuple[str, list[int]]]:
    """What the stage outputs, as a model's metadata would declare it: a fan-out stage's outputs
    have a leading entry axis (-1) and `<fan_out>_count` says how many entries each row has."""
    assert stage.read is not None
    declared = stage.read.declared()
    if not stage.fan_out:
        return declared
    out = {name: (datatype, [-1, *shape]) for name, (datatype, shape) in declared.items()}
    out[f"{stage.fan_out}_count"] = ("INT32", [])
    return out


def tool_facts(stage: StageSpec) -> dict:
    """The tool's provenance: the command and the executable's digest (a rebuilt tool is another tool)."""
    assert stage.command is not None
    return {"tool": stage.command[0], "tool_sha256": file_sha256(stage.command[0]), "command": list(stage.command)}


def _settings(stage: StageSpec) -> dict:
    """What a resume must find unchanged: the command and how rows go in and results come out."""
    return {"command": list(stage.command or []), "write": stage.write.model_dump() if stage.write else None,
            "read": stage.read.model_dump() if stage.read else None, "fan_out": stage.fan_out}


def _write_state(stage_dir: Path, state: str, output: Path) -> None:
    write_json_atomic(stage_dir / "status.json",
                      {"state": state, "output": str(output), "updated": time.time(), "pid": os.getpid()})


@dataclass
class ToolStage:
    """One run of a tool stage over `reader` (the job's input, or the earlier stages' outputs)."""

    spec: PipelineSpec
    index: int
    reader: Reader
    stage_dir: Path
    output: Path
    options: RunOptions
    wrap_commit: Callable | None = None
    #: The previous stage's outputs, whose failed rows are not handed to the tool (carried along).
    upstream: Reader | None = None

    @property
    def stage(self) -> StageSpec:
        return self.spec.stages[self.index]

    def fields(self) -> list[str]:
        assert self.stage.write is not None
        fields = [f.removeprefix("input:") if self.index == 0 else f for f in self.stage.write.fields]
        offered = self.reader.fields()
        missing = [f for f in fields if f not in offered]
        if missing:
            raise JobFatal(f"write.fields: {missing} are not fields of what this stage reads (it offers "
                           f"{sorted(offered)})")
        return fields

    def check(self) -> None:
        """Before anything runs: the tool can be started."""
        assert self.stage.command is not None
        problem = executable_problem(self.stage.command[0])
        if problem:
            raise JobFatal(f"cannot run the tool: {problem}")

    def run(self) -> RunResult:
        self.check()
        started = time.monotonic()
        manifest, _ = prepare_job_dir(self.stage_dir, self.output, self.options)
        try:
            fields = self.fields()
            manifest = self._resumed(manifest) if manifest is not None else self._planned(fields)
            done = manifest.done_chunks()
            pending = [chunk for chunk in manifest.chunks() if chunk.index not in done]
            _write_state(self.stage_dir, "running", self.output)
            computed = self._compute(manifest, pending, fields) if pending else 0
            counts = manifest.counts()
            _write_state(self.stage_dir, "done", self.output)
            return RunResult(None, self.stage_dir, counts["rows"], counts["rows_failed"], computed,
                             time.monotonic() - started, servers=[f"tool {Path(self.stage.command[0]).name}"])
        except BaseException:
            with contextlib.suppress(OSError):
                _write_state(self.stage_dir, "failed", self.output)
            raise
        finally:
            if manifest is not None:
                manifest.close()

    # --- plan, or the resume's check ------------------------------------------------------------
    def _planned(self, fields: list[str]) -> Manifest:
        if self.reader.num_rows == 0 and self.index == 0:
            raise JobFatal(f"input {self.spec.input.path} has no rows")
        rows = self.spec.chunking.chunk_rows
        try:
            plan = make_plan(self.reader, {f: f for f in fields}, batch_rows=rows, chunk_rows=rows,
                             limit=self.options.limit)
        except PlanError as error:
            raise JobFatal(str(error)) from None
        manifest = writer_manifest(lambda: Manifest(self.stage_dir / MANIFEST_NAME, lock=True))
        assert manifest is not None
        manifest.record_plan(plan)
        manifest.set_meta("model", tool_facts(self.stage))
        manifest.set_meta("tool", _settings(self.stage))
        manifest.set_meta("outputs", {k: list(v) for k, v in tool_outputs(self.stage).items()})
        return manifest

    def _resumed(self, manifest: Manifest) -> Manifest:
        check_inputs(manifest)
        drop_damaged_parts(self.stage_dir, manifest)
        stored, now = manifest.meta("tool"), _settings(self.stage)
        if stored != now:
            changed = sorted(k for k in now if (stored or {}).get(k) != now[k])
            raise JobFatal(f"the tool stage changed since it began ({', '.join(changed)}); run with --restart "
                           "to start over with the new settings")
        facts = manifest.meta("model") or {}
        if facts.get("tool_sha256") != file_sha256(self.stage.command[0]):  # type: ignore[index]
            raise JobFatal(f"the tool {self.stage.command[0]} changed since its chunks were computed "  # type: ignore[index]
                           "(its sha256 differs); restore it to continue, or --restart")
        return manifest

    # --- the chunks -----------------------------------------------------------------------------
    def _compute(self, manifest: Manifest, pending: list[Chunk], fields: list[str]) -> int:
        # A killed run's folders go; this run's are its own (a tool orphaned by a kill -9 may still
        # write to its absolute {outputs} path, which must not be this run's)
        shutil.rmtree(self.stage_dir / SCRATCH_DIR, ignore_errors=True)
        scratch_root = self.stage_dir / SCRATCH_DIR / f"run-{os.getpid()}"
        scratch_root.mkdir(parents=True)
        commit = (self.wrap_commit or (lambda c: c))(committer(self.stage_dir, manifest))
        read_lock, running = Lock(), set()
        queue = list(pending)
        computed = 0
        executor = ThreadPoolExecutor(max_workers=self.stage.concurrency, thread_name_prefix=f"tool-{self.stage.name}")
        futures: set[Future] = set()
        try:
            while queue or futures:
                while queue and len(futures) < self.stage.concurrency:
                    chunk = queue.pop(0)
                    futures.add(executor.submit(self._chunk, chunk, fields, scratch_root, read_lock, running))
                finished, futures = wait(futures, return_when=FIRST_COMPLETED)
                for future in finished:
                    done = future.result()
                    commit(done)  # in this thread only: the manifest is used from one thread
                    computed += done.chunk.rows
        except InputError as error:
            raise JobFatal(str(error)) from None
        finally:
            for pid in list(running):
                kill_group(pid)
            executor.shutdown(wait=True, cancel_futures=True)
        return computed

    def _chunk(self, chunk: Chunk, fields: list[str], scratch_root: Path, read_lock: Lock,
               running: set[int]) -> CompletedChunk:
        stage = self.stage
        assert stage.write is not None and stage.read is not None and stage.command is not None
        with read_lock:  # readers are used from one thread at a time
            ids = self.reader.ids(chunk.start, chunk.stop)
            values = {name: self.reader.read(name, chunk.start, chunk.stop) for name in fields}
            upstream = getattr(self.upstream, "ok", None)
            send = np.asarray(upstream(chunk.start, chunk.stop), dtype=bool) if upstream else np.ones(chunk.rows, bool)
        scratch = scratch_root / f"chunk-{chunk.index:07d}"
        scratch.mkdir()
        (scratch / "outputs").mkdir()
        inputs, errors = write_inputs(stage.write, scratch, ids, values, send)
        for offset in errors:
            send[offset] = False
        declared = tool_outputs(stage)
        failed = False
        try:
            if send.any():
                argv = argv_for(stage.command, {
                    "{inputs}": str(inputs), "{outputs}": str(scratch / "outputs"), "{scratch}": str(scratch),
                    "{chunk}": str(chunk.index), "{threads}": str(stage.threads),
                })
                run_tool(argv, scratch, stage.timeout_s, running)
                results = read_results(stage.read, scratch / "outputs", [str(ids[o]) for o in np.nonzero(send)[0]])
            else:
                results = {}
            assembled = assemble(stage.read, declared, ids, send, results, stage.fan_out)
        except ToolFailed as error:
            failed = True
            message = f"tool stage {stage.name}, chunk {chunk.index} (rows {chunk.start}-{chunk.stop - 1}): {error}"
            assembled = assemble(stage.read, declared, ids, np.zeros(chunk.rows, bool), {}, stage.fan_out)
            errors.update({int(o): (error.code, message) for o in np.nonzero(send)[0]})
        errors.update(assembled.errors)
        row_errors = [RowError(chunk.start + offset, str(ids[offset]), code, message)
                      for offset, (code, message) in sorted(errors.items())]
        if not failed:  # a failed chunk's folder stays, for a look at what the tool was given
            shutil.rmtree(scratch, ignore_errors=True)
        return CompletedChunk(chunk, ids, assembled.ok, assembled.outputs, row_errors, f"tool {Path(stage.command[0]).name}")


def tool_provenance(spec: PipelineSpec, manifest: Manifest, extra: dict) -> dict:
    """The provenance of an output merged from a tool stage's parts."""
    settings = manifest.plan_settings()
    return {"tensorfleet_version": tensorfleet_version, **(manifest.meta("model") or {}), "job_name": spec.name,
            "inputs": [{"path": i.path, "size": i.size, "sha256": i.sha256} for i in manifest.inputs()],
            "chunk_rows": settings.get("chunk_rows"), **extra}
