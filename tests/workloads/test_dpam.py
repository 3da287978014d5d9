"""Workload 3 (DPAM): a torch stage and a TensorFlow DOMASS stage in one job, one fleet.

The output is compared with the same two models run in this process on the same rows:
the torch MLP through the example's model class, DOMASS through a tf.compat.v1 session on
the same checkpoint. Tolerance: 1e-5 absolute (float32, the same kernels, batch sizes differ).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from .helpers import REPO_ROOT, run_tensorfleet, write_yaml

tf = pytest.importorskip("tensorflow")
sys.path.insert(0, str(REPO_ROOT))
from examples.dpam import build  # noqa: E402
from examples.protein.inprocess import load_python_model  # noqa: E402

ROWS = 150


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpam")
    build.build_features(root / "models")
    build.build_domass(root / "models")
    build.build_data(root / "domains.parquet", rows=ROWS)
    job = write_yaml(root / "dpam.yaml", {
        "name": "dpam",
        "input": {"path": "domains.parquet", "ids": "domain"},
        "stages": [
            {"name": "features", "model": {"name": "dpam_features", "local": {"repository": "models"}},
             "tensors": {"hits": "hits"}, "batch_rows": 16},
            {"name": "domass", "model": {"name": "domass", "local": {"repository": "models"}},
             "tensors": {"features": "features"}, "batch_rows": 32},
        ],
        "output": {"path": "out/domass.parquet"},
        "chunking": {"chunk_rows": 30},
    })
    return root, job


def in_process(root) -> np.ndarray:
    hits = np.stack(pq.read_table(root / "domains.parquet").column("hits").to_numpy(zero_copy_only=False))
    features = load_python_model(root / "models" / "dpam_features").predict({"hits": hits.astype(np.float32)})["features"]
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as session:
        v1.train.import_meta_graph(str(root / "models" / "domass" / "model.ckpt.meta")).restore(
            session, str(root / "models" / "domass" / "model.ckpt")
        )
        return session.run("output:0", {"input:0": features})


def leases(stage_dir) -> dict[int, int]:
    with sqlite3.connect(stage_dir / "manifest.sqlite") as db:
        return dict(db.execute("SELECT chunk, COUNT(*) FROM leases GROUP BY chunk").fetchall())


def test_two_stages_tf_and_torch_match_in_process_and_resume_skips_done_work(example):
    root, job = example
    done = run_tensorfleet("run", job)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(root / "out" / "domass.parquet")
    assert table.column("id").to_pylist() == [f"AF-P{i:05d}-D{i % 3 + 1}" for i in range(ROWS)]
    assert all(table.column("ok").to_pylist())
    served = np.stack(table.column("probabilities").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(served, in_process(root), atol=1e-5)

    job_dir = root / "out" / "domass.parquet.tfjob"
    stage1, stage2 = job_dir / "stages" / "00-features", job_dir / "stages" / "01-domass"
    status = run_tensorfleet("status", job_dir)
    assert "stage 1 features (dpam_features): done, rows 150/150" in status.stdout, status.stdout
    assert "stage 2 domass (domass): done, rows 150/150" in status.stdout
    assert "total: done, rows 300/300" in status.stdout
    report = json.loads(run_tensorfleet("status", job_dir, "--json").stdout)
    assert report["kind"] == "multi-stage"
    assert [s["chunks_done"] for s in report["parts"]] == [5, 5]

    # Stage 1 lost its last chunk, stage 2 lost everything: a resume redoes exactly those.
    before = leases(stage1)
    with sqlite3.connect(stage1 / "manifest.sqlite") as db:
        db.execute("UPDATE chunks SET done = 0, part = NULL WHERE idx = 4")
    (root / "out" / "domass.parquet").unlink()
    shutil.rmtree(stage2)
    again = run_tensorfleet("run", job, "--resume")
    assert again.returncode == 0, again.stderr
    after = leases(stage1)
    assert {k: after[k] - before.get(k, 0) for k in after} == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1}
    resumed = np.stack(pq.read_table(root / "out" / "domass.parquet").column("probabilities").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(resumed, served)

    # Both stages finished: a resume starts no server and computes nothing (a manifest read).
    before = (leases(stage1), leases(stage2))
    for stage in (stage1, stage2):
        shutil.rmtree(stage / "servers")  # where a local fleet writes each server's log and port
    output_stat = (root / "out" / "domass.parquet").stat().st_mtime_ns
    third = run_tensorfleet("run", job, "--resume")
    assert third.returncode == 0, third.stderr
    assert (leases(stage1), leases(stage2)) == before
    assert not (stage1 / "servers").exists() and not (stage2 / "servers").exists()
    assert (root / "out" / "domass.parquet").stat().st_mtime_ns == output_stat  # not even merged again


def test_dry_run_lists_both_stages_and_writes_nothing(example):
    root, job = example
    out = run_tensorfleet("run", job, "--dry-run", "--job-dir", root / "dry")
    assert out.returncode == 0, out.stderr
    assert "stage 1 features: model dpam_features" in out.stdout
    assert "stage 2 domass: model domass" in out.stdout and "probabilities FP32[2]" in out.stdout
    assert not (root / "dry").exists()
