"""What `tensorfleet run` prints and returns, shared by the CLI and the service's job process."""

from __future__ import annotations

import sys
from pathlib import Path

from tensorfleet.core.exit_codes import EXIT_FATAL

from . import api


def run_and_report(job: Path | str, options: api.RunOptions) -> int:
    """Run a job file of any kind through the engine and print its summary; the exit code (0, 1 or 2)."""
    try:
        result = api.run(api.load(job), options)
    except api.JobFatal as error:
        print(f"tensorfleet: error: {error}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print("tensorfleet: interrupted; committed chunks are kept: run again with --resume", file=sys.stderr)
        return EXIT_FATAL
    print(result.summary())
    if result.rows_failed:
        print(f"tensorfleet: {result.rows_failed} of {result.rows} rows failed (once their cause is fixed, "
              f"`tensorfleet run {job} --retry-failed` computes their chunks again)", file=sys.stderr)
    return result.exit_code
