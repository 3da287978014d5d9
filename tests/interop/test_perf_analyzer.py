"""Triton's perf_analyzer (the C++ binary of the tritonclient 2.51.0 wheel) against both endpoints.

It reads the model's metadata and config (ModelConfig rpc / config route), sends requests,
and reads ModelStatistics before and after each window: all three must be what Triton serves,
over gRPC and over HTTP. Its own environment: `make perf-analyzer` builds `.venv-perf` (PyPI
tritonclient[all]==2.51.0 and nvidia-cuda-runtime-cu12, whose libcudart the binary links; Debian
libb64-0d). Skips, saying so, where that is not installed; TENSORFLEET_PERF_ANALYZER may name
the binary elsewhere.
"""

from __future__ import annotations

import csv
import glob
import os
import subprocess
from pathlib import Path

import pytest

from tests.serving import REPO_ROOT, running_server

pytestmark = pytest.mark.interop

BINARY = Path(os.environ.get("TENSORFLEET_PERF_ANALYZER", REPO_ROOT / ".venv-perf" / "bin" / "perf_analyzer"))
CUDA_RUNTIME = glob.glob(str(REPO_ROOT / ".venv-perf" / "lib" / "python3*" / "site-packages" / "nvidia" / "cuda_runtime" / "lib"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not BINARY.exists():
        pytest.skip(f"perf_analyzer is not installed at {BINARY} (make perf-analyzer sets it up)")
    port_file = tmp_path_factory.mktemp("perf") / "http-port"
    with running_server(
        REPO_ROOT / "tests" / "models", "--model", "simple", "--http-port", "0", "--http-port-file", str(port_file)
    ) as process:
        yield process, int(port_file.read_text())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_runs_against_both_endpoints(server, protocol: str, tmp_path) -> None:
    process, http_port = server
    port = process.port if protocol == "grpc" else http_port
    report = tmp_path / "report.csv"
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join([*CUDA_RUNTIME, os.environ.get("LD_LIBRARY_PATH", "")])}
    done = subprocess.run(
        [str(BINARY), "-m", "simple", "-u", f"127.0.0.1:{port}", "-i", protocol, "-b", "2",
         "--concurrency-range", "2", "--measurement-mode", "count_windows",
         "--measurement-request-count", "100", "--max-trials", "10",
         # Machine load must not fail the test: any window counts as stable.
         "--stability-percentage", "100000", "-f", str(report)],
        capture_output=True, text=True, timeout=240, env=env, check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Server:" in output and "Successful request count" in output, output[-4000:]  # statistics read
    rows = list(csv.DictReader(report.open()))
    assert rows and float(rows[0]["Inferences/Second"]) > 0, rows
    assert process.process.poll() is None
