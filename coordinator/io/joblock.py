"""One coordinator per job folder, also across hosts sharing the folder (NFS, Lustre, GPFS).

The writer of a job folder holds `coordinator.lock` there: a JSON record of its host, pid and
start, refreshed every HEARTBEAT_S seconds (the file's mtime). Another coordinator is refused
while the holder is alive: on the same host that is the kernel's own lock on the file (gone
the moment the holder dies, even by kill -9); from another host, a heartbeat younger than
STALE_S. A lock left by a dead holder is taken over, and the takeover says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK_NAME = "coordinator.lock"
HEARTBEAT_S = 10.0
STALE_S = 120.0  # generous: the hosts' clocks and the filesystem's attribute cache may differ


class JobLocked(Exception):
    """Another coordinator holds this job folder; the message names it and says what to do."""


class JobLock:
    """Held by the coordinator that writes a job folder, from open to `release()`."""

    def __init__(self, job_dir: Path) -> None:
        self.path = job_dir / LOCK_NAME
        self.host = socket.gethostname()
        self.previous: dict | None = None  # the stale holder this lock took over, if any
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._acquire()
        except BaseException:
            os.close(self._fd)
            raise
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="job-lock-heartbeat", daemon=True)
        self._beat.start()

    def _acquire(self) -> None:
        holder = _read(self.path)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobLocked(_refusal(self.path, holder, "holds its lock")) from None
        if holder and holder.get("host") != self.host:
            age = time.time() - self.path.stat().st_mtime
            if age < STALE_S:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                raise JobLocked(_refusal(self.path, holder, f"was alive {age:.0f}s ago"))
        self.previous = holder or None
        record = {"host": self.host, "pid": os.getpid(), "since": time.time()}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(record).encode(), 0)
        os.fsync(self._fd)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Give the folder up: the record is cleared, so nobody waits for a stale heartbeat."""
        if self._fd < 0:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # drops the kernel lock
        self._fd = -1


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _refusal(path: Path, holder: dict, why: str) -> str:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}" if holder else "another process"
    return (
        f"another coordinator ({who}) {why} on this job folder ({path}); only one may write a job at a time. "
        f"Wait for it to finish, or stop it and run with --resume. If it is gone (its host died), its lock "
        f"counts as stale {STALE_S:.0f}s after its last heartbeat, or delete {path} by hand"
    )
