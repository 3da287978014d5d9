"""The coordinator service's own SQLite state: jobs and their events, under --state-dir.

Each job's progress lives in its job folder's manifest (the engine's); this store holds what
the service adds: who asked for what, the state machine, and the event log WatchJob replays.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '', exit_code INTEGER NOT NULL DEFAULT -1,
    spec TEXT NOT NULL, spec_path TEXT NOT NULL, job_dir TEXT NOT NULL, output TEXT NOT NULL,
    limit_rows INTEGER, timeout_s REAL NOT NULL DEFAULT 0, token TEXT,
    submitted_at REAL NOT NULL, started_at REAL, finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0, pid INTEGER, retry_failed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, time REAL NOT NULL,
    kind TEXT NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
"""


@dataclass
class JobRecord:
    id: str
    position: int
    name: str
    state: str
    error: str
    exit_code: int
    spec: str
    spec_path: str
    job_dir: str
    output: str
    limit_rows: int | None
    timeout_s: float
    token: str | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    pid: int | None
    #: The next attempts run with --retry-failed (RetryJob), until the job finishes.
    retry_failed: int = 0


@dataclass
class EventRecord:
    seq: int
    job_id: str
    time: float
    kind: str
    state: str
    message: str


_COLUMNS = ", ".join(JobRecord.__dataclass_fields__)


class JobStore:
    """Used from the service's event loop thread only; every write is its own transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A state folder written by an older service gets the columns added since (their defaults)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "retry_failed" not in have:
            self._db.execute("ALTER TABLE jobs ADD COLUMN retry_failed INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self._db.close()

    @staticmethod
    def new_id(name: str) -> str:
        return f"{name[:40]}-{uuid.uuid4().hex[:8]}"

    def add(self, record: JobRecord) -> None:
        self._db.execute(
            f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * len(JobRecord.__dataclass_fields__))})",
            tuple(getattr(record, name) for name in JobRecord.__dataclass_fields__),
        )

    def next_position(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs").fetchone()[0]

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord(*row) if row else None

    def list(self, states: set[str] | None = None) -> list[JobRecord]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY position").fetchall()
        records = [JobRecord(*row) for row in rows]
        return [r for r in records if not states or r.state in states]

    def update(self, job_id: str, **fields: object) -> None:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def prune(self, keep: int) -> list[str]:
        """Forget finished jobs beyond the `keep` most recently finished (their records and
        events; their job folders stay): the state folder stays bounded. Returns their ids."""
        final = ", ".join(f"'{state}'" for state in sorted(FINAL))
        old = [row[0] for row in self._db.execute(
            f"SELECT id FROM jobs WHERE state IN ({final}) ORDER BY finished_at DESC, position DESC LIMIT -1 OFFSET ?",
            (max(keep, 0),),
        )]
        if old:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM events WHERE job_id = ?", [(i,) for i in old])
                self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in old])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return old

    def add_event(self, job_id: str, kind: str, state: str, message: str) -> EventRecord:
        now = time.time()
        cursor = self._db.execute(
            "INSERT INTO events (job_id, time, kind, state, message) VALUES (?, ?, ?, ?, ?)",
            (job_id, now, kind, state, message),
        )
        return EventRecord(int(cursor.lastrowid), job_id, now, kind, state, message)

    def events(self, job_id: str, after_seq: int = 0) -> list[EventRecord]:
        rows = self._db.execute(
            "SELECT seq, job_id, time, kind, state, message FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
            (job_id, after_seq),
        ).fetchall()
        return [EventRecord(*row) for row in rows]
