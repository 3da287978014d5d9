"""The coordinator service for tests: a real `tensorfleet coordinator serve` subprocess on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from tensorfleet.client import CoordinatorClient
from tensorfleet.core.process import server_command, start_and_wait, stop_process
from tests.coordinator.helpers import REPO_ROOT


@dataclass
class Coordinator:
    process: subprocess.Popen
    port: int
    state_dir: Path
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kwargs) -> CoordinatorClient:
        return CoordinatorClient(self.address, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def engine_pid(self, job_id: str) -> int | None:
        """The pid of the job's engine process, as the service recorded it."""
        with contextlib.closing(sqlite3.connect(self.state_dir / "coordinator.sqlite", timeout=5)) as db:
            row = db.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        return stop_process(self.process, sig, timeout)


def start_coordinator(state_dir: Path, *args: str, env: dict | None = None, timeout: float = 60) -> Coordinator:
    """`coordinator serve` on loopback; jobs may read and write under the state folder's parent
    (the test's tmp_path) unless `args` name their own roots."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if not any(str(a) in ("--data-root", "--output-root") for a in args):
        args = (*args, "--data-root", str(state_dir.parent), "--output-root", str(state_dir.parent))
    port_file = state_dir / "port"
    log_path = state_dir / f"service-{time.monotonic_ns()}.log"
    command = server_command(
        "coordinator", "serve", "--host", "127.0.0.1", "--state-dir", state_dir, *args,
        port_file=port_file, module="tensorfleet.coordinator",
    )
    process, port = start_and_wait(command, port_file, log_path, timeout, what="coordinator",
                                   env={"OMP_NUM_THREADS": "1", **(env or {})}, cwd=REPO_ROOT)
    return Coordinator(process, port, state_dir, log_path)


@contextlib.contextmanager
def running_coordinator(state_dir: Path, *args: str, **kwargs):
    coordinator = start_coordinator(state_dir, *args, **kwargs)
    try:
        yield coordinator
    finally:
        coordinator.stop()


def pid_gone(pid: int | None) -> bool:
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie (exited, not yet reaped by its dead parent's reaper) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def read_h5(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with h5py.File(path) as f:
        return [v.decode() for v in f["ids"][:]], f["embedding"][:], f["ok"][:]


def assert_same_output(path: Path, reference: Path) -> None:
    ids, values, ok = read_h5(path)
    ref_ids, ref_values, ref_ok = read_h5(reference)
    assert ids == ref_ids
    assert np.array_equal(ok, ref_ok)
    assert values.tobytes() == ref_values.tobytes()
