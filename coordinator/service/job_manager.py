"""The service's job lifecycle: queue, start, watch, time out, cancel, resume, recover after a crash.

States: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED; FAILED and CANCELLED jobs can be
queued again (ResumeJob) and continue from their manifest. Every change is an event.
Up to `max_jobs` jobs run at once (default 1); two jobs never share a job folder at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import yaml

from tensorfleet.core.exit_codes import EXIT_CRASH, EXIT_OK, EXIT_ROWS_FAILED

from ..engine.run_progress import LIVE
from ..io.objectstore import is_url
from ..io.output_files import replace_refusal
from ..spec import SpecError
from ..spec.kinds import AnyJob, paths_of
from ..spec.safe_yaml import MAX_SPEC_BYTES, SpecMalformed, SpecTooLarge, load_yaml
from ..workflows.api import RunOptions, locations, parse
from . import job_process
from .job_policy import JobPolicy, PolicyError
from .jobstore import CANCELLED, FAILED, FINAL, QUEUED, RUNNING, SUCCEEDED, JobRecord, JobStore

CANCEL_REQUESTED = "cancel requested"

log = logging.getLogger("tensorfleet.coordinator.service")



class JobRequestError(Exception):
    """A request the service refuses (bad spec, unknown job, wrong state); carries a gRPC-ish kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "invalid", "not_found", "precondition", "denied", "exhausted"


@dataclass
class PreparedJob:
    """A submission that passed every check (JobManager.prepare), not yet recorded."""

    spec: AnyJob
    #: The resolved spec as the engine will read it (job.yaml).
    text: str


@dataclass
class _Attempt:
    process: Popen
    log_offset: int
    started: float
    cancel: bool = False
    timed_out: bool = False
    last_key: tuple = ()
    last_event: float = 0.0
    stop_sent: float = 0.0


@dataclass
class JobManager:
    store: JobStore
    state_dir: Path
    max_jobs: int = 1
    #: Finished jobs whose records and logs are kept (the most recent); older ones are forgotten.
    keep_finished: int = 1000
    poll_interval: float = 0.25
    progress_interval: float = 1.0
    attempts: dict[str, _Attempt] = field(default_factory=dict)
    #: What submitted jobs may touch (None: anything, as `tensorfleet run`; tests of the engine only).
    policy: JobPolicy | None = None
    #: Jobs waiting to run at once; more submissions get RESOURCE_EXHAUSTED.
    max_queued: int = 100

    def __post_init__(self) -> None:
        self.changed = asyncio.Condition()
        self._stopping = False

    # --- requests --------------------------------------------------------------------
    @staticmethod
    def parse_text(text: str) -> Any:
        """A submitted spec's text as data, within safe_yaml's limits. Touches no state: the service
        runs it in a worker thread, so a slow parse never holds the event loop (issue 28 #7)."""
        try:
            return load_yaml(text, "spec")
        except SpecTooLarge as error:
            raise JobRequestError("too_large", str(error)) from None
        except SpecMalformed as error:
            raise JobRequestError("invalid", str(error)) from None
        except yaml.YAMLError as error:
            raise JobRequestError("invalid", f"the spec is neither YAML nor JSON: {error}") from None

    def prepare(self, text: str, base_dir: str = "", timeout_s: float = 0.0, limit: int | None = None) -> PreparedJob:
        """Everything a submission is checked for that needs no state: parsed, validated, the policy,
        the output file and the resolved size. Thread-safe: the service runs it in a worker thread,
        so a large or hostile spec never holds the event loop (issue 28 #7)."""
        raw = self.parse_text(text)
        base = Path(base_dir or os.getcwd())
        if not base.is_absolute():
            raise JobRequestError("invalid", f"base_dir '{base_dir}' must be an absolute path")
        spec = self.accept(raw, base)
        if timeout_s < 0:
            raise JobRequestError("invalid", "timeout_s must be >= 0")
        dump = spec.model_dump(mode="json")
        if self.policy is not None:
            try:
                self.policy.check(dump)
            except PolicyError as error:
                raise JobRequestError("denied", f"job refused: {error}") from None
        # the engine reads the resolved spec under the same limit: refuse now what it would refuse then
        size = len(json.dumps(dump, separators=(",", ":")))
        spec_text = yaml.safe_dump(dump, sort_keys=False) if size <= MAX_SPEC_BYTES else ""
        size = max(size, len(spec_text.encode()))
        if size > MAX_SPEC_BYTES:
            raise JobRequestError("too_large", f"the spec, resolved with its defaults, is over {size} bytes; job "
                                  f"specs are limited to {MAX_SPEC_BYTES} (TENSORFLEET_MAX_SPEC_BYTES): split the job")
        self._check_output(spec, limit)
        return PreparedJob(spec, spec_text)

    def submit(self, text: str, base_dir: str = "", timeout_s: float = 0.0, limit: int | None = None,
               prepared: PreparedJob | None = None) -> JobRecord:
        """`prepared`: the submission already checked by `prepare` (the service does it off its event loop)."""
        prepared = prepared or self.prepare(text, base_dir, timeout_s, limit)
        spec, spec_text = prepared.spec, prepared.text
        queued = len(self.store.list({QUEUED}))
        if queued >= self.max_queued:
            raise JobRequestError("exhausted", f"{queued} jobs are queued, the most this coordinator takes "
                                  "(--max-queued-jobs); submit again when some have run")
        job_id = self.store.new_id(spec.name)
        folder = self.state_dir / "jobs" / job_id
        folder.mkdir(parents=True)
        spec_path = folder / "job.yaml"
        spec_path.write_text(spec_text)
        output, job_dir = locations(spec, RunOptions(limit=limit))
        if any(is_url(path) for _, path in paths_of(spec)):
            # Object storage: the manifest and staged files stay on local disk, under the state folder.
            job_dir = Path(spec.job_dir) if spec.job_dir else folder / "work"
        record = JobRecord(
            id=job_id, position=self.store.next_position(), name=spec.name, state=QUEUED, error="", exit_code=-1,
            spec=spec_text, spec_path=str(spec_path), job_dir=str(job_dir), output=str(output),
            limit_rows=limit, timeout_s=timeout_s, token=None, submitted_at=time.time(),
            started_at=None, finished_at=None, attempts=0, pid=None,
        )
        self.store.add(record)
        self._event(job_id, "state", QUEUED, f"submitted; job folder {record.job_dir}")
        return record

    @staticmethod
    def _check_output(spec: AnyJob, limit: int | None) -> None:
        """Refuse at once an output file that exists and that tensorfleet did not write, e.g. one naming
        coordinator.sqlite or a user's file (issue 28 #4); the engine checks again when it places it."""
        output = locations(spec, RunOptions(limit=limit))[0]
        if is_url(output) or Path(output).is_dir():  # a sweep's output is a folder of sheets
            return
        refusal = replace_refusal(Path(output))
        if refusal:
            raise JobRequestError("denied", f"job refused: {refusal}")

    def accept(self, raw: object, base: Path) -> AnyJob:
        """The one check a submitted spec passes: a job of any kind, validated, paths resolved against `base`."""
        try:
            return parse(raw, "spec", base)
        except SpecError as error:
            raise JobRequestError("invalid", str(error)) from None
        except ValueError as error:  # e.g. a NUL byte in a path, met while resolving it
            raise JobRequestError("invalid", f"spec: {error}") from None

    def get(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise JobRequestError("not_found", f"no job '{job_id}' (list them with `tensorfleet jobs`)")
        return record

    def cancel(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record.state == QUEUED:
            self._finish(record, CANCELLED, "cancelled before it started", record.exit_code)
        elif record.state == RUNNING:
            attempt = self.attempts.get(job_id)
            if attempt is not None and not attempt.cancel:
                attempt.cancel = True
                self._stop(attempt)
                self._event(job_id, "state", RUNNING, f"{CANCEL_REQUESTED}: dispatch stops, committed chunks are kept")
        return self.get(job_id)

    def resume(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record.state not in (FAILED, CANCELLED):
            raise JobRequestError("precondition", f"job {job_id} is {record.state}; only FAILED or CANCELLED jobs resume")
        self.store.update(job_id, state=QUEUED, error="", exit_code=-1, finished_at=None)
        self._event(job_id, "state", QUEUED, "queued again: continues from its manifest")
        return self.get(job_id)

    def retry(self, job_id: str) -> JobRecord:
        """Queue a finished job again with its failed rows computed again (`tensorfleet run
        --retry-failed`): a SUCCEEDED job with failed rows, or a FAILED or CANCELLED one (which
        also continues where it stopped)."""
        record = self.get(job_id)
        if record.state not in FINAL:
            raise JobRequestError("precondition", f"job {job_id} is {record.state}; retry it once it has finished")
        failed = job_process.manifest_counts(record.job_dir).get("rows_failed", 0)
        if record.state == SUCCEEDED and not failed:
            raise JobRequestError("precondition", f"job {job_id} has no failed rows to retry")
        self.store.update(job_id, state=QUEUED, error="", exit_code=-1, finished_at=None, retry_failed=1)
        self._event(job_id, "state", QUEUED, f"queued again to retry its {failed} failed row(s) (--retry-failed)")
        return self.get(job_id)

    def progress(self, record: JobRecord) -> dict[str, Any]:
        """The engine's report (engine/run_progress.py); a live state left by an engine that is gone
        reads "stopped" (a killed engine cannot say so itself)."""
        if not record.attempts:
            return {}
        report = job_process.progress(record.job_dir)
        if record.state != RUNNING and report.get("state") in LIVE:
            report["state"] = "stopped"
        return report

    # --- lifecycle ---------------------------------------------------------------------
    def recover(self) -> None:
        """After a restart (even from SIGKILL): jobs that were running go back to the queue's head."""
        for record in self.store.list({RUNNING}):
            if job_process.engine_alive(record.pid, record.spec_path):
                assert record.pid is not None
                job_process.stop(record.pid)
                deadline = time.monotonic() + 30
                while job_process.engine_alive(record.pid, record.spec_path) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if job_process.engine_alive(record.pid, record.spec_path):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(record.pid, signal.SIGKILL)
            if self._cancel_was_requested(record.id):  # the service died while the job was being cancelled
                self._finish(record, CANCELLED, "cancelled by request (the coordinator restarted meanwhile); "
                             f"{self._kept(record)}; resume with `tensorfleet resume {record.id}`", record.exit_code)
                continue
            self.store.update(record.id, state=QUEUED, pid=None)
            self._event(record.id, "state", QUEUED, "the coordinator restarted; the job resumes from its manifest")

    def _cancel_was_requested(self, job_id: str) -> bool:
        """Whether the job's latest state event is a cancel request (the attempt's flag is in memory only)."""
        states = [event for event in self.store.events(job_id) if event.kind == "state"]
        return bool(states) and states[-1].message.startswith(CANCEL_REQUESTED)

    @staticmethod
    def _kept(record: JobRecord) -> str:
        counts = job_process.manifest_counts(record.job_dir)
        return (f"committed chunks are kept ({counts.get('chunks_done', 0)}/{counts.get('chunks', 0)} chunks, "
                f"{counts.get('rows_done', 0)}/{counts.get('rows', 0)} rows)")

    async def run(self) -> None:
        """The scheduler loop: reap finished engines, enforce timeouts, report progress, start jobs."""
        while not self._stopping:
            for job_id, attempt in list(self.attempts.items()):
                self._check(job_id, attempt)
            self._start_queued()
            await asyncio.sleep(self.poll_interval)

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop every engine (committed chunks kept) and queue their jobs for the next start."""
        self._stopping = True
        for attempt in self.attempts.values():
            self._stop(attempt)
        deadline = time.monotonic() + grace
        while any(a.process.poll() is None for a in self.attempts.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for job_id, attempt in list(self.attempts.items()):
            if attempt.process.poll() is None:
                attempt.process.kill()
                attempt.process.wait(10)
            if attempt.cancel:
                self._check(job_id, attempt)
                continue
            self.store.update(job_id, state=QUEUED, pid=None)
            self._event(job_id, "state", QUEUED, "the coordinator stopped; the job resumes when it starts again")
        self.attempts.clear()

    # --- internals ---------------------------------------------------------------------
    def _log_path(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id / "engine.log"

    def _start_queued(self) -> None:
        if self._stopping:
            return
        busy = {self.store.get(job_id).job_dir for job_id in self.attempts}  # type: ignore[union-attr]
        for record in self.store.list({QUEUED}):
            if len(self.attempts) >= self.max_jobs:
                return
            if record.job_dir in busy:
                continue
            self._start(record)
            busy.add(record.job_dir)

    def _start(self, record: JobRecord) -> None:
        log_path = self._log_path(record.id)
        offset = log_path.stat().st_size if log_path.exists() else 0
        process = job_process.start(record.spec_path, record.job_dir, record.limit_rows, log_path, self.policy,
                                    retry_failed=bool(record.retry_failed))
        now = time.time()
        self.attempts[record.id] = _Attempt(process, offset, time.monotonic())
        self.store.update(
            record.id, state=RUNNING, pid=process.pid, attempts=record.attempts + 1,
            started_at=record.started_at or now, error="",
        )
        resumed = " (retrying failed rows)" if record.retry_failed else " (resuming its manifest)" if record.attempts else ""
        self._event(record.id, "state", RUNNING, f"attempt {record.attempts + 1} started{resumed}, pid {process.pid}")

    def _stop(self, attempt: _Attempt) -> None:
        if attempt.process.poll() is None:
            attempt.stop_sent = time.monotonic()
            job_process.stop(attempt.process.pid)

    def _check(self, job_id: str, attempt: _Attempt) -> None:
        record = self.store.get(job_id)
        assert record is not None
        returncode = attempt.process.poll()
        if returncode is None:
            now = time.monotonic()
            if record.timeout_s and not attempt.timed_out and now - attempt.started > record.timeout_s:
                attempt.timed_out = True
                self._stop(attempt)
            if attempt.stop_sent and now - attempt.stop_sent > 60:
                attempt.process.kill()  # an engine that ignores SIGTERM for a minute
            self._progress_event(record, attempt)
            return
        del self.attempts[job_id]
        text = self._attempt_log(job_id, attempt)
        kept = self._kept(record)
        resume = f"resume with `tensorfleet resume {job_id}`"
        if returncode == EXIT_OK:
            self._finish(record, SUCCEEDED, "", returncode)
        elif returncode == EXIT_ROWS_FAILED and job_process.rows_failed_message(text):
            self._finish(record, SUCCEEDED, job_process.rows_failed_message(text), returncode)
        elif returncode in (EXIT_ROWS_FAILED, EXIT_CRASH) and not attempt.cancel and not attempt.timed_out:
            # exit 1 without the engine's "rows failed" line is Python's own status for a crash
            self._finish(record, FAILED, job_process.crash_message(text, returncode), EXIT_CRASH)
        elif attempt.cancel:
            self._finish(record, CANCELLED, f"cancelled by request; {kept}; {resume}", returncode)
        elif attempt.timed_out:
            self._finish(record, FAILED, f"timed out after {record.timeout_s:g}s; {kept}; {resume}", returncode)
        elif returncode < 0:  # a signal neither cancel nor timeout sent: kill -9, the OOM killer
            self._finish(record, FAILED, f"{job_process.killed_message(returncode)}; {kept}; {resume}", 2)
        else:
            self._finish(record, FAILED, job_process.extract_error(text, returncode), 2)

    def _attempt_log(self, job_id: str, attempt: _Attempt) -> str:
        try:
            with open(self._log_path(job_id), "rb") as handle:
                handle.seek(attempt.log_offset)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def _finish(self, record: JobRecord, state: str, error: str, exit_code: int) -> None:
        self.store.update(record.id, state=state, error=error, exit_code=exit_code, finished_at=time.time(), pid=None,
                          retry_failed=0)
        message = {SUCCEEDED: "finished", FAILED: "failed", CANCELLED: "cancelled"}[state]
        if state == SUCCEEDED:
            message += f" with exit code {exit_code}: output {record.output}"
        self._event(record.id, "state", state, message + (f": {error}" if error and state != SUCCEEDED else
                                                        f" ({error})" if error else ""))
        for forgotten in self.store.prune(self.keep_finished):
            shutil.rmtree(self._log_path(forgotten).parent, ignore_errors=True)

    def _progress_event(self, record: JobRecord, attempt: _Attempt) -> None:
        now = time.monotonic()
        if now - attempt.last_event < self.progress_interval:
            return
        report = job_process.progress(record.job_dir)
        servers = report.get("servers") or []
        alive = sum(1 for s in servers if s.get("alive"))
        key = (report.get("chunks_done"), report.get("rows_failed"), alive, len(servers), report.get("state"))
        if key == attempt.last_key or report.get("chunks") is None:
            return
        attempt.last_key, attempt.last_event = key, now
        errors = [f"{s['address']}: {s['last_error']}" for s in servers if s.get("last_error")]
        message = (
            f"{report.get('chunks_done', 0)}/{report.get('chunks', 0)} chunks, "
            f"{report.get('rows_done', 0)}/{report.get('rows', 0)} rows, {report.get('rows_per_second', 0)} rows/s, "
            f"{alive}/{len(servers)} servers up, {report.get('rows_failed', 0)} rows failed"
            + (f"; server errors: {'; '.join(errors)}" if errors else "")
        )
        self._event(record.id, "progress", RUNNING, message)

    def _event(self, job_id: str, kind: str, state: str, message: str) -> None:
        self.store.add_event(job_id, kind, state, message)
        log.info("job %s: %s %s: %s", job_id, kind, state, message)
        asyncio.get_event_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def is_final(self, job_id: str) -> bool:
        record = self.store.get(job_id)
        return record is None or record.state in FINAL
