"""What the sbatch scripts `tensorfleet slurm` writes have in common: the header (comments, the
#SBATCH options, bash's strict mode), the options that say where a job runs, and reading an
option back from a written script (the merge job of a sharded job takes its name and run
folder from the array's script; the scripts are saved next to their SLURM output), and writing
one owner-only when it holds the token."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .slurm_steps import SlurmError


def sbatch_time(value: str) -> str:
    """A --time SLURM accepts (minutes, H:MM:SS, D-HH:MM:SS); SlurmError otherwise."""
    allowed = set("0123456789:-")
    if not value or not set(value) <= allowed:
        raise SlurmError(f"--time {value!r}: use SLURM's forms, e.g. 90, 01:30:00 or 1-00:00:00")
    return value


def placement_options(partition: str | None, account: str | None, time: str | None) -> list[str]:
    """--partition, --account and --time, for those given."""
    options = [f"--partition={partition}"] if partition else []
    options += [f"--account={account}"] if account else []
    options += [f"--time={sbatch_time(time)}"] if time else []
    return options


def script_header(comments: list[str], options: list[str]) -> list[str]:
    """A script's first lines: bash, `comments` (each a '# ' line), one #SBATCH line per option
    (sbatch reads them only before the first command), then strict mode and a blank line."""
    return ["#!/bin/bash", *(f"# {line}" for line in comments), *(f"#SBATCH {option}" for option in options),
            "set -uo pipefail", ""]


def sbatch_option(script: str, name: str) -> str | None:
    """The value of `#SBATCH --NAME=VALUE` in a written script; None when it has none."""
    prefix = f"#SBATCH --{name}="
    return next((line.removeprefix(prefix) for line in script.splitlines() if line.startswith(prefix)), None)


def write_script(path: Path, script: str) -> None:
    """Write a batch script; one that holds the servers' token is created owner-only (0600)
    from its first byte, not chmodded after it was written readable."""
    mode = 0o600 if "TENSORFLEET_TOKEN" in script else 0o644
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a rewrite gets the new mode, whatever the old file had
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(script)
