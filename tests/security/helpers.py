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

from tensorfleet.core.process import server_command, start_and_wait, stop_process
from tests.serving import REPO_ROOT


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
    # --port 0 after `args`: whatever they say, the test gets a free port
    command = server_command(*args, "--port", "0", port_file=port_file, module=module)
    process, port = start_and_wait(command, port_file, log_path, timeout, env={"OMP_NUM_THREADS": "1", **(env or {})},
                                   cwd=workdir)
    return Spawned(process, port, log_path)


@contextlib.contextmanager
def spawned(args: list[str], workdir: Path, **kwargs) -> Iterator[Spawned]:
    service = spawn(args, workdir, **kwargs)
    try:
        yield service
    finally:
        service.stop()
