"""One service job attempt = one `tensorfleet run JOB --job-dir DIR --resume` subprocess.

The service reuses the engine whole by running it: a crash in one job cannot take the
service or other jobs down, SIGTERM is a clean cancel (committed chunks kept), and a
restarted service resumes a job the same way a person would, from its manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tensorfleet.core.process import die_with_parent

from ..engine.run_progress import COUNTS, job_progress
from ..io.output_files import OUTPUT_ROOTS_ENV
from ..spec.safe_yaml import load_yaml
from .job_policy import JobPolicy, PolicyError

ERROR_MARK = "tensorfleet: error: "


PARENT_ENV = "TENSORFLEET_SERVICE_PID"
#: The service's JobPolicy as JSON, for the engine's check at start (`recheck`).
POLICY_ENV = "TENSORFLEET_JOB_POLICY"


def engine_command(spec_path: str, job_dir: str, limit: int | None, retry_failed: bool = False) -> list[str]:
    command = [sys.executable, "-m", "tensorfleet.coordinator.service.job_process", "run", spec_path, "--job-dir", job_dir, "--resume"]
    return command + (["--limit", str(limit)] if limit else []) + (["--retry-failed"] if retry_failed else [])


def start(spec_path: str, job_dir: str, limit: int | None, log_path: Path,
          policy: JobPolicy | None = None, retry_failed: bool = False) -> subprocess.Popen:
    """Start the engine; it dies with the service (PDEATHSIG), so a restart never finds two.

    With a `policy`, the engine checks the job against it again when it starts (the job may have
    waited in the queue while a folder was swapped for a symlink) and places its output only
    inside the output roots, opened without following symlinks (issue 28 #5).

    No preexec_fn: running Python between fork and exec in a process with gRPC threads aborts
    the child. The engine sets its own parent-death signal instead (see `main` below).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            engine_command(spec_path, job_dir, limit, retry_failed), stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid()), **policy_env(policy)},
            start_new_session=True,
        )


def policy_env(policy: JobPolicy | None) -> dict[str, str]:
    """The environment that hands an engine the service's job policy (read back by `recheck`)."""
    if policy is None:
        return {}
    return {
        POLICY_ENV: json.dumps({
            "model_roots": [str(r) for r in policy.model_roots], "data_roots": [str(r) for r in policy.data_roots],
            "output_roots": [str(r) for r in policy.output_roots], "url_prefixes": list(policy.url_prefixes),
            "allowed_tools": [str(t) for t in policy.allowed_tools],
        }),
        OUTPUT_ROOTS_ENV: os.pathsep.join(str(r) for r in policy.output_roots),
    }


def recheck(spec_path: Path, job_dir: Path) -> str:
    """At the engine's start: the job's paths resolved and checked again against the service's policy
    (a folder may have become a symlink while the job was queued). '' when allowed, else why not."""
    settings = os.environ.get(POLICY_ENV)
    if not settings:
        return ""
    policy = JobPolicy(**json.loads(settings))
    try:
        policy.check(load_yaml(spec_path.read_bytes(), str(spec_path)))
        policy.check({"job_dir": str(job_dir)})
    except PolicyError as error:
        return f"job refused when it started (its paths changed since it was submitted): {error}"
    return ""


def stop(pid: int) -> None:
    """SIGTERM: the engine stops dispatching, keeps committed chunks, and exits."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def engine_alive(pid: int | None, spec_path: str) -> bool:
    """Whether `pid` is still this job's engine (an orphan from a killed service)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return spec_path.encode() in cmdline


def extract_error(log_text: str, returncode: int | None) -> str:
    """The engine's own message ('tensorfleet: error: ...', which says what to fix), else the log's end."""
    position = log_text.rfind(ERROR_MARK)
    if position >= 0:
        return log_text[position + len(ERROR_MARK):].strip()
    if returncode is not None and returncode < 0:
        cause = f"the job process was killed by signal {signal.Signals(-returncode).name}"
    else:
        cause = f"the job process exited with {returncode}"
    tail = "\n".join(log_text.strip().splitlines()[-8:])
    return cause + (f"; its log ends:\n{tail}" if tail else "")


def killed_message(returncode: int) -> str:
    """An engine ended by a signal nobody in the service sent (kill -9, the OOM killer): it is stopped."""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = str(-returncode)
    return f"stopped: the job process was killed by signal {name}"


def crash_message(log_text: str, returncode: int) -> str:
    """An engine that crashed: its traceback's last line (the engine's crash line, else Python's own)."""
    from ..workflows.run_command import CRASH_MARK

    lines = log_text.strip().splitlines()
    for line in reversed(lines):
        if line.startswith(CRASH_MARK):
            return "the job crashed: " + line.removeprefix(CRASH_MARK)
    for index in range(len(lines) - 1, -1, -1):  # Python's own traceback: its last unindented line
        if lines[index].startswith("Traceback (most recent call last)"):
            tail = [line for line in lines[index + 1:] if line and not line.startswith(" ")]
            if tail:
                return f"the job crashed (exit {returncode}): {tail[-1]}"
    return extract_error(log_text, returncode)


def rows_failed_message(log_text: str) -> str:
    for line in reversed(log_text.splitlines()):
        if line.startswith("tensorfleet: ") and "rows failed" in line:
            return line.removeprefix("tensorfleet: ")
    return ""


def manifest_counts(job_dir: str) -> dict[str, int]:
    """Chunk and row counts from the job's manifests (a workflow's: summed over its parts, with the
    parts not yet planned counted as their plan will be), read-only; {} before any exists."""
    report = job_progress(Path(job_dir))
    return {key: int(report[key]) for key in COUNTS if key in report}


def progress(job_dir: str) -> dict[str, Any]:
    """What the engine last reported (status.json, a workflow's summed over its parts) with the
    manifests' exact counts on top; see engine/run_progress.py."""
    return job_progress(Path(job_dir))


def main(argv: list[str]) -> int:
    """`tensorfleet run` that exits with the service: SIGTERM when its parent dies, even by SIGKILL."""
    if sys.platform == "linux":
        die_with_parent()
        parent = os.environ.get(PARENT_ENV)
        if parent and os.getppid() != int(parent):  # the service died before the signal was armed
            return 2
    return run_engine(argv)


def run_engine(argv: list[str]) -> int:
    """`run SPEC --job-dir DIR --resume [--limit N] [--retry-failed]` (engine_command's arguments) through the engine."""
    import argparse
    import signal as signals

    from ..workflows.api import RunOptions
    from ..workflows.run_command import run_and_report

    parser = argparse.ArgumentParser(prog="tensorfleet.coordinator.service.job_process")
    parser.add_argument("command", choices=["run"])
    parser.add_argument("job", type=Path)
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--retry-failed", action="store_true", help="compute again the chunks holding failed rows")
    args = parser.parse_args(argv)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signals.signal(signals.SIGTERM, interrupt)
    refused = recheck(args.job, args.job_dir)
    if refused:
        print(f"{ERROR_MARK}{refused}", file=sys.stderr)
        return 2
    return run_and_report(args.job, RunOptions(job_dir=args.job_dir, resume=args.resume, limit=args.limit,
                                                     retry_failed=args.retry_failed))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
