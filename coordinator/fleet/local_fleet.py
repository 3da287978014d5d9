"""Local servers: `python -m tensorfleet.services` subprocesses, started for a job and stopped by pid.

The coordinator never imports the server; it only starts it and reads the port file the
server writes once its models are loaded and warmed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tensorfleet.core.process import (
    ProcessStartError,
    server_command,
    start_process,
    stop_processes,
    wait_for_port_files,
)
from tensorfleet.core.supervisor import RestartOnPort

log = logging.getLogger("tensorfleet.coordinator")


def _on_port(command: list[str] | None, port: int) -> list[str]:
    """A local server's command with the port it had (a restart keeps its address)."""
    assert command is not None
    command = [*command]
    command[command.index("--port") + 1] = str(port)
    return command

#: How often the supervisor looks for servers that died.
SUPERVISE_EVERY_S = 0.5


class LocalFleetError(Exception):
    """A local server would not start; the message carries the end of its log."""


@dataclass
class LocalServer:
    process: subprocess.Popen
    port_file: Path
    log_path: Path
    port: int | None = None
    command: list[str] | None = None
    #: The restart budget and relaunch on its port (core/supervisor.py), once it served.
    keeper: RestartOnPort | None = None
    #: No more restarts: the budget is spent, or it died again while loading.
    given_up: bool = False

    @property
    def restarts(self) -> int:
        return self.keeper.restarts if self.keeper is not None else 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def available_models(repository: Path) -> list[str]:
    return sorted(p.name for p in repository.iterdir() if (p / "config.yaml").is_file()) if repository.is_dir() else []


def device_for(device: str, index: int) -> str:
    """cuda:N with count k uses cuda:N..N+k-1; cpu stays cpu."""
    if device.startswith("cuda"):
        base = int(device.partition(":")[2] or 0)
        return f"cuda:{base + index}"
    return device


def visible_gpus(timeout: float = 120.0) -> int:
    """GPUs a server started now would see: torch's count in a subprocess, else nvidia-smi.

    A subprocess, because the coordinator itself never imports torch or the server; it
    honours CUDA_VISIBLE_DEVICES the same way the servers will.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    probe = [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"]
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        done = subprocess.run(probe, capture_output=True, text=True, timeout=timeout, check=True)
        return int(done.stdout.strip().splitlines()[-1])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True)
        found = sum(line.startswith("GPU ") for line in done.stdout.splitlines())
        return min(found, len(visible.split(","))) if visible else found
    return 0


def resolve_count(count: int | str, device: str, gpus: Callable[[], int] = visible_gpus) -> tuple[int, str]:
    """`count: auto` -> one server per visible GPU from cuda:N on (1 on the CPU); `device: auto` -> cuda or cpu."""
    found: int | None = None
    if device == "auto":
        found = gpus()
        device = "cuda:0" if found else "cpu"
    if count != "auto":
        return int(count), device
    if not device.startswith("cuda"):
        return 1, device
    found = gpus() if found is None else found
    base = int(device.partition(":")[2] or 0)
    if found <= base:
        raise LocalFleetError(
            f"model.local.count is 'auto' on {device}, but {found} GPU(s) are visible; "
            "set a count, or device cpu"
        )
    return found - base, device


class LocalFleet:
    """Starts `count` servers for one model and stops them, by pid, when the job ends."""

    def __init__(
        self, repository: Path, model: str, count: int | str, device: str, workdir: Path, args: list[str],
        max_restarts: int = 0, python: str | None = None, launcher: list[str] | None = None,
    ) -> None:
        self.repository = repository
        self.model = model
        self.count = count
        self.device = device
        self.workdir = workdir
        self.args = args
        self.max_restarts = max_restarts
        #: Another environment for the servers: its interpreter, and/or a wrapper command.
        self.python = python
        self.launcher = list(launcher or [])
        self.servers: list[LocalServer] = []
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        if not self.repository.is_dir():
            raise LocalFleetError(f"model.local.repository {self.repository} is not a folder")
        models = available_models(self.repository)
        if self.model not in models:
            raise LocalFleetError(
                f"model '{self.model}' is not in the repository {self.repository} "
                f"(it has: {', '.join(models) or 'no models'}); fix model.name or model.local.repository"
            )

    def start(self, timeout: float) -> list[str]:
        self.check()
        self.count, self.device = resolve_count(self.count, self.device)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for index in range(self.count):
            port_file = self.workdir / f"server-{index}.port"
            log_path = self.workdir / f"server-{index}.log"
            port_file.unlink(missing_ok=True)
            command = self._command(server_command(
                "--model-repository", str(self.repository), "--model", self.model, "--host", "127.0.0.1",
                "--device", device_for(self.device, index), "--exit-on-load-error", *self.args, port_file=port_file,
            ))  # fmt: skip
            process = self._start(command, log_path)
            self.servers.append(LocalServer(process, port_file, log_path, command=command))
        self._write_pids()
        started = [(server.process, server.port_file, server.log_path) for server in self.servers]
        try:
            ports = wait_for_port_files(started, timeout, what="local server",
                                        hint=" (raise model.local.startup_timeout_s)")
        except ProcessStartError as error:
            raise LocalFleetError(str(error)) from None
        for server, port in zip(self.servers, ports, strict=True):
            server.port = port
            server.keeper = RestartOnPort(
                partial(_on_port, server.command), server.port_file, server.log_path, self.max_restarts, timeout,
                what="local server", port=port,
            )
        self._write_pids()
        if self.max_restarts:
            self._supervisor = threading.Thread(
                target=self._supervise, args=(timeout,), name="tf-local-fleet", daemon=True
            )
            self._supervisor.start()
        return [server.address for server in self.servers]

    def _command(self, command: list[str]) -> list[str]:
        """The server command in the model's own environment: `local.python` for the interpreter,
        `local.launcher` before it (a container or `conda run`)."""
        if self.python:
            command = [self.python, *command[1:]]
        return [*self.launcher, *command]

    def environment(self) -> str:
        """How the servers' environment differs from the coordinator's ('' when it does not)."""
        parts = [f"python {self.python}"] if self.python else []
        parts += [f"launcher {' '.join(self.launcher)}"] if self.launcher else []
        return f" ({', '.join(parts)})" if parts else ""

    def _start(self, command: list[str], log_path: Path, append: bool = False) -> subprocess.Popen:
        """A `python -m` server is tied to this process (it dies with it); one under a launcher is
        its own session, stopped by its process group like the others."""
        tie = not self.launcher
        return start_process(command, log_path, new_session=True, tie_to_parent=tie, append=append)

    # --- supervision -----------------------------------------------------------------
    def _supervise(self, timeout: float) -> None:
        """A server that dies mid-job (a crash on a bad row, the OOM killer) is started again on
        its port, up to max_restarts times: its address stays valid, so the dispatcher, which
        retries a lost server, reconnects by itself. Without this, a one-server fleet ends the
        job at the first crash."""
        while not self._stopping.wait(SUPERVISE_EVERY_S):
            for index, server in enumerate(list(self.servers)):
                code = server.process.poll()
                if code is None or self._stopping.is_set():
                    continue
                if server.given_up:
                    continue
                if server.keeper is None or server.keeper.spent:
                    server.given_up = True
                    log.error("local server %d (pid %d, %s) exited with code %s; model.local.max_restarts (%d) is "
                              "spent, so it stays down: its log is %s", index, server.process.pid, server.address,
                              code, self.max_restarts, server.log_path)
                    continue
                self._restart(index, server, code, timeout)

    def _restart(self, index: int, server: LocalServer, code: int, timeout: float) -> None:
        assert server.keeper is not None
        server.keeper.count()
        log.warning(
            "local server %d (pid %d, %s) exited with code %s; starting it again on port %s (%d of %d)%s",
            index, server.process.pid, server.address, code, server.port, server.restarts, self.max_restarts,
            "" if server.restarts < self.max_restarts else ": the last restart model.local.max_restarts allows",
        )
        with self._lock:
            if self._stopping.is_set():
                return
            server.process = server.keeper.relaunch(new_session=True, tie_to_parent=not self.launcher, append=True)  # as _start
            self._write_pids()
        try:
            server.keeper.wait_serving(server.process)
        except ProcessStartError as error:
            if self._stopping.is_set():
                return  # stopped with the fleet, not dead of itself
            server.given_up = True  # it dies while loading: starting it again would loop
            log.error("local server %d did not come back; not starting it again: %s", index, error)

    def _write_pids(self) -> None:
        """servers.json: pid, port and log of each server, for operators and tests."""
        records = [
            {"pid": s.process.pid, "port": s.port, "address": s.address if s.port else None, "log": str(s.log_path)}
            for s in self.servers
        ]
        (self.workdir / "servers.json").write_text(json.dumps(records, indent=1))

    def kill(self, address: str) -> None:
        """SIGKILL the server at `address` (a stalled one); the supervisor starts it again."""
        for index, server in enumerate(self.servers):
            if server.port and server.address == address and server.process.poll() is None:
                log.warning("local server %d (pid %d, %s) stalled; killing it to start it afresh",
                            index, server.process.pid, address)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.process.pid, signal.SIGKILL)

    @property
    def restarts(self) -> int:
        return sum(server.restarts for server in self.servers)

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        with self._lock:  # a restart in progress finishes starting its process first
            processes = [server.process for server in self.servers]
        stop_processes(processes, timeout)
        if self._supervisor is not None:
            self._supervisor.join(timeout)
            self._supervisor = None
        self.servers = []
