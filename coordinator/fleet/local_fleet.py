"""Local servers: `python -m tensorfleet.services` subprocesses, started for a job and stopped by pid.

The coordinator never imports the server; it only starts it and reads the port file the
server writes once its models are loaded and warmed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tensorfleet.core.process import (
    ProcessStartError,
    server_command,
    start_process,
    stop_processes,
    wait_for_port_files,
)


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
        for index in range(self.count):
            port_file = self.workdir / f"server-{index}.port"
            log_path = self.workdir / f"server-{index}.log"
            port_file.unlink(missing_ok=True)
            command = server_command(
                "--model-repository", str(self.repository), "--model", self.model, "--host", "127.0.0.1",
                "--device", device_for(self.device, index), *self.args, port_file=port_file,
            )  # fmt: skip
            process = start_process(command, log_path, new_session=True, tie_to_parent=True)
            self.servers.append(LocalServer(process, port_file, log_path))
        self._write_pids()
        started = [(server.process, server.port_file, server.log_path) for server in self.servers]
        try:
            ports = wait_for_port_files(started, timeout, what="local server",
                                        hint=" (raise model.local.startup_timeout_s)")
        except ProcessStartError as error:
            raise LocalFleetError(str(error)) from None
        for server, port in zip(self.servers, ports, strict=True):
            server.port = port
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
        stop_processes([server.process for server in self.servers], timeout)
        self.servers = []
