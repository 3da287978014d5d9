"""Start real model servers as subprocesses on loopback for tests, and always stop them by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path
    metrics_port: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        return stop_process(self.process, sig, timeout)


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Signal a process by pid and wait; SIGKILL if it does not exit in time. Returns the exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
    return process.returncode


def _wait_for_port(port_file: Path, process: subprocess.Popen, log_path: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode} before it was ready:\n{log_path.read_text()}"
            )
        text = port_file.read_text().strip() if port_file.exists() else ""
        if text:
            return int(text)
        time.sleep(0.05)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log_path.read_text()}")


def launch_server(
    repository: Path | str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> ServerProcess:
    """Start `python -m tensorfleet.services` on a free loopback port; return once it is SERVING.

    The server writes its bound port to --port-file only after every model loaded and warmed,
    which is also when health turns SERVING.
    """
    workdir = Path(tempfile.mkdtemp(prefix="tf-server-"))
    port_file = workdir / "port"
    log_path = workdir / "server.log"
    command = [
        sys.executable,
        "-m",
        "tensorfleet.services",
        "--model-repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        *args,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    full_env.update(env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT
        )
    try:
        port = _wait_for_port(port_file, process, log_path, timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(10)
        raise
    return ServerProcess(process=process, port=port, log_path=log_path)


@contextlib.contextmanager
def running_server(repository: Path | str, *args: str, **kwargs) -> Iterator[ServerProcess]:
    server = launch_server(repository, *args, **kwargs)
    try:
        yield server
    finally:
        server.stop(signal.SIGTERM, timeout=15)
