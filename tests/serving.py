"""Start real model servers as subprocesses on loopback for tests, and always stop them by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tensorfleet.core.process import server_command, start_and_wait, stop_process

__all__ = ["REPO_ROOT", "ServerProcess", "launch_server", "running_server", "stop_process"]

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
    command = server_command("--model-repository", str(repository), "--host", "127.0.0.1", *args,
                             port_file=workdir / "port")
    full_env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    process, port = start_and_wait(command, workdir / "port", workdir / "server.log", timeout,
                                   env=full_env, cwd=REPO_ROOT)
    return ServerProcess(process=process, port=port, log_path=workdir / "server.log")


@contextlib.contextmanager
def running_server(repository: Path | str, *args: str, **kwargs) -> Iterator[ServerProcess]:
    server = launch_server(repository, *args, **kwargs)
    try:
        yield server
    finally:
        server.stop(signal.SIGTERM, timeout=15)
