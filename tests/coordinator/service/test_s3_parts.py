"""Part files in object storage (`output.parts`), for real: a moto S3 server on loopback.

`tensorfleet run` is killed with SIGKILL mid-job; the committed chunks' parts are objects in
the bucket (none in the local job folder), an object planted for an uncommitted chunk is
ignored and overwritten, and `--resume` recomputes no committed chunk and gives the output of
a plain local run.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess

import pytest

from tensorfleet.coordinator.io.parts import MAGIC
from tests.coordinator.helpers import (
    REPO_ROOT,
    chunks_done,
    make_fasta,
    run_tensorfleet,
    tensorfleet_command,
    wait_for,
    write_job,
)

from .helpers import assert_same_output, pid_gone
from .test_s3 import BUCKET, s3  # noqa: F401  (the moto server fixture)

pytest.importorskip("s3fs")


def test_parts_in_s3_survive_sigkill_and_resume_equals_a_local_run(tmp_path, s3, slow_servers, servers):  # noqa: F811
    fs, env = s3
    make_fasta(tmp_path / "in.fasta", 1200)
    settings = {"chunking": {"chunk_rows": 32, "batch_rows": 8}, "policy": {"window": 2}}
    local = write_job(
        tmp_path / "local.yaml", input={"path": "in.fasta"}, model={"name": "embed", "servers": [s.address for s in servers]},
        output={"path": "reference.h5"}, **settings,
    )
    assert run_tensorfleet("run", local).returncode == 0
    prefix = f"{BUCKET}/jobs/one/parts"
    job = write_job(
        tmp_path / "s3.yaml", input={"path": "in.fasta"},
        model={"name": "embed", "servers": [s.address for s in slow_servers]},
        output={"path": "out.h5", "parts": f"s3://{prefix}"}, **settings,
    )
    job_dir = tmp_path / "job"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    first = subprocess.Popen(
        tensorfleet_command("run", str(job), "--job-dir", str(job_dir)), env=full_env, cwd=REPO_ROOT,
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: chunks_done(job_dir) >= 3 or first.poll() is not None, what="three committed chunks")
        assert first.poll() is None, (tmp_path / "first.log").read_text()
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
        log.close()
    assert pid_gone(first.pid)
    with sqlite3.connect(job_dir / "manifest.sqlite") as db:
        committed = dict(db.execute("SELECT idx, part FROM chunks WHERE done = 1").fetchall())
        pending = [row[0] for row in db.execute("SELECT idx FROM chunks WHERE done = 0 ORDER BY idx")]
    assert len(committed) >= 3 and pending
    fs.invalidate_cache()
    for index, part in committed.items():
        assert part == f"s3://{prefix}/chunk-{index:07d}.part"
        assert fs.cat_file(part[len("s3://"):])[: len(MAGIC)] == MAGIC
    assert not (job_dir / "parts").exists()  # no local part files
    assert not (tmp_path / "out.h5").exists()
    planted = f"{prefix}/chunk-{pending[-1]:07d}.part"
    fs.pipe_file(planted, b"an object with no manifest row: never read, overwritten")

    resumed = run_tensorfleet("run", str(job), "--job-dir", str(job_dir), "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    with sqlite3.connect(job_dir / "manifest.sqlite") as db:
        leases = dict(db.execute("SELECT chunk, COUNT(*) FROM leases GROUP BY chunk").fetchall())
        parts = dict(db.execute("SELECT idx, part FROM chunks WHERE done = 1").fetchall())
    assert all(leases[index] == 1 for index in committed)  # committed chunks were not computed again
    assert {index: parts[index] for index in committed} == committed
    fs.invalidate_cache()
    assert sorted(fs.ls(prefix, detail=False)) == sorted(part[len("s3://"):] for part in parts.values())
    assert fs.cat_file(planted)[: len(MAGIC)] == MAGIC
    assert_same_output(tmp_path / "out.h5", tmp_path / "reference.h5")
