"""The SQLite checkpoint in the job folder: the plan, which chunks are done, and failing rows.

A chunk counts as done only once its part file is durable and its row here is committed,
in one transaction with its errors. A resume reads this and skips done chunks at once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..io.filesystems import journal_mode_for
from ..io.joblock import JobLock
from ..io.part_store import damaged_parts
from ..io.row_error import RowError
from .planner import Chunk, InputFingerprint, Plan

MANIFEST_NAME = "manifest.sqlite"
#: Lease notes wait in memory at most this long before they are written on their own; a
#: chunk's commit writes the waiting ones in its transaction (one manifest write per chunk).
LEASE_FLUSH_S = 5.0
SCHEMA_VERSION = 2  # 2: chunks.row_order (length-sorted requests)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inputs (path TEXT PRIMARY KEY, size INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    idx INTEGER PRIMARY KEY, start INTEGER NOT NULL, stop INTEGER NOT NULL, bounds TEXT NOT NULL,
    row_order BLOB NOT NULL DEFAULT x'',  -- uint32 LE offsets, see Chunk.order
    done INTEGER NOT NULL DEFAULT 0, part TEXT, failed INTEGER NOT NULL DEFAULT 0,
    server TEXT, committed_at REAL, checksum TEXT  -- the part file's checksum (parts.file_checksum)
);
CREATE TABLE IF NOT EXISTS errors (
    row INTEGER PRIMARY KEY, chunk INTEGER NOT NULL, id TEXT NOT NULL, code TEXT NOT NULL, message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS servers (address TEXT PRIMARY KEY, first_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS leases (chunk INTEGER NOT NULL, server TEXT NOT NULL, at REAL NOT NULL);
"""


class Manifest:
    """One job folder's manifest. Used from one thread at a time.

    `lock=True` (the coordinator that writes the job): hold the folder's JobLock until close,
    so a second coordinator, from this host or another, is refused (JobLocked). The journal
    mode suits the filesystem: WAL on a local one, the rollback journal on NFS/Lustre/GPFS."""

    def __init__(self, path: Path, lock: bool = False) -> None:
        self.path = path
        self._lock = JobLock(path.parent) if lock else None
        #: Lease notes not written yet: (chunk, server, at), see note_lease.
        self._leases: list[tuple[int, str, float]] = []
        self._leases_flushed = time.monotonic()
        #: Servers this process recorded (note_server): the manifest is autocommit, so each
        #: INSERT, ignored or not, was a synchronous write transaction of its own.
        self._servers_noted: set[str] = set()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            self.journal_mode = journal_mode_for(path.parent)
            self._db.execute(f"PRAGMA journal_mode={self.journal_mode}")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(chunks)")}
            if "checksum" not in columns:  # a manifest from before part checksums
                self._db.execute("ALTER TABLE chunks ADD COLUMN checksum TEXT")
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    @classmethod
    def open_existing(cls, job_dir: Path, lock: bool = False) -> Manifest | None:
        path = job_dir / MANIFEST_NAME
        return cls(path, lock=lock) if path.is_file() else None

    def close(self) -> None:
        try:
            self.flush_leases()
        except sqlite3.Error:
            pass  # statistics only: never what keeps a finished job from closing
        self._db.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- meta -------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    def meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # --- the plan -----------------------------------------------------------------
    def record_plan(self, plan: Plan) -> None:
        """Store a fresh plan (one transaction), replacing nothing: the manifest must be new."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('plan', ?)", (json.dumps(plan.record(), sort_keys=True),)
            )
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._db.executemany(
                "INSERT INTO inputs VALUES (?, ?, ?)", [(i.path, i.size, i.sha256) for i in plan.inputs]
            )
            self._db.executemany(
                "INSERT INTO chunks (idx, start, stop, bounds, row_order) VALUES (?, ?, ?, ?, ?)",
                [(c.index, c.start, c.stop, json.dumps(list(c.bounds)), c.order)
                 for c in plan.chunks],
            )

    def has_plan(self) -> bool:
        return self.meta("plan") is not None

    def plan_settings(self) -> dict:
        return self.meta("plan", {})

    def inputs(self) -> list[InputFingerprint]:
        return [InputFingerprint(*row) for row in self._db.execute("SELECT path, size, sha256 FROM inputs")]

    def chunks(self) -> list[Chunk]:
        rows = self._db.execute("SELECT idx, start, stop, bounds, row_order FROM chunks ORDER BY idx")
        return [Chunk(i, s, e, tuple(json.loads(b)), bytes(o)) for i, s, e, b, o in rows]

    # --- progress -------------------------------------------------------------------
    def done_chunks(self) -> set[int]:
        return {row[0] for row in self._db.execute("SELECT idx FROM chunks WHERE done = 1")}

    def part_of(self, chunk: int) -> str | None:
        row = self._db.execute("SELECT part FROM chunks WHERE idx = ? AND done = 1", (chunk,)).fetchone()
        return row[0] if row else None

    def counts(self) -> dict[str, int]:
        total, done, rows_total, rows_done, failed = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(done), 0), COALESCE(SUM(stop - start), 0),"
            " COALESCE(SUM(CASE WHEN done THEN stop - start ELSE 0 END), 0), COALESCE(SUM(failed), 0) FROM chunks"
        ).fetchone()
        return {"chunks": total, "chunks_done": done, "rows": rows_total, "rows_done": rows_done, "rows_failed": failed}

    def commit_chunk(
        self, chunk: int, part: str, errors: Iterable[RowError], server: str, checksum: str | None = None
    ) -> bool:
        """Mark a chunk done with its errors (and its part's checksum) in one transaction.
        False if it already was."""
        errors = list(errors)
        with self._transaction():
            self._write_leases()
            cursor = self._db.execute(
                "UPDATE chunks SET done = 1, part = ?, failed = ?, server = ?, committed_at = ?, checksum = ?"
                " WHERE idx = ? AND done = 0",
                (part, len(errors), server, time.time(), checksum, chunk),
            )
            if cursor.rowcount != 1:
                return False
            self._db.executemany(
                "INSERT OR REPLACE INTO errors VALUES (?, ?, ?, ?, ?)",
                [(e.row, chunk, e.id, e.code, e.message) for e in errors],
            )
        return True

    def recorded_parts(self) -> dict[int, tuple[str, str | None]]:
        """Every committed chunk's part: chunk -> (name, checksum or None)."""
        rows = self._db.execute("SELECT idx, part, checksum FROM chunks WHERE done = 1 AND part IS NOT NULL")
        return {index: (part, checksum) for index, part, checksum in rows}

    def chunks_with_failures(self) -> list[tuple[int, int]]:
        """(chunk, failed rows) of every committed chunk with failed rows."""
        rows = self._db.execute("SELECT idx, failed FROM chunks WHERE done = 1 AND failed > 0 ORDER BY idx")
        return [(int(index), int(failed)) for index, failed in rows]

    def reset_chunks(self, chunks: Iterable[int]) -> None:
        """Mark committed chunks not done (their part is damaged): the next run computes them again."""
        chunks = list(chunks)
        with self._transaction():
            self._db.executemany(
                "UPDATE chunks SET done = 0, part = NULL, failed = 0, server = NULL, committed_at = NULL,"
                " checksum = NULL WHERE idx = ?", [(i,) for i in chunks],
            )
            self._db.executemany("DELETE FROM errors WHERE chunk = ?", [(i,) for i in chunks])

    def errors(self, start: int = 0, stop: int | None = None) -> list[RowError]:
        stop = 2**62 if stop is None else stop
        rows = self._db.execute(
            "SELECT row, id, code, message FROM errors WHERE row >= ? AND row < ? ORDER BY row", (start, stop)
        )
        return [RowError(*row) for row in rows]

    def commits(self) -> list[tuple[float, int, int]]:
        """(committed_at, rows, failed rows) of every done chunk, oldest first: progress over time."""
        rows = self._db.execute(
            "SELECT committed_at, stop - start, failed FROM chunks WHERE done = 1 AND committed_at IS NOT NULL"
            " ORDER BY committed_at"
        )
        return [(float(at), int(count), int(failed)) for at, count, failed in rows]

    def first_errors(self, limit: int) -> list[RowError]:
        rows = self._db.execute("SELECT row, id, code, message FROM errors ORDER BY row LIMIT ?", (limit,))
        return [RowError(*row) for row in rows]

    def note_server(self, address: str) -> None:
        """Record a server's first commit; one write per server and process, not one per chunk."""
        if address in self._servers_noted:
            return
        self._db.execute("INSERT OR IGNORE INTO servers VALUES (?, ?)", (address, time.time()))
        self._servers_noted.add(address)

    def servers(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT address FROM servers ORDER BY address")]

    def note_lease(self, chunk: int, server: str, at: float | None = None) -> None:
        """`at`: when the chunk was leased (the caller may write this later, off its loop).

        Kept in memory and written with the next chunk commit, or on its own after
        LEASE_FLUSH_S, or at close: a synchronous SQLite write per lease cost more than the
        rows it leased. Leases are statistics (lease_counts); which chunks are done, and so
        exactly-once, rests on commit_chunk alone, so notes lost in a crash lose no rows."""
        self._leases.append((chunk, server, time.time() if at is None else at))
        if time.monotonic() - self._leases_flushed > LEASE_FLUSH_S:
            self.flush_leases()

    def flush_leases(self) -> None:
        """Write the lease notes still in memory."""
        if self._leases:
            with self._transaction():
                self._write_leases()
        self._leases_flushed = time.monotonic()

    def _write_leases(self) -> None:
        if self._leases:
            self._db.executemany("INSERT INTO leases VALUES (?, ?, ?)", self._leases)
            self._leases = []
        self._leases_flushed = time.monotonic()

    def lease_counts(self) -> dict[int, int]:
        """How often each chunk was handed to a server, over every run of this job."""
        self.flush_leases()
        return dict(self._db.execute("SELECT chunk, COUNT(*) FROM leases GROUP BY chunk").fetchall())

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if kind else "COMMIT")


def drop_damaged_parts(job_dir: Path, manifest: Manifest) -> dict[int, str]:
    """Mark the chunks whose part is damaged (`damaged_parts`) not done, saying so on stderr:
    the run computes them again, and no damaged part is ever merged or read by a next stage."""
    import sys

    damaged = damaged_parts(job_dir, manifest.recorded_parts())
    for index, why in damaged.items():
        print(f"tensorfleet: chunk {index}: {why}; computing it again", file=sys.stderr)
    manifest.reset_chunks(damaged)
    return damaged
