"""The coordinator service for real: a `tensorfleet coordinator serve` process, model servers, gRPC.

Acceptance 1-4 of issue 4: two jobs watched to the end equal `tensorfleet run`; cancel and
resume; SIGKILL of the service and restart without recomputing committed chunks; grpcurl.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tensorfleet.client import ConnectionOptions, InvalidArgument, NotFound, Unauthenticated
from tensorfleet.client.coordinator_client import job_state
from tests.coordinator.helpers import chunks_done, make_fasta, run_tensorfleet, wait_for, write_job

from .helpers import assert_same_output, pid_gone, running_coordinator, start_coordinator


def fasta_job(folder: Path, servers: list[str], rows: int, seed: int = 1, output: str = "out.h5") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_fasta(folder / "in.fasta", rows, seed=seed)
    return write_job(
        folder / f"{Path(output).stem}.yaml", input={"path": "in.fasta"}, model={"name": "embed", "servers": servers},
        output={"path": output}, chunking={"chunk_rows": 32, "batch_rows": 8}, policy={"window": 2},
    )


def reference(job: Path, tmp_path: Path, name: str) -> Path:
    """`tensorfleet run` on the same spec, written elsewhere: the output the service must equal."""
    spec = yaml.safe_load(job.read_text())
    spec["output"]["path"] = str(tmp_path / f"{name}.reference.h5")
    spec["input"]["path"] = str(job.parent / spec["input"]["path"])
    path = tmp_path / f"{name}.reference.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = run_tensorfleet("run", path)
    assert result.returncode == 0, result.stderr
    return Path(spec["output"]["path"])


def test_two_jobs_queue_run_and_equal_tensorfleet_run(tmp_path, servers):
    addresses = [s.address for s in servers]
    first = fasta_job(tmp_path / "a", addresses, 300, seed=1)
    second = fasta_job(tmp_path / "b", addresses, 200, seed=2)
    with running_coordinator(tmp_path / "state") as coordinator, coordinator.client() as client:
        jobs = [client.submit(first), client.submit(second)]
        assert [job_state(job) for job in jobs] == ["QUEUED", "QUEUED"]
        events: dict[str, list] = {}

        def follow(job_id: str) -> None:
            with coordinator.client() as own:
                events[job_id] = list(own.watch(job_id))

        threads = [threading.Thread(target=follow, args=(job.job_id,)) for job in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(240)
        for job in jobs:
            states = [job_state(e) for e in events[job.job_id] if e.kind == "state"]
            assert states[0] == "QUEUED" and states[-1] == "SUCCEEDED" and "RUNNING" in states
            final = client.get(job.job_id)
            assert (final.exit_code, final.rows_done, final.chunks_done) == (0, final.rows, final.chunks)
            assert final.rows in (300, 200)
        listed = client.jobs()
        assert [job.job_id for job in listed] == [job.job_id for job in jobs]
        assert {job.job_id for job in client.jobs(["SUCCEEDED"])} == {job.job_id for job in jobs}
        # One job at a time: the second started after the first finished.
        a, b = (client.get(job.job_id) for job in jobs)
        assert b.started_at >= a.finished_at
    assert_same_output(tmp_path / "a" / "out.h5", reference(first, tmp_path, "a"))
    assert_same_output(tmp_path / "b" / "out.h5", reference(second, tmp_path, "b"))


def test_cancel_keeps_committed_chunks_and_resume_gives_identical_output(tmp_path, slow_servers, servers):
    job = fasta_job(tmp_path / "job", [s.address for s in slow_servers], 1200)
    job_dir = tmp_path / "job" / "out.h5.tfjob"
    with running_coordinator(tmp_path / "state") as coordinator, coordinator.client() as client:
        submitted = client.submit(job)
        wait_for(lambda: chunks_done(job_dir) >= 3, what="three committed chunks")
        client.cancel(submitted.job_id)
        cancelled = client.wait(submitted.job_id)
        assert job_state(cancelled) == "CANCELLED"
        assert "committed chunks are kept" in cancelled.error
        kept = chunks_done(job_dir)
        assert 3 <= kept < cancelled.chunks
        assert not (tmp_path / "job" / "out.h5").exists()
        assert pid_gone(coordinator.engine_pid(submitted.job_id))
        # A cancelled job stays cancelled; resume continues from the manifest.
        client.resume(submitted.job_id)
        done = client.wait(submitted.job_id)
        assert (job_state(done), done.exit_code, done.attempts) == ("SUCCEEDED", 0, 2)
        states = [job_state(e) for e in client.watch(submitted.job_id) if e.kind == "state"]
        assert states == ["QUEUED", "RUNNING", "RUNNING", "CANCELLED", "QUEUED", "RUNNING", "SUCCEEDED"]
        with sqlite3.connect(job_dir / "manifest.sqlite") as db:
            leases = dict(db.execute("SELECT chunk, COUNT(*) FROM leases GROUP BY chunk").fetchall())
        assert sorted(leases) == list(range(done.chunks))
    fast = fasta_job(tmp_path / "ref", [s.address for s in servers], 1200)
    assert_same_output(tmp_path / "job" / "out.h5", reference(fast, tmp_path, "ref"))


def test_sigkill_of_the_service_then_restart_resumes_without_recomputing(tmp_path, slow_servers, servers):
    job = fasta_job(tmp_path / "job", [s.address for s in slow_servers], 1200)
    job_dir = tmp_path / "job" / "out.h5.tfjob"
    state = tmp_path / "state"
    coordinator = start_coordinator(state)
    try:
        with coordinator.client() as client:
            job_id = client.submit(job).job_id
        wait_for(lambda: chunks_done(job_dir) >= 3, what="three committed chunks")
        engine = coordinator.engine_pid(job_id)
        coordinator.stop(signal.SIGKILL)
        # The engine dies with the service (parent-death signal), keeping its committed chunks.
        wait_for(lambda: pid_gone(engine), timeout=60, what="the engine to stop with the service")
        with sqlite3.connect(job_dir / "manifest.sqlite") as db:
            before = {row[0] for row in db.execute("SELECT idx FROM chunks WHERE done = 1")}
        assert before
    finally:
        coordinator.stop(signal.SIGKILL)
    with running_coordinator(state) as restarted, restarted.client() as client:
        assert job_state(client.get(job_id)) in ("QUEUED", "RUNNING")
        done = client.wait(job_id)
        assert (job_state(done), done.exit_code, done.attempts) == ("SUCCEEDED", 0, 2)
        messages = [e.message for e in client.watch(job_id)]
        assert any("coordinator restarted" in m for m in messages)
    with sqlite3.connect(job_dir / "manifest.sqlite") as db:
        leases = dict(db.execute("SELECT chunk, COUNT(*) FROM leases GROUP BY chunk").fetchall())
    # Chunks committed before the kill were leased once: the restart did not compute them again.
    assert all(leases[chunk] == 1 for chunk in before)
    fast = fasta_job(tmp_path / "ref", [s.address for s in servers], 1200)
    assert_same_output(tmp_path / "job" / "out.h5", reference(fast, tmp_path, "ref"))


def test_bad_specs_are_refused_with_the_field_named_and_failures_are_readable(tmp_path, servers):
    with running_coordinator(tmp_path / "state") as coordinator, coordinator.client() as client:
        with pytest.raises(InvalidArgument, match="model"):
            client.submit({"input": {"path": "x.fasta"}, "output": {"path": "o.h5"}}, base_dir=tmp_path)
        with pytest.raises(NotFound):
            client.get("no-such-job")
        missing = write_job(
            tmp_path / "missing.yaml", input={"path": "absent.fasta"},
            model={"name": "embed", "servers": [servers[0].address]}, output={"path": "o.h5"},
        )
        failed = client.wait(client.submit(missing).job_id)
        assert job_state(failed) == "FAILED" and failed.exit_code == 2
        assert "absent.fasta" in failed.error and "does not exist" in failed.error
        slow = fasta_job(tmp_path / "t", [s.address for s in servers], 100)
        timed = client.wait(client.submit(slow, timeout_s=0.01).job_id)
        assert job_state(timed) == "FAILED" and "timed out" in timed.error


def test_token_is_required_except_for_health(tmp_path, servers):
    job = fasta_job(tmp_path / "job", [servers[0].address], 40)
    with running_coordinator(tmp_path / "state", "--token", "s3cret") as coordinator:
        with coordinator.client() as anonymous, pytest.raises(Unauthenticated):
            anonymous.jobs()
        with coordinator.client(options=ConnectionOptions(token="s3cret")) as client:
            done = client.wait(client.submit(job).job_id)
            assert job_state(done) == "SUCCEEDED"


def _grpcurl() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    return str(beside)


def test_grpcurl_lists_the_coordinator_submits_json_and_reads_the_state(tmp_path, servers):
    job = fasta_job(tmp_path / "job", [s.address for s in servers], 100)
    spec = yaml.safe_load(job.read_text())
    with running_coordinator(tmp_path / "state") as coordinator:
        def grpcurl(*args: str) -> str:
            result = subprocess.run(
                [_grpcurl(), "-plaintext", *args], capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, result.stderr
            return result.stdout

        services = grpcurl(coordinator.address, "list").split()
        assert "tensorfleet.v1.Coordinator" in services and "grpc.health.v1.Health" in services
        methods = grpcurl(coordinator.address, "list", "tensorfleet.v1.Coordinator").split()
        assert "tensorfleet.v1.Coordinator.SubmitJob" in methods
        request = json.dumps({"spec": json.dumps(spec), "base_dir": str(job.parent)})
        reply = json.loads(grpcurl("-d", request, coordinator.address, "tensorfleet.v1.Coordinator/SubmitJob"))
        job_id = reply.get("jobId") or reply["job_id"]  # grpcurl versions differ in JSON names
        assert reply["state"] == "QUEUED"
        with coordinator.client() as client:
            client.wait(job_id)

        state = json.loads(grpcurl("-d", json.dumps({"job_id": job_id}), coordinator.address,
                                   "tensorfleet.v1.Coordinator/GetJob"))
        assert state["state"] == "SUCCEEDED"
        assert str(state.get("rowsDone", state.get("rows_done"))) == "100"
    assert (tmp_path / "job" / "out.h5").exists()
