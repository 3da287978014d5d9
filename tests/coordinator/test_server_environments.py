"""A server per environment: `model.local.python` and `model.local.launcher`.

A two-model sweep where one model's servers run from a second environment made here (a venv
with tensorfleet's server and no TensorFlow, tests/coordinator/server_env.py); and a server whose
tensorfleet speaks another protocol version, refused at start-up with exit 2 and both versions
named, its server stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import yaml

from tensorfleet.core.version import PROTOCOL_VERSION

from .helpers import MODELS, run_tensorfleet, wait_for
from .server_env import make_server_env


def _numeric(path: Path, rows: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)
    with h5py.File(path, "w") as handle:
        handle["x"] = x
        handle["ids"] = np.array([f"{path.stem}-{i}" for i in range(rows)], dtype="S")
    return x


def _sweep(tmp_path: Path, other: dict) -> Path:
    spec = {
        "name": "envs",
        "sources": [{"path": "one.h5", "ids": "ids", "tensors": {"x": "x"}}],
        "models": [
            {"name": "vec8", "local": {"repository": str(MODELS)}, "outputs": {"norm": "value"}},
            {"name": "scaled", "local": {"repository": str(MODELS), **other}, "parameters": {"steps": 3},
             "outputs": {"steps": "value"}},
        ],
        "output": {"dir": "out", "layout": "one_table"},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    return job


def _server_pids(job_dir: Path, model: str) -> list[int]:
    return [entry["pid"] for entry in json.loads((job_dir / model / "servers" / "servers.json").read_text())]


def test_two_model_sweep_with_one_model_served_from_a_second_venv(tmp_path):
    python = make_server_env(tmp_path / "env")
    x = _numeric(tmp_path / "one.h5", 40, 1)
    result = run_tensorfleet("run", _sweep(tmp_path, {"python": str(python)}), "-v")
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "out" / "envs.parquet")
    models = table.column("model").to_pylist()
    values = np.array(table.column("value").to_pylist(), dtype=np.float32)
    assert models == ["vec8"] * 40 + ["scaled"] * 40
    np.testing.assert_allclose(values[:40], np.sqrt((x * x).sum(axis=1)), rtol=1e-6)
    assert (values[40:] == 3).all()
    # the scaled server really ran from the second environment, and that one has no TensorFlow
    job_dir = tmp_path / "out" / ".envs.tfjob"
    log = Path(json.loads((job_dir / "scaled" / "servers" / "servers.json").read_text())[0]["log"])
    assert f"python from {tmp_path / 'env'}" in log.read_text()
    vec8_log = Path(json.loads((job_dir / "vec8" / "servers" / "servers.json").read_text())[0]["log"])
    assert "python from" not in vec8_log.read_text()
    probe = subprocess.run([str(python), "-c", "import sys; print(sys.prefix); import tensorflow"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == str(tmp_path / "env") and "No module named 'tensorflow'" in probe.stderr


def test_a_server_with_another_protocol_version_is_refused_with_exit_2(tmp_path):
    python = make_server_env(tmp_path / "old", protocol=PROTOCOL_VERSION + 1)
    _numeric(tmp_path / "one.h5", 10, 2)
    result = run_tensorfleet("run", _sweep(tmp_path, {"python": str(python)}))
    assert result.returncode == 2, result.stderr
    assert f"with protocol version {PROTOCOL_VERSION + 1}; this coordinator is tensorfleet" in result.stderr
    assert f"with protocol version {PROTOCOL_VERSION}. Install the same tensorfleet" in result.stderr
    assert f"(python {python})" in result.stderr
    pids = _server_pids(tmp_path / "out" / ".envs.tfjob", "scaled")
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), timeout=30, what="the server to stop")


def test_a_launcher_prefix_runs_the_server_command_inside_it(tmp_path):
    """A shell wrapper stands for `apptainer exec image.sif` or `conda run -n env`: it prints a
    line into the server's log, then execs the server command it was given."""
    _numeric(tmp_path / "one.h5", 10, 3)
    wrapper = ["sh", "-c", 'echo "wrapped: $1 $2"; exec "$@"', "wrapper"]
    result = run_tensorfleet("run", _sweep(tmp_path, {"launcher": wrapper}))
    assert result.returncode == 0, result.stderr
    servers = json.loads((tmp_path / "out" / ".envs.tfjob" / "scaled" / "servers" / "servers.json").read_text())
    assert Path(servers[0]["log"]).read_text().startswith("wrapped: ")
