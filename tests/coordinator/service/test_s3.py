"""Object storage for real: an S3 API on loopback (moto's server mode), input and output in a bucket.

The coordinator service is killed with SIGKILL mid-job and restarted: the job resumes from
its local manifest and the uploaded output equals `tensorfleet run` on local files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tensorfleet.client.coordinator_client import job_state
from tests.coordinator.helpers import chunks_done, make_fasta, run_tensorfleet, wait_for, write_job

from .helpers import assert_same_output, pid_gone, running_coordinator, start_coordinator

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "tensorfleet-test"


@pytest.fixture
def s3(tmp_path):
    """A moto S3 server on 127.0.0.1, and the environment that points S3 clients at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    try:
        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                fs.mkdir(BUCKET)
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield fs, env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def test_s3_job_survives_sigkill_of_the_service_and_equals_a_local_run(tmp_path, s3, slow_servers, servers):
    fs, env = s3
    make_fasta(tmp_path / "in.fasta", 1200)
    fs.put(str(tmp_path / "in.fasta"), f"{BUCKET}/inputs/in.fasta")
    settings = {"chunking": {"chunk_rows": 32, "batch_rows": 8}, "policy": {"window": 2}}
    local = write_job(
        tmp_path / "local.yaml", input={"path": "in.fasta"}, model={"name": "embed", "servers": [s.address for s in servers]},
        output={"path": "reference.h5"}, **settings,
    )
    assert run_tensorfleet("run", local).returncode == 0
    job = write_job(
        tmp_path / "s3.yaml", input={"path": f"s3://{BUCKET}/inputs/in.fasta"},
        model={"name": "embed", "servers": [s.address for s in slow_servers]},
        output={"path": f"s3://{BUCKET}/results/out.h5"}, **settings,
    )
    state = tmp_path / "state"
    coordinator = start_coordinator(state, "--allow-url-prefix", f"s3://{BUCKET}/", env=env)
    try:
        with coordinator.client() as client:
            job_id = client.submit(job).job_id
            job_dir = Path(client.get(job_id).job_dir)
        wait_for(lambda: chunks_done(job_dir) >= 3, what="three committed chunks")
        engine = coordinator.engine_pid(job_id)
        coordinator.stop(signal.SIGKILL)
        wait_for(lambda: pid_gone(engine), timeout=60, what="the engine to stop with the service")
        with sqlite3.connect(job_dir / "manifest.sqlite") as db:
            before = {row[0] for row in db.execute("SELECT idx FROM chunks WHERE done = 1")}
    finally:
        coordinator.stop(signal.SIGKILL)
    assert not fs.exists(f"{BUCKET}/results/out.h5")
    assert str(job_dir).startswith(str(state))  # the manifest is on local disk, in the state folder
    with running_coordinator(state, "--allow-url-prefix", f"s3://{BUCKET}/", env=env) as restarted, restarted.client() as client:
        done = client.wait(job_id)
        assert (job_state(done), done.exit_code) == ("SUCCEEDED", 0), done.error
        assert done.output == f"s3://{BUCKET}/results/out.h5"
    with sqlite3.connect(job_dir / "manifest.sqlite") as db:
        leases = dict(db.execute("SELECT chunk, COUNT(*) FROM leases GROUP BY chunk").fetchall())
    assert all(leases[chunk] == 1 for chunk in before)
    fs.invalidate_cache()
    fs.get(f"{BUCKET}/results/out.h5", str(tmp_path / "downloaded.h5"))
    assert_same_output(tmp_path / "downloaded.h5", tmp_path / "reference.h5")
    assert yaml.safe_load(job.read_text())["output"]["path"].startswith("s3://")
