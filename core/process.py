"""Start a server process, wait for the port file it writes once it serves, stop it by pid.

The one start-up handshake of every tensorfleet server (model server, coordinator service, the
bench echo): it binds port 0, and once it is ready (models loaded and warmed) it writes the bound
port to `--port-file` atomically. Whoever started it waits for that file, and gives up early,
with the end of the server's log, when the process exits first. The local fleet, the SLURM task,
the tests and the benches all start servers through these functions.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

#: The model server's entry point; the coordinator only ever starts it as a process.
SERVER_MODULE = "tensorfleet.services"


class ProcessStartError(RuntimeError):
    """A server exited, or stayed silent, before writing its port file; the message ends with its log."""

    def __init__(self, message: str, process: subprocess.Popen, log_path: Path | None) -> None:
        super().__init__(message)
        self.process = process
        self.log_path = log_path


def server_command(*args: str, port_file: Path | str, module: str = SERVER_MODULE) -> list[str]:
    """`python -m MODULE ARGS... --port-file F`, and `--port 0` (a free port) unless ARGS name one.

    ARGS come first, so a module with subcommands (`tensorfleet.coordinator coordinator serve`)
    gets the options after its subcommand."""
    args = tuple(map(str, args))
    port = () if "--port" in args else ("--port", "0")
    return [sys.executable, "-m", module, *args, *port, "--port-file", str(port_file)]


def write_port_file(path: Path | str, port: int) -> None:
    """Write the port atomically (temp file + rename): a reader never sees a half-written number."""
    temp = Path(f"{path}.tmp")
    temp.write_text(str(port))
    os.replace(temp, path)


def read_port_file(path: Path | str) -> int | None:
    """The port a server wrote, or None while it has not written one yet."""
    with contextlib.suppress(FileNotFoundError):
        text = Path(path).read_text().strip()
        return int(text) if text else None
    return None


def log_tail(log_path: Path | None, lines: int = 40) -> str:
    """The last lines of a log file ('' when there is none)."""
    if log_path is None or not log_path.exists():
        return ""
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def die_with_parent() -> None:  # pragma: no cover - runs at the start of a child process
    """Linux: this process gets SIGTERM when its parent dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


#: Environment variable: the pid a tied child must still have as its parent once its signal is armed.
PARENT_ENV = "TENSORFLEET_PARENT_PID"

#: `python -c TIED MODULE ARGS...`: arm the parent-death signal, then run MODULE as `python -m` would.
#: Armed in the child rather than in a preexec_fn: Python between fork and exec in a parent that
#: runs gRPC threads (a later stage's fleet starting while an earlier one streams) crashes the child.
TIED = """
import os, runpy, sys
from tensorfleet.core.process import PARENT_ENV, die_with_parent
if sys.platform == "linux":
    die_with_parent()
    if os.getppid() != int(os.environ.get(PARENT_ENV, os.getppid())):
        sys.exit(2)  # the parent died before the signal was armed
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


def start_process(
    command: Sequence[str],
    log_path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    new_session: bool = False,
    tie_to_parent: bool = False,
    append: bool = False,
) -> subprocess.Popen:
    """Start `command` with stdout and stderr into `log_path` (None: this process's own) and
    Python output unbuffered; `append` keeps what the log holds (a restarted server's).

    `env` is added to this process's environment. `tie_to_parent` (a `python -m MODULE` command)
    ends the child with SIGTERM when this process dies, even by SIGKILL (Linux)."""
    command = list(command)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if tie_to_parent:
        if command[1:2] != ["-m"]:
            raise ValueError(f"tie_to_parent needs a 'python -m MODULE' command, not {command[:3]}")
        command = [command[0], "-c", TIED, *command[2:]]
        full_env[PARENT_ENV] = str(os.getpid())
    if log_path is None:
        return subprocess.Popen(command, env=full_env, cwd=cwd, start_new_session=new_session)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab" if append else "wb") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=new_session
        )


def wait_for_port_file(
    process: subprocess.Popen,
    port_file: Path,
    timeout: float,
    *,
    log_path: Path | None = None,
    what: str = "server",
    hint: str = "",
) -> int:
    """Poll until `port_file` holds a port; ProcessStartError if the process exits or time runs out."""
    return wait_for_port_files([(process, port_file, log_path)], timeout, what=what, hint=hint)[0]


def wait_for_port_files(
    started: Sequence[tuple[subprocess.Popen, Path, Path | None]],
    timeout: float,
    *,
    what: str = "server",
    hint: str = "",
) -> list[int]:
    """The ports of servers started together (process, port file, log), under one deadline.

    The first server to exit before it is ready fails the whole wait at once, not at the timeout."""
    deadline = time.monotonic() + timeout
    ports: list[int | None] = [None] * len(started)
    while True:
        for index, (process, port_file, log_path) in enumerate(started):
            if ports[index] is None:
                ports[index] = read_port_file(port_file)
            if ports[index] is None and process.poll() is not None:
                raise _start_error(f"{what} {process.pid} exited with {process.returncode} before it was ready",
                                   process, log_path)
        if all(port is not None for port in ports):
            return [port for port in ports if port is not None]
        if time.monotonic() > deadline:
            index = ports.index(None)
            process, _, log_path = started[index]
            raise _start_error(f"{what} {process.pid} not ready after {timeout:.0f}s{hint}", process, log_path)
        time.sleep(0.05)


def _start_error(cause: str, process: subprocess.Popen, log_path: Path | None) -> ProcessStartError:
    tail = log_tail(log_path)
    where = f" ({log_path})" if log_path else ""
    return ProcessStartError(cause + (f"; its log{where} ends:\n{tail}" if tail else ""), process, log_path)


def start_and_wait(
    command: Sequence[str],
    port_file: Path,
    log_path: Path,
    timeout: float,
    *,
    what: str = "server",
    **options,
) -> tuple[subprocess.Popen, int]:
    """start_process + wait_for_port_file; a process that did not become ready is killed, by pid."""
    port_file.unlink(missing_ok=True)
    process = start_process(command, log_path, **options)
    try:
        return process, wait_for_port_file(process, port_file, timeout, log_path=log_path, what=what)
    except BaseException:
        stop_processes([process], timeout=0, sig=signal.SIGKILL)
        raise


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
    """Signal one process by pid and wait; SIGKILL if it has not exited in time. Its exit code."""
    stop_processes([process], timeout, sig)
    return process.returncode


def stop_processes(processes: Sequence[subprocess.Popen], timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """Signal each by pid, wait for all up to `timeout` in total, then SIGKILL the ones still running."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
