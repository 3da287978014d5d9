"""What `tensorfleet run` prints and returns, shared by the CLI and the service's job process."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from tensorfleet.core.exit_codes import EXIT_CRASH, EXIT_FATAL

from . import api

#: The line a crash ends with; the service reports what follows it (job_process.crash_message).
CRASH_MARK = "tensorfleet: crashed: "


def run_and_report(
    job: Path | str, options: api.RunOptions, on_finished: Callable[[api.AnyJob, api.RunResult], None] | None = None
) -> int:
    """Run a job file of any kind through the engine and print its summary; the exit code (0, 1, 2 or 3).
    `on_finished(spec, result)` is called after a run that exited 0 (the CLI's finished stamp).

    An unhandled exception would leave Python's own exit status 1, the code of failed rows; it is
    caught here and ends with EXIT_CRASH and its traceback's last line instead (issue 28 #9)."""
    try:
        spec = api.load(job)
        result = api.run(spec, options)
    except api.JobFatal as error:
        print(f"tensorfleet: error: {error}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print("tensorfleet: interrupted; committed chunks are kept: run the same command again to continue",
              file=sys.stderr)
        return EXIT_FATAL
    except Exception as error:  # noqa: BLE001 - reported as a crash, with its traceback
        traceback.print_exc()
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        print(f"{CRASH_MARK}{last} (committed chunks are kept; this is a bug or an input nothing checked: "
              "please report it)", file=sys.stderr)
        return EXIT_CRASH
    print(result.summary())
    if result.rows_failed:
        print(f"tensorfleet: {result.rows_failed} of {result.rows} rows failed (once their cause is fixed, "
              f"`tensorfleet run {job} --retry-failed` computes their chunks again)", file=sys.stderr)
    elif result.exit_code == 1:  # rows that failed before a fan-out: no rows of the output, yet failed
        print(f"tensorfleet: {getattr(result, 'rows_lost', 0)} rows failed before a fan-out and have no rows in the "
              f"output (`tensorfleet run {job} --retry-failed` computes their chunks again)", file=sys.stderr)
    elif on_finished is not None and not options.dry_run and options.shard is None and result.exit_code == 0:
        on_finished(spec, result)
    return result.exit_code


def merge_and_report(job: Path | str, job_dir: Path | None, limit: int | None, wait: bool = False) -> int:
    """`tensorfleet merge`: a sharded job's one output; exit 2 naming the shards not complete yet
    (with `wait`: once they are)."""
    try:
        result = api.merge(api.load(job), api.RunOptions(job_dir=job_dir, limit=limit), wait=wait)
    except api.JobFatal as error:
        print(f"tensorfleet: error: {error}", file=sys.stderr)
        return EXIT_FATAL
    print(result.summary())
    return result.exit_code
