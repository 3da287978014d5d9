"""What a person sees of a running job: a bar on a terminal whose width changes, plain lines elsewhere.

The terminal test runs a real job under a pseudo-terminal, resizes it while the job runs (the way
a window manager does: TIOCSWINSZ, then SIGWINCH) and reads the final screen through `pyte`, a
terminal emulator: stale characters left by a redraw would stay on that screen. The job logs
(--verbose) while the bar is up, and those lines must stay whole, above the bar.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

import pyte
import pytest

from tensorfleet.coordinator.engine.progress import Progress
from tensorfleet.coordinator.engine.progress_view import PlainView, ProgressLine, plain_line
from tests.serving import running_server

from .helpers import MODELS, REPO_ROOT, make_fasta, run_tensorfleet, tensorfleet_command, write_job

ROWS = 1200
#: The widths the terminal goes through while the job runs; the last one is the final screen's.
WIDTHS = (120, 44, 150, 60, 100, 38, 110)


@pytest.fixture(scope="module")
def slow_servers():
    """Two servers whose test embedder sleeps per batch, so a job lasts long enough to resize under."""
    env = {"TF_TEST_DELAY_MS": "40"}
    with running_server(MODELS, env=env) as first, running_server(MODELS, env=env) as second:
        yield [first, second]


def _job(tmp_path, servers) -> os.PathLike:
    make_fasta(tmp_path / "in.fasta", ROWS)
    return write_job(
        tmp_path / "job.yaml", input={"path": "in.fasta"},
        model={"name": "embed", "servers": [s.address for s in servers]},
        output={"path": "out.h5"}, chunking={"chunk_rows": 40, "batch_rows": 4},
    )  # fmt: skip


def _set_size(fd: int, rows: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def _drain(fd: int, stream: pyte.ByteStream, quiet: float = 0.1) -> bool:
    """Feed the emulator everything written so far; False once the other side is closed."""
    while select.select([fd], [], [], quiet)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            return False
        if not data:
            return False
        stream.feed(data)
    return True


def test_the_bar_leaves_no_stale_characters_when_the_terminal_width_changes(tmp_path, slow_servers):
    job = _job(tmp_path, slow_servers)
    screen = pyte.Screen(WIDTHS[0], 30)
    stream = pyte.ByteStream(screen)
    master, slave = pty.openpty()
    _set_size(slave, 30, WIDTHS[0])
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env.update(TERM="xterm-256color", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        tensorfleet_command("run", job, "--verbose"), stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO_ROOT,
        start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    resized = 0
    try:
        for width in WIDTHS[1:]:
            deadline = time.monotonic() + 0.7
            while time.monotonic() < deadline and _drain(master, stream, 0.05):
                pass
            if process.poll() is not None:
                break
            # Hold the job still while the size changes, so no redraw is half-way through the pty:
            # what it wrote at the old width is shown at the old width, as on a real terminal.
            os.kill(process.pid, signal.SIGSTOP)
            _drain(master, stream)
            _set_size(master, 30, width)
            screen.resize(30, width)
            os.kill(process.pid, signal.SIGCONT)
            os.kill(process.pid, signal.SIGWINCH)
            resized += 1
        while _drain(master, stream):
            pass
        assert process.wait(timeout=240) == 0, "\n".join(screen.display)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
            process.wait()
        os.close(master)
    assert resized >= 3, f"the job ended after {resized} resizes: make it longer"

    rows = [row.rstrip() for row in screen.display if row.strip()]
    shown = "\n".join(rows)
    bar_rows = [row for row in rows if "━" in row or "ETA" in row or re.search(r"servers \d", row)]
    assert len(bar_rows) == 1, f"the bar is drawn more than once:\n{shown}"
    final = bar_rows[0]
    assert re.fullmatch(
        rf"done +{ROWS}/{ROWS} rows +━+ +100% +\d+\.\d rows/s +ETA \S+ +servers [0-2]/2 +failed 0", final
    ), f"the final bar is not one clean line:\n{shown}"
    # --verbose logs each server as it starts serving, while the bar is up: lines of their own above
    # it (cut where the window was narrowed after them, as a terminal that does not reflow does)
    logged = [row for row in rows if re.match(r"\d{4}-\d\d-\d\d [\d:,]+ INFO ", row)]
    assert len(logged) == 2 and rows.index(final) > rows.index(logged[-1]), f"log lines mixed into the bar:\n{shown}"


def test_without_a_terminal_progress_is_plain_lines(tmp_path, slow_servers):
    job = _job(tmp_path, slow_servers)
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress: ")]
    pattern = re.compile(
        r"progress: (running|merging|done) (\d+)/(\d+) rows \(\d+\.\d%\) (?:\d+\.\d rows/s "
        r"ETA (\d+:\d\d|--:--) )?servers (\d+)/2 failed (\d+)"
    )
    assert lines and all(pattern.fullmatch(line) for line in lines), result.stderr
    last = pattern.fullmatch(lines[-1])
    assert last.group(1) == "done" and last.group(2) == last.group(3) == str(ROWS)
    assert last.group(6) == "0"


def _line(done: int) -> ProgressLine:
    return ProgressLine("running", done, 100, 1, 12.5, 3.0, 2, 3)


def test_plain_lines_come_at_most_every_few_seconds_and_once_at_the_end():
    rare, often = io.StringIO(), io.StringIO()
    quiet, chatty = PlainView(rare, every=3600), PlainView(often, every=0)
    for done in (10, 20):
        quiet.show(_line(done))
        chatty.show(_line(done))
    quiet.close(_line(100))
    assert rare.getvalue() == "progress: running 100/100 rows (100.0%) 12.5 rows/s ETA 0:03 servers 2/3 failed 1\n"
    assert often.getvalue().splitlines() == [
        "progress: running 10/100 rows (10.0%) 12.5 rows/s ETA 0:03 servers 2/3 failed 1",
        "progress: running 20/100 rows (20.0%) 12.5 rows/s ETA 0:03 servers 2/3 failed 1",
    ]


def test_the_closing_line_is_written_once_when_the_last_tick_just_wrote_it():
    out = io.StringIO()
    view = PlainView(out, every=0)
    view.show(_line(100))  # Progress.close ticks (a forced show) and then closes with the same line
    view.close(_line(100))
    assert out.getvalue().splitlines() == [
        "progress: running 100/100 rows (100.0%) 12.5 rows/s ETA 0:03 servers 2/3 failed 1",
    ]


def test_a_rate_is_shown_only_once_this_run_has_done_rows(tmp_path):
    """Issue 29: the first lines once said `running 0/2000 rows (0.0%) 29.4 rows/s`: rows answered
    but not yet committed, or none at all, made a rate. A resumed run's earlier rows make none either."""
    answered = [0]
    progress = Progress(tmp_path, total_rows=2000, done_rows=400, failed_rows=0, servers=lambda: [],
                        output="out.h5", stream=io.StringIO(), computed=lambda: answered[0])
    for count in (0, 64, 128):  # answers arrive, no chunk committed yet
        answered[0] = count
        progress._samples.append((time.monotonic() + count, count))
        line = progress.line("running")
        assert line.rows_per_second is None and line.eta_seconds is None
        assert plain_line(line) == "progress: running 400/2000 rows (20.0%) servers 0/0 failed 0"
    progress.add(64, 0)
    line = progress.line("running")
    assert line.rows_per_second is not None and line.rows_per_second > 0 and line.eta_seconds is not None
    assert " rows/s ETA " in plain_line(line), plain_line(line)
    assert progress.snapshot("running")["rows_per_second"] > 0
