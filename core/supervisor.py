"""Restart a dead server on its port, within a budget: one supervisor for every place that keeps
servers up (a local fleet's servers, a SLURM serve task's server).

A server started again on the port it had keeps its address valid, so a coordinator that
retries a lost server reconnects by itself. The budget bounds the restarts; a server that dies
again while loading (or hangs there past `timeout`) is not started again by its caller: that
would loop.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .process import start_process, wait_for_port_file


@dataclass
class RestartOnPort:
    """The restart budget and the relaunch of one server on its port."""

    #: The server's command for a given port (the port it had once it served).
    command_on_port: Callable[[int], list[str]]
    port_file: Path
    log_path: Path | None
    max_restarts: int
    #: Seconds a restarted server may take to serve again.
    timeout: float
    what: str = "restarted server"
    #: The port it serves on (known once its first port file was read).
    port: int | None = None
    restarts: int = 0

    @property
    def left(self) -> int:
        return self.max_restarts - self.restarts

    @property
    def spent(self) -> bool:
        return self.restarts >= self.max_restarts

    def count(self) -> int:
        """One more restart taken from the budget; the count so far."""
        self.restarts += 1
        return self.restarts

    def relaunch(self, **start_options: Any) -> subprocess.Popen:
        """Start the server again on its port (its old port file removed first)."""
        assert self.port is not None
        self.port_file.unlink(missing_ok=True)
        return start_process(self.command_on_port(self.port), self.log_path, **start_options)

    def wait_serving(self, process: subprocess.Popen) -> int:
        """Its port once it serves again; ProcessStartError if it exits first or time runs out."""
        return wait_for_port_file(process, self.port_file, self.timeout, log_path=self.log_path, what=self.what)
