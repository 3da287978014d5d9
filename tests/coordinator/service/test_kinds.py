"""Every job kind through the coordinator service (issue 13): the STACK example (in-context) with
`submit --wait`, a multi-stage job with `--timeout`, then resumed by `run --resume`, and GetJob's counts summed over
a workflow's parts."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time

import anndata
import numpy as np
import pyarrow.parquet as pq

from tensorfleet.client.coordinator_client import job_state
from tests.coordinator.helpers import REPO_ROOT, run_tensorfleet

from .helpers import pid_gone, running_coordinator

EXAMPLES = REPO_ROOT / "examples"


def _copy(tmp_path, name: str):
    target = tmp_path / name
    shutil.copytree(EXAMPLES / name, target, ignore=shutil.ignore_patterns("output", "*.tfjob", "__pycache__"))
    return target


def test_stack_example_through_submit_wait_equals_a_local_run(tmp_path):
    served, local = _copy(tmp_path / "served", "stack"), _copy(tmp_path / "local", "stack")
    assert run_tensorfleet("run", local / "stack.yaml").returncode == 0
    with running_coordinator(tmp_path / "state", "--model-root", str(tmp_path)) as coordinator:
        result = run_tensorfleet("submit", served / "stack.yaml", "--coordinator", coordinator.address, "--wait")
        assert result.returncode == 0, result.stdout + result.stderr + coordinator.log()
        with coordinator.client() as client:
            (job,) = client.jobs()
            assert job_state(job) == "SUCCEEDED"
            assert job.output == str(served / "output" / "predictions.h5ad")
            query = anndata.read_h5ad(served / "data" / "query.h5ad").n_obs
            assert job.rows_done == job.rows == 2 * query  # the prompt run and the control run, summed
    ours, theirs = anndata.read_h5ad(served / "output" / "predictions.h5ad"), anndata.read_h5ad(local / "output" / "predictions.h5ad")
    assert list(ours.obs_names) == list(theirs.obs_names)
    for key in ("prediction", "prediction_control"):
        assert ours.layers[key].tobytes() == theirs.layers[key].tobytes(), key


def test_multi_stage_job_times_out_through_the_service_and_run_resume_finishes_it(tmp_path):
    served, local = _copy(tmp_path / "served", "dpam"), _copy(tmp_path / "local", "dpam")
    assert run_tensorfleet("run", local / "dpam.yaml").returncode == 0
    with running_coordinator(tmp_path / "state", "--model-root", str(tmp_path)) as coordinator, coordinator.client() as client:
        result = run_tensorfleet("submit", served / "dpam.yaml", "--coordinator", coordinator.address, "--wait",
                                 "--timeout", "0.5")
        assert result.returncode != 0
        (job,) = client.jobs()
        assert job_state(job) == "FAILED" and "timed out" in job.error, job.error
    # the service's job folder is an ordinary one: the CLI continues it
    resumed = run_tensorfleet("run", served / "dpam.yaml", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    ours = pq.read_table(served / "output" / "domass.parquet").column("probabilities").to_pylist()
    theirs = pq.read_table(local / "output" / "domass.parquet").column("probabilities").to_pylist()
    assert np.array_equal(np.array(ours), np.array(theirs))
    with sqlite3.connect(served / "output" / "domass.parquet.tfjob" / "stages" / "01-domass" / "manifest.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM chunks WHERE done = 0").fetchone()[0] == 0


def test_cancel_stops_a_multi_stage_job_at_once_and_keeps_its_chunks(tmp_path):
    root = _copy(tmp_path, "dpam")
    spec = (root / "dpam.yaml").read_text().replace("chunk_rows: 64", "chunk_rows: 8")
    spec = spec.replace("batch_rows: 64", "batch_rows: 4").replace("batch_rows: 128", "batch_rows: 4")
    (root / "dpam.yaml").write_text(spec)
    with running_coordinator(tmp_path / "state", "--model-root", str(tmp_path)) as coordinator, coordinator.client() as client:
        job_id = client.submit(root / "dpam.yaml").job_id
        deadline = time.monotonic() + 120
        while client.get(job_id).chunks_done < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        engine = coordinator.engine_pid(job_id)
        client.cancel(job_id)
        done = client.wait(job_id)
        assert job_state(done) == "CANCELLED", done.error
        assert pid_gone(engine)
    report = json.loads(run_tensorfleet("status", root / "output" / "domass.parquet.tfjob", "--json").stdout)
    # stopped where it was: the stages' threads did not run on to the end after the cancel
    assert 2 <= report["total"]["chunks_done"] < report["total"]["chunks"], report["total"]
    resumed = run_tensorfleet("run", root / "dpam.yaml", "--resume")
    assert resumed.returncode == 0, resumed.stderr
