"""A job as the Coordinator API shows it (tf.Job): for the service's rpcs and its dashboard alike."""

from __future__ import annotations

from tensorfleet.protos import tensorfleet_pb2 as tf

from .jobstore import RUNNING, JobRecord


def job_message(record: JobRecord, progress: dict) -> tf.Job:
    """A job as the API shows it: the store's record with the engine's latest progress."""
    job = tf.Job(
        job_id=record.id, name=record.name, state=tf.JobState.Value(record.state), error=record.error,
        exit_code=record.exit_code, output=record.output, job_dir=record.job_dir,
        submitted_at=record.submitted_at, started_at=record.started_at or 0.0,
        finished_at=record.finished_at or 0.0, timeout_s=record.timeout_s, spec=record.spec,
        attempts=record.attempts, engine_state=str(progress.get("state", "")),
    )
    for name in ("rows", "rows_done", "rows_failed", "chunks", "chunks_done"):
        setattr(job, name, int(progress.get(name) or 0))
    if record.state == RUNNING:
        job.rows_per_second = float(progress.get("rows_per_second") or 0.0)
        job.eta_seconds = float(progress.get("eta_seconds") or 0.0)
    for server in progress.get("servers") or []:
        job.servers.add(
            address=server.get("address", ""), alive=bool(server.get("alive")), rows=int(server.get("rows") or 0),
            last_error=server.get("last_error") or "",
        )
    for part in progress.get("parts") or []:
        job.parts.add(
            label=str(part.get("label", "")), model=str(part.get("model", "")), state=str(part.get("state", "")),
            rows_per_second=float(part.get("rows_per_second") or 0.0) if record.state == RUNNING else 0.0,
            estimated=bool(part.get("estimated")),
            **{name: int(part.get(name) or 0) for name in ("rows", "rows_done", "rows_failed", "chunks", "chunks_done")},
        )
    return job
