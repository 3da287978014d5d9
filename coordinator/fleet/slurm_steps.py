"""The helpers a SLURM batch job's steps run (`python -m tensorfleet.coordinator.fleet.slurm
serve-task` and `... wait-healthy`, see slurm.py): one model server per srun task, kept up on its
port (core/supervisor.py), its address appended to a shared hostfile; and the wait for every
server's health before the coordinator step runs the job.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from tensorfleet.core.process import (
    ProcessStartError,
    read_port_file,
    server_command,
    start_process,
)
from tensorfleet.core.supervisor import RestartOnPort


class SlurmError(Exception):
    """The job cannot be turned into a batch script or submitted; the message says why."""


#: Times a serve task starts its server again after it dies while serving (a crash on a row,
#: a failed device: exit 75); TENSORFLEET_MAX_RESTARTS overrides.
MAX_RESTARTS = 50
RESTART_TIMEOUT_S = 600.0


def serve_task(hostfile: Path, server_args: list[str], host: str | None = None) -> int:
    """Run one model server on a free port; once it is SERVING, append `host:port` to hostfile.

    The server is stopped (SIGTERM: it drains, then exits) when the stop file next to the
    hostfile appears, or when this task gets SIGTERM/SIGINT. The stop file is how the batch
    script ends the servers gracefully: srun answers a signal by killing its tasks outright.
    A server that dies while serving is started again on the same port (the address in the
    hostfile stays valid and the coordinator reconnects), up to MAX_RESTARTS times.
    """
    host = host or os.environ.get("TENSORFLEET_SERVER_HOST") or os.environ.get("SLURMD_NODENAME") \
        or socket.gethostname()
    workdir = Path(tempfile.mkdtemp(prefix="tf-slurm-task-"))
    port_file = workdir / "port"
    keeper = RestartOnPort(
        lambda port: server_command(*server_args, "--port", str(port), port_file=port_file), port_file, None,
        int(os.environ.get("TENSORFLEET_MAX_RESTARTS", MAX_RESTARTS)), RESTART_TIMEOUT_S,
    )
    # --port 0 last: every task on a node gets a free port whatever the arguments say
    process = start_process(keeper.command_on_port(0), None)

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    stop, stopping = stop_file(hostfile), False
    try:
        while True:
            while process.poll() is None:
                if keeper.port is None and (port := read_port_file(port_file)) is not None:
                    keeper.port = port
                    _append_line(hostfile, f"{host}:{port}\n")
                    print(f"tensorfleet: server {host}:{port} is serving", file=sys.stderr, flush=True)
                if not stopping and stop.exists():
                    stopping = True
                    forward(signal.SIGTERM, None)
                time.sleep(0.2)
            if keeper.port is None:  # exited before serving: tell wait-healthy now rather than at its timeout
                _append_line(failed_file(hostfile), f"{host}: server exited with {process.returncode}\n")
            if keeper.port is None or stopping or stop.exists() or keeper.spent:
                return process.wait()
            keeper.count()
            print(f"tensorfleet: server {host}:{keeper.port} exited with {process.returncode}; starting it again on "
                  f"its port ({keeper.left} restarts left)", file=sys.stderr, flush=True)
            process = keeper.relaunch()
            try:
                keeper.wait_serving(process)
            except ProcessStartError as error:  # it died again while loading, or hangs there
                print(f"tensorfleet: {error}", file=sys.stderr, flush=True)
                process.kill()
                return process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def stop_file(hostfile: Path) -> Path:
    return hostfile.with_name(hostfile.name + ".stop")


def failed_file(hostfile: Path) -> Path:
    return hostfile.with_name(hostfile.name + ".failed")


def _append_line(path: Path, line: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:  # one short O_APPEND write: lines from many tasks never interleave
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)


def read_hostfile(hostfile: Path) -> list[str]:
    if not hostfile.exists():
        return []
    return [line.strip() for line in hostfile.read_text().splitlines() if line.strip()]


def wait_healthy(
    hostfile: Path, count: int, timeout: float = 300.0, model: str | list[str] | None = None, token: str | None = None
) -> list[str]:
    """Wait until the hostfile lists `count` servers and each says SERVING (and has every model in `model`)."""
    from tensorfleet.client import InferenceClient
    from tensorfleet.core.errors import TensorfleetError

    deadline = time.monotonic() + timeout
    servers = read_hostfile(hostfile)
    while len(servers) < count:
        failed = read_hostfile(failed_file(hostfile))
        if failed:
            raise SlurmError(f"{len(failed)} server(s) failed to start: {'; '.join(failed)}")
        if time.monotonic() > deadline:
            raise SlurmError(f"{hostfile}: {len(servers)} of {count} servers after {timeout:g}s: {servers}")
        time.sleep(0.2)
        servers = read_hostfile(hostfile)
    wanted = [model] if isinstance(model, str) or model is None else model
    for address in servers:
        with InferenceClient(address, token=token) as client:
            for name in wanted:
                try:
                    client.wait_until_ready(max(1.0, deadline - time.monotonic()), model=name)
                except TensorfleetError as error:
                    raise SlurmError(f"server {address} is not healthy: {error}") from None
    return servers
