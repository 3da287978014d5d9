"""The light simulated devices (bench/sim_devices.py) speak the protocol the coordinator uses.

Many devices share one process, each with its own port, queue and clock; these tests drive
them with the real SDK and the real `tensorfleet run` on loopback. The busy time checked is
the device's own accounting (rows x ms per row), not a timing of this machine."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

from bench.sim_devices import SimModel, sim_fleet
from tensorfleet.client import InferenceClient
from tensorfleet.core.errors import InvalidArgument

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_devices_answer_with_their_own_queue_and_clock():
    model = SimModel("sleep_rows", 16, "FP32", (4,), "echo")
    with sim_fleet(3, 5.0, model) as fleet:
        assert len(set(fleet.addresses)) == 3 and len(fleet.pids) == 1
        x = np.arange(32, dtype=np.float32).reshape(8, 4)
        with InferenceClient(fleet.addresses[0], shared_memory=False) as client:
            assert client.health() == "SERVING" and client.is_model_ready("sleep_rows")
            assert client.model_config("sleep_rows").max_batch_size == 16
            requests = [{"x": x + i} for i in range(3)] + [{"x": np.zeros((17, 4), np.float32)}]
            results = list(client.stream("sleep_rows", requests, window=4, return_exceptions=True))
            for i in range(3):
                np.testing.assert_array_equal(results[i]["y"], x + i)
            assert isinstance(results[3], InvalidArgument) and "max_batch_size 16" in str(results[3])
            stats = client.model_statistics("sleep_rows").model_stats[0]
            assert stats.execution_count == 3 and stats.inference_count == 24
            assert abs(stats.inference_stats.compute_infer.ns - 24 * 5_000_000) < 1_000
        with InferenceClient(fleet.addresses[1], shared_memory=False) as other:
            assert other.model_statistics("sleep_rows").model_stats[0].execution_count == 0


@pytest.mark.timeout(180)
def test_a_job_over_simulated_devices_writes_every_row_in_order(tmp_path):
    rows = 3000
    data = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    np.save(tmp_path / "in.npy", data)
    model = SimModel("null_rows", 64, "FP32", (4,), "echo")
    with sim_fleet(4, 0.0, model, processes=2) as fleet:
        assert len(fleet.pids) == 2 and len(fleet.addresses) == 4
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump({
            "name": "sim", "input": {"path": str(tmp_path / "in.npy")},
            "model": {"name": "null_rows", "servers": fleet.addresses},
            "output": {"path": str(tmp_path / "out.h5")},
            "chunking": {"batch_rows": 64, "chunk_rows": 256}, "policy": {"shared_memory": False},
        }))
        run = subprocess.run([sys.executable, "-m", "tensorfleet.coordinator", "run", str(job)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    with h5py.File(tmp_path / "out.h5") as out:
        np.testing.assert_array_equal(out["y"][:], data)
        assert [value.decode() for value in out["ids"][:5]] == ["0", "1", "2", "3", "4"]
        assert out["ok"][:].all()
