"""Progress for people: a bar on a terminal or plain lines in a log (progress_view.py), and
status.json for other terminals and tools."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .progress_view import ProgressLine, ProgressView, format_duration, open_view

__all__ = ["STATUS_NAME", "Progress", "format_duration", "pid_alive", "read_status", "write_json_atomic"]

STATUS_NAME = "status.json"


def peak_rss_bytes(status_file: str = "/proc/self/status") -> int:
    """This process's own peak resident memory: VmHWM, which exec resets.

    Not getrusage's ru_maxrss where /proc has VmHWM: Linux keeps in it the largest RSS of the
    memory the process had before its exec, which at a fork is its parent's, so a coordinator
    started by a 2 GB process (the coordinator service, a notebook, a bench) reported 2 GB.
    ru_maxrss stands in where there is no /proc (macOS, where it is in bytes; Linux: KiB)."""
    try:
        with open(status_file, "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(temp, path)


class Progress:
    """Counts committed rows; shows them (progress_view.py) and writes status.json every `interval` seconds."""

    def __init__(
        self,
        job_dir: Path,
        *,
        total_rows: int,
        done_rows: int,
        failed_rows: int,
        servers: Callable[[], list[dict[str, Any]]],
        output: str,
        stream: TextIO | None = None,
        interval: float = 2.0,
        computed: Callable[[], int] | None = None,
    ) -> None:
        self.status_path = job_dir / STATUS_NAME
        self.total = total_rows
        self.done = done_rows
        self.failed = failed_rows
        self.servers = servers
        self.output = output
        self.stream = stream if stream is not None else sys.stderr
        self._view: ProgressView | None = None  # opened at the first tick: nothing to close before
        self.interval = interval
        self.started = time.time()
        self.resumed_from = done_rows
        #: Rows answered by servers (committed or not): a smoother rate than whole chunks.
        self.computed = computed or (lambda: self.done - self.resumed_from)
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), self.computed())], maxlen=50)
        self._last_write = 0.0
        self._last_draw = 0.0

    def add(self, rows: int, failed: int) -> None:
        self.done += rows
        self.failed += failed

    def rate(self) -> float | None:
        """Rows per second over the last ~10 s (this run only); None until this run has
        committed a row, since a rate from answered but uncommitted rows alone (or from none)
        says nothing a person can plan by. Once rows are done, the run's average stands in
        when the window saw no new answers (the end of a run)."""
        committed = self.done - self.resumed_from
        if committed <= 0:
            return None
        (t0, r0), (t1, r1) = self._samples[0], self._samples[-1]
        windowed = (r1 - r0) / (t1 - t0) if t1 > t0 else 0.0
        if windowed > 0:
            return windowed
        elapsed = time.time() - self.started
        return committed / elapsed if elapsed > 0 else None

    def line(self, state: str) -> ProgressLine:
        rate = self.rate()
        servers = self.servers()
        return ProgressLine(
            state=state,
            done=self.done,
            total=self.total,
            failed=self.failed,
            rows_per_second=rate,
            eta_seconds=(self.total - self.done) / rate if rate else None,
            servers_alive=sum(1 for s in servers if s.get("alive")),
            servers=len(servers),
        )

    def snapshot(self, state: str) -> dict[str, Any]:
        rate = self.rate()
        servers = self.servers()
        return {
            "state": state,
            "pid": os.getpid(),
            "output": self.output,
            "rows": self.total,
            "rows_done": self.done,
            "rows_failed": self.failed,
            "rows_per_second": round(rate or 0.0, 2),
            "eta_seconds": round((self.total - self.done) / rate, 1) if rate else None,
            "servers": servers,
            "servers_alive": sum(1 for s in servers if s.get("alive")),
            "started": self.started,
            "updated": time.time(),
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def tick(self, state: str = "running", force: bool = False) -> None:
        now = time.monotonic()
        if now - self._samples[-1][0] >= 0.2:
            self._samples.append((now, self.computed()))
        if force or now - self._last_write >= self.interval:
            self._last_write = now
            write_json_atomic(self.status_path, self.snapshot(state))
        if force or now - self._last_draw >= 0.2:
            self._last_draw = now
            if self._view is None:
                self._view = open_view(self.stream)
            self._view.show(self.line(state))

    def close(self, state: str) -> None:
        self.tick(state, force=True)
        if self._view is not None:
            self._view.close(self.line(state))
            self._view = None


def read_status(job_dir: Path) -> dict[str, Any] | None:
    path = job_dir / STATUS_NAME
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
