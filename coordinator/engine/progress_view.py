"""How a job's progress is shown: a `rich` bar on a terminal, a plain line every few seconds elsewhere.

Terminal width, resizes and notebooks are rich's business, so the bar never leaves stale
characters behind. rich is imported only when a terminal is attached, so log files, services and
`tensorfleet.client` never load it.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol, TextIO


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass(frozen=True)
class ProgressLine:
    """One moment of a job, as a person reads it."""

    state: str
    done: int
    total: int
    failed: int
    #: None until rows are done: no rate (and no ETA) is shown before there is one to show.
    rows_per_second: float | None
    eta_seconds: float | None
    servers_alive: int
    servers: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def plain_line(line: ProgressLine) -> str:
    """The line written where no terminal is attached (log files, CI, pipes): one per report."""
    return (
        f"progress: {line.state} {line.done}/{line.total} rows ({line.fraction:.1%}) {rate_text(line)}"
        f"servers {line.servers_alive}/{line.servers} failed {line.failed}"
    )


def rate_text(line: ProgressLine) -> str:
    """`12.3 rows/s ETA 0:42 ` once rows are done; nothing before."""
    if line.rows_per_second is None:
        return ""
    return f"{line.rows_per_second:.1f} rows/s ETA {format_duration(line.eta_seconds)} "


class ProgressView(Protocol):
    def show(self, line: ProgressLine) -> None: ...

    def close(self, line: ProgressLine) -> None: ...


class PlainView:
    """A plain line every `every` seconds, and one at the end."""

    def __init__(self, stream: TextIO, every: float = 5.0) -> None:
        self._stream = stream
        self._every = every
        self._last = time.monotonic()  # the first line after `every` seconds: short jobs print one
        self._written = ""

    def show(self, line: ProgressLine) -> None:
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            self._write(line)

    def close(self, line: ProgressLine) -> None:
        if plain_line(line) != self._written:  # the closing tick may just have written it
            self._write(line)

    def _write(self, line: ProgressLine) -> None:
        self._written = plain_line(line)
        self._stream.write(self._written + "\n")
        self._stream.flush()


class RichView:
    """rich's live progress bar; it re-reads the terminal width on each redraw (4 a second)."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
        from rich.table import Column

        fixed = Column(no_wrap=True)
        self._progress = Progress(
            TextColumn("{task.fields[state]}", table_column=fixed),
            TextColumn("{task.completed}/{task.total} rows", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=None, table_column=Column(ratio=1)),
            TaskProgressColumn(),
            TextColumn(
                "{task.fields[rate]}servers {task.fields[alive]}/{task.fields[servers]}  failed {task.fields[failed]}",
                table_column=Column(no_wrap=True, overflow="ellipsis"),
            ),
            console=Console(file=stream),
            expand=True,
            refresh_per_second=4,
        )
        self._task: Any = None
        self._rerouted: list[tuple[logging.StreamHandler, TextIO]] = []

    def show(self, line: ProgressLine) -> None:
        fields = {
            "state": line.state,
            "rate": "" if line.rows_per_second is None
            else f"{line.rows_per_second:.1f} rows/s  ETA {format_duration(line.eta_seconds)}  ",
            "alive": line.servers_alive,
            "servers": line.servers,
            "failed": line.failed,
        }
        if self._task is None:
            self._progress.start()
            self._reroute_logging()
            self._task = self._progress.add_task("rows", total=line.total, completed=line.done, **fields)
        else:
            self._progress.update(self._task, total=line.total, completed=line.done, **fields)

    def close(self, line: ProgressLine) -> None:
        self.show(line)
        self._progress.stop()  # draws the last state once more and leaves it on screen
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        self._rerouted = []

    def _reroute_logging(self) -> None:
        """Log lines go above the bar, not into it.

        rich swaps sys.stderr for a proxy that prints above the bar, but a logging handler made
        earlier (`logging.basicConfig`) still holds the real stream: point it at the proxy
        while the bar is up."""
        proxied = getattr(sys.stderr, "rich_proxied_file", None)
        if proxied is None:
            return
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is proxied:
                self._rerouted.append((handler, handler.setStream(sys.stderr)))


def open_view(stream: TextIO) -> ProgressView:
    """A bar for a terminal, plain lines for anything else."""
    isatty = getattr(stream, "isatty", None)
    return RichView(stream) if isatty is not None and isatty() else PlainView(stream)
