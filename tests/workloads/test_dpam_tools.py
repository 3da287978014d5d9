"""A DPAM-shaped job through `tensorfleet run`: a tool stage (a script standing in for Foldseek: a
folder of structures in, one TSV out), a fan-out model stage (protein -> 1-4 domains) and a model
stage over the domains, with every stage's output kept (tests/workloads/dpam_tools.py builds it).

Checked against the same rules computed in this process; resumed after kill -9 with an output
equal to an uninterrupted run's, column by column, byte for byte; a protein the tool reports
nothing for fails alone, in the search stage's own table.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.coordinator.helpers import run_tensorfleet

from .dpam_tools import build, expected

PROTEINS = 24


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run: (root, its result, the job file)."""
    root = tmp_path_factory.mktemp("dpam-tools")
    job, _ = build(root, proteins=PROTEINS)
    done = run_tensorfleet("run", job)
    return root, done, job


def raw(column: pa.ChunkedArray) -> object:
    """A column's values as bytes (numbers, NaN for failed rows included) or as a list (text)."""
    values = column.combine_chunks()
    shape = []
    while pa.types.is_fixed_size_list(values.type):
        shape.append(values.type.list_size)
        values = values.flatten()
    if pa.types.is_floating(values.type) or pa.types.is_integer(values.type):
        return shape, values.to_numpy(zero_copy_only=False).tobytes()
    return values.to_pylist()


def unfinished(stages) -> bool:
    """Some stage has chunks left (or has not planned yet)."""
    for name in ("00-search", "01-parse", "02-domass"):
        path = stages / name / "manifest.sqlite"
        if not path.exists():
            return True
        with sqlite3.connect(path) as db:
            done, total = db.execute("SELECT COALESCE(SUM(done), 0), COUNT(*) FROM chunks").fetchone()
        if not total or done < total:
            return True
    return False


def test_tool_fan_out_and_model_stages_run_end_to_end_and_keep_every_stage(finished):
    root, done, _ = finished
    want = expected(root)
    # one protein failed in the tool stage (no hit): the job says so, exit 1
    assert done.returncode == 1, done.stderr
    assert "1 row(s) failed up to stage parse (a fan-out)" in done.stdout, done.stdout

    final = pq.read_table(root / "out" / "dpam.parquet")
    assert final.column("id").to_pylist() == want["children"]  # parent order, then k
    assert all(final.column("ok").to_pylist())
    served = np.stack(final.column("probabilities").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(served, want["probabilities"], rtol=0, atol=1e-6)
    counts = [child.split(":")[0] for child in want["children"]]
    assert {counts.count(p) for p in set(counts)} <= {1, 2, 3, 4} and len(set(counts)) == PROTEINS - 1

    search = pq.read_table(root / "out" / "dpam.search.parquet")
    assert search.column("id").to_pylist() == want["proteins"]
    ok = search.column("ok").to_pylist()
    assert ok == [p != "P0007" for p in want["proteins"]]
    error = search.column("error").to_pylist()[7]
    assert error.startswith("NOT_FOUND") and "hits.tsv has no result for id 'P0007'" in error, error
    hits = np.stack(search.column("hit").to_numpy(zero_copy_only=False))
    for row, protein in enumerate(want["proteins"]):
        if protein in want["hits"]:
            np.testing.assert_array_equal(hits[row], want["hits"][protein])

    parse = pq.read_table(root / "out" / "dpam.parse.parquet")
    assert parse.column("id").to_pylist() == want["proteins"]
    n_domains = parse.column("n_domains").to_pylist()
    domains = parse.column("domains").to_pylist()
    flat = [np.asarray(domains[row][:n], np.float32) for row, n in enumerate(n_domains) if parse.column("ok")[row].as_py()]
    np.testing.assert_array_equal(np.concatenate(flat), want["features"])
    assert pq.read_table(root / "out" / "dpam.domass.parquet").column("id").to_pylist() == want["children"]

    status = run_tensorfleet("status", root / "out" / "dpam.parquet.tfjob")
    assert "stage 1 search (tool fake_foldseek): done, rows 24/24" in status.stdout, status.stdout
    assert "rows failed 1" in status.stdout


def test_killed_with_sigkill_resumes_to_the_same_output_byte_for_byte(finished, tmp_path):
    root, _, _ = finished
    job, _ = build(tmp_path, proteins=PROTEINS)
    # kill -9 when the 4th part file is durable but not yet committed
    killed = run_tensorfleet("run", job, env={"TENSORFLEET_CRASH_AT": "part_renamed:4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stages = tmp_path / "out" / "dpam.parquet.tfjob" / "stages"
    assert unfinished(stages), "the kill should land mid-job"
    resumed = run_tensorfleet("run", job)
    assert resumed.returncode == 1, resumed.stderr
    for name in ("dpam.parquet", "dpam.search.parquet", "dpam.parse.parquet", "dpam.domass.parquet"):
        a, b = pq.read_table(root / "out" / name), pq.read_table(tmp_path / "out" / name)
        assert a.schema.remove_metadata() == b.schema.remove_metadata(), name
        for column in a.column_names:  # the values, byte for byte (provenance names other servers)
            assert raw(a.column(column)) == raw(b.column(column)), (name, column)
    # a third run computes nothing
    again = run_tensorfleet("run", job)
    assert "nothing computed" in again.stdout, again.stdout


def test_dry_run_shows_the_tool_and_a_missing_tool_fails_before_anything_runs(finished, tmp_path):
    root, _, job = finished
    plan = run_tensorfleet("run", job, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "stage 1 search: tool " in plan.stdout and "fake_foldseek on this host (2 chunk(s) at once" in plan.stdout
    assert "writes: files of ['structure']; reads: tsv hits.tsv by query" in plan.stdout
    assert "rows: the entries of stage parse's domains (known once it has run)" in plan.stdout
    assert "stage output: " in plan.stdout and "dpam.search.parquet" in plan.stdout

    copy, tool = build(tmp_path / "gone", proteins=4)
    os.chmod(tool, 0o644)
    refused = run_tensorfleet("run", copy)
    assert refused.returncode == 2
    assert "stage search: cannot run the tool" in refused.stderr and "not executable" in refused.stderr
    assert not (tmp_path / "gone" / "out" / "dpam.parquet.tfjob").exists(), "no job folder, no server, nothing written"
    shutil.rmtree(tmp_path / "gone")


def test_slurm_dry_run_says_where_the_tool_runs(finished):
    _, _, job = finished
    script = run_tensorfleet("slurm", job, "--gpus", "1", "--cpu", "--dry-run")
    assert script.returncode == 0, script.stderr
    assert "# Tool stage search runs in this coordinator step, on the batch host" in script.stdout


def test_a_pipeline_with_a_tool_stage_refuses_shard_with_exit_2_and_starts_nothing(tmp_path):
    """Its later stages' rows exist only once the tool and the fan-out ran, so no plan slices them."""
    job, _ = build(tmp_path / "sharded", proteins=4)
    refused = run_tensorfleet("run", job, "--shard", "0/2")
    assert refused.returncode == 2, refused.stderr
    assert "cannot be sharded" in refused.stderr and "without --shard" in refused.stderr
    servers = list((tmp_path / "sharded" / "out").rglob("server*.log"))
    assert not servers, f"no server starts for a refused shard: {servers}"
