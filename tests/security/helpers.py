"""Attack helpers: real `tensorfleet serve` / `coordinator serve` processes on loopback, and the
checks every attack case ends with (the service still serves; nothing appeared outside the roots)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.serving import REPO_ROOT, stop_process


def snapshot(folder: Path) -> set[str]:
    """Every path under `folder` (files and folders), to compare before and after an attack."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@dataclass
class Spawned:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        return stop_process(self.process, timeout=30)


def run_cli(args: list[str], env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """A tensorfleet command that is expected to exit (a refused start, a client command)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tensorfleet.coordinator", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=REPO_ROOT)


def spawn(args: list[str], workdir: Path, env: dict | None = None, module: str = "tensorfleet.coordinator",
          timeout: float = 90) -> Spawned:
    """Start a server command with `--port 0 --port-file`, wait for its port; no --host unless `args` give it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"port-{time.monotonic_ns()}"
    log_path = workdir / f"log-{time.monotonic_ns()}.txt"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [sys.executable, "-m", module, *map(str, args), "--port", "0", "--port-file", str(port_file)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=workdir)
    deadline = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(10)
            raise RuntimeError(f"{command} did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    return Spawned(process, int(port_file.read_text()), log_path)


@contextlib.contextmanager
def spawned(args: list[str], workdir: Path, **kwargs) -> Iterator[Spawned]:
    service = spawn(args, workdir, **kwargs)
    try:
        yield service
    finally:
        service.stop()
