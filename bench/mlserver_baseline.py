"""MLServer as a baseline: a server process from `.venv-mlserver` serving bench/mlserver_runtime.

MLServer lives in a venv of its own (`make mlserver-venv`; it cannot share a process with
tensorfleet or tritonclient.grpc). `mlserver_process` writes its settings into a temporary
folder (127.0.0.1, free ports chosen now, metrics in that folder), starts `mlserver start`,
waits until the model is ready and always stops the process group it started, by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO_ROOT

MLSERVER = REPO_ROOT / ".venv-mlserver" / "bin" / "mlserver"
RUNTIME = REPO_ROOT / "bench" / "mlserver_runtime"

#: The two settings measured: one request per predict, and MLServer's adaptive batching.
SETTINGS = {
    "no_batching": {"max_batch_size": 0},
    "adaptive_batching": {"max_batch_size": 64, "max_batch_time": 0.002},
}


def available() -> bool:
    return MLSERVER.exists()


@dataclass
class MLServerProcess:
    process: subprocess.Popen
    grpc_address: str
    log: Path


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _write_settings(folder: Path, model_dir: Path, model: str, batching: dict, threads: int) -> tuple[int, int]:
    http_port, grpc_port, metrics_port = _free_ports(3)
    server = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "metrics_dir": str(folder / "metrics"),
        "debug": False,
        "load_models_at_startup": True,
    }
    (folder / "metrics").mkdir()
    (folder / "settings.json").write_text(json.dumps(server))
    model_folder = folder / model
    model_folder.mkdir()
    settings = {
        "name": model,
        "implementation": "protein_runtime.ProteinEmbedder",
        **batching,
        "parameters": {"uri": str(model_dir), "extra": {"threads": threads}},
    }
    (model_folder / "model-settings.json").write_text(json.dumps(settings))
    return http_port, grpc_port


def _wait_ready(process: subprocess.Popen, http_port: int, model: str, log: Path, timeout: float) -> None:
    url = f"http://127.0.0.1:{http_port}/v2/models/{model}/ready"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlserver exited with {process.returncode}: {log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"mlserver not ready after {timeout:.0f} s: {log.read_text()[-3000:]}")


@contextlib.contextmanager
def mlserver_process(
    model_dir: Path, model: str, setting: str, threads: int, timeout: float = 180
) -> Iterator[MLServerProcess]:
    """One MLServer serving `model_dir`'s encoder.pt with the named SETTINGS entry."""
    with tempfile.TemporaryDirectory(prefix="tf-bench-mlserver-") as tmp:
        folder = Path(tmp)
        http_port, grpc_port = _write_settings(folder, model_dir, model, SETTINGS[setting], threads)
        env = {
            **os.environ,
            "PYTHONPATH": str(RUNTIME),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        }
        env.pop("VIRTUAL_ENV", None)
        log = folder / "mlserver.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [str(MLSERVER), "start", str(folder)], cwd=folder, env=env,
                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            _wait_ready(process, http_port, model, log, timeout)
            yield MLServerProcess(process, f"127.0.0.1:{grpc_port}", log)
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the group this process leads (MLServer and its inference workers), then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # workers left behind by a slow shutdown
    process.wait()
