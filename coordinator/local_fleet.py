"""Local servers: `python -m tensorfleet.services` subprocesses, started for a job and stopped by pid.

The coordinator never imports the server; it only starts it and reads the port file the
server writes once its models are loaded and warmed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the server gets SIGTERM when the coordinator dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


#: Runs a model server (`python -m tensorfleet.services ARGS`) that first arms its own
#: parent-death signal. Not a preexec_fn: running Python between fork and exec in a process
#: with gRPC threads (a multi-stage job's later stage starts its fleet while an earlier one
#: streams) crashes the child; the plain fork+exec of subprocess is safe.
SERVER_LAUNCHER = """
import os, runpy, signal, sys
if sys.platform == "linux":
    import ctypes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != int(os.environ.get("TENSORFLEET_FLEET_PARENT", os.getppid())):
        sys.exit(2)  # the coordinator died before the signal was armed
runpy.run_module("tensorfleet.services", run_name="__main__", alter_sys=True)
"""


class LocalFleetError(Exception):
    """A local server would not start; the message carries the end of its log."""


@dataclass
class LocalServer:
    process: subprocess.Popen
    port_file: Path
    log_path: Path
    port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


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

    def __init__(self, repository: Path, model: str, count: int | str, device: str, workdir: Path, args: list[str]) -> None:
        self.repository = repository
        self.model = model
        self.count = count
        self.device = device
        self.workdir = workdir
        self.args = args
        self.servers: list[LocalServer] = []

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
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TENSORFLEET_FLEET_PARENT": str(os.getpid())}
        for index in range(self.count):
            port_file = self.workdir / f"server-{index}.port"
            log_path = self.workdir / f"server-{index}.log"
            port_file.unlink(missing_ok=True)
            command = [
                sys.executable, "-c", SERVER_LAUNCHER,
                "--model-repository", str(self.repository), "--model", self.model,
                "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
                "--device", device_for(self.device, index), *self.args,
            ]
            with open(log_path, "wb") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.servers.append(LocalServer(process, port_file, log_path))
        self._write_pids()
        deadline = time.monotonic() + timeout
        for server in self.servers:
            while server.port is None:
                text = server.port_file.read_text().strip() if server.port_file.exists() else ""
                if text:
                    server.port = int(text)
                elif server.process.poll() is not None:
                    raise LocalFleetError(
                        f"local server {server.process.pid} exited with {server.process.returncode} "
                        f"before serving; its log ({server.log_path}) ends:\n{server.log_tail()}"
                    )
                elif time.monotonic() > deadline:
                    raise LocalFleetError(
                        f"local server {server.process.pid} not serving after {timeout:.0f}s "
                        f"(raise model.local.startup_timeout_s); its log ends:\n{server.log_tail()}"
                    )
                else:
                    time.sleep(0.05)
        self._write_pids()
        return [server.address for server in self.servers]

    def _write_pids(self) -> None:
        """servers.json: pid, port and log of each server, for operators and tests."""
        records = [
            {"pid": s.process.pid, "port": s.port, "address": s.address if s.port else None, "log": str(s.log_path)}
            for s in self.servers
        ]
        (self.workdir / "servers.json").write_text(json.dumps(records, indent=1))

    def stop(self, timeout: float = 15.0) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for server in self.servers:
            try:
                server.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.process.pid, signal.SIGKILL)
                server.process.wait(10)
        self.servers = []
