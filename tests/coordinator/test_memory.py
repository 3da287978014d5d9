"""Acceptance 7: coordinator memory is bounded by the in-flight window, not by the output size."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import psutil
import pytest

from tests.serving import launch_server

from .helpers import MODELS, start_tensorfleet, write_job

ROWS = 131_072  # x 16 KiB per row ('wide' returns 4096 float32) = 2 GiB of outputs


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_gib_of_outputs_with_peak_coordinator_rss_under_500_mb(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(ROWS, dtype=np.float32).reshape(ROWS, 1))
    server = launch_server(MODELS)
    try:
        job = write_job(
            tmp_path / "job.yaml", input={"path": "x.npy"}, model={"name": "wide", "servers": [server.address]},
            output={"path": "wide.h5"}, chunking={"chunk_rows": 1024, "batch_rows": 64}, policy={"window": 4},
        )
        coordinator = start_tensorfleet("run", job, log=tmp_path / "coordinator.log")
        process = psutil.Process(coordinator.pid)
        peak = 0
        while coordinator.poll() is None:
            try:
                peak = max(peak, process.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        assert coordinator.returncode == 0, (tmp_path / "coordinator.log").read_text()
    finally:
        server.stop(signal.SIGKILL)
    output = tmp_path / "wide.h5"
    assert output.stat().st_size >= 2 * 1024**3
    status = json.loads((tmp_path / "wide.h5.tfjob" / "status.json").read_text())
    own_peak = status["peak_rss_bytes"]  # the coordinator's own getrusage peak, merge included
    print(f"peak RSS: polled {peak / 2**20:.0f} MiB, getrusage {own_peak / 2**20:.0f} MiB")
    assert peak < 500 * 2**20 and own_peak < 500 * 2**20
    import h5py

    with h5py.File(output) as f:
        assert f["wide"].shape == (ROWS, 4096)
        assert f["wide"][ROWS - 1, 7] == ROWS - 1 + 7 and f["ids"][ROWS - 1].decode() == str(ROWS - 1)
