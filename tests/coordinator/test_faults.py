"""Faults: a server killed mid-job, the coordinator killed mid-job, returning servers, changed inputs."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np

from tests.serving import launch_server

from .helpers import (
    MODELS,
    chunks_done,
    committed_rows,
    local_model,
    make_fasta,
    run_tensorfleet,
    start_tensorfleet,
    wait_for,
    write_job,
)


def _with_marker(path: Path, row: int, marker: str) -> None:
    """Put `marker` at the start of record `row`'s sequence (the test embedder reacts to it)."""
    lines = path.read_text().splitlines()
    header = lines.index(f">seq{row} test record {row}")
    lines[header + 1] = marker + lines[header + 1]
    path.write_text("\n".join(lines) + "\n")


def _job_with_a_bad_row(tmp_path: Path, rows: int, seed: int, bad_row: int, marker: str, **options) -> tuple:
    """(records, job file): FASTA rows, one of them marked for the test embedder, on one local server."""
    records = make_fasta(tmp_path / "in.fasta", rows, seed=seed)
    _with_marker(tmp_path / "in.fasta", bad_row, marker)
    job = write_job(tmp_path / "job.yaml", input={"path": "in.fasta"}, model=local_model("embed"),
                    output={"path": "out.h5"}, **options)
    return records, job


def _assert_computed_as_in_process(embeddings, records, rows) -> None:
    """These rows of the output equal the test embedder run in this process on them."""
    from .test_run import load_test_model

    sequences = np.array([records[row][1].encode() for row in rows], dtype=object)
    expected = load_test_model("embed").predict({"sequence": sequences})["embedding"]
    np.testing.assert_allclose(embeddings[rows], expected, rtol=1e-5, atol=1e-6)


def read_output(path):
    with h5py.File(path) as f:
        return [v.decode() for v in f["ids"][:]], f["embedding"][:], f["ok"][:]


def fasta_job(tmp_path, name: str, model: dict, rows: int = 600, **chunking) -> tuple:
    """A FASTA job in its own folder: rows of 8-row requests in 32-row chunks."""
    folder = tmp_path / name
    folder.mkdir()
    records = make_fasta(folder / "in.fasta", rows)
    job = write_job(
        folder / "job.yaml", input={"path": "in.fasta"}, model=model, output={"path": "out.h5"},
        chunking={"chunk_rows": 32, "batch_rows": 8, **chunking}, policy={"window": 2, "server_wait_s": 60},
    )
    return folder, job, records


def test_server_killed_mid_job_output_is_bitwise_identical_and_a_returning_server_is_used(tmp_path, servers):
    reference_dir, reference_job, records = fasta_job(
        tmp_path, "reference", {"name": "embed", "servers": [s.address for s in servers]}, rows=1000
    )
    assert run_tensorfleet("run", reference_job).returncode == 0
    slow = {"TF_TEST_DELAY_MS": "60"}
    fleet = [launch_server(MODELS, env=slow) for _ in range(3)]
    try:
        folder, job, _ = fasta_job(
            tmp_path, "faulty", {"name": "embed", "servers": [s.address for s in fleet]}, rows=1000
        )
        coordinator = start_tensorfleet("run", job, log=folder / "coordinator.log")
        job_dir = folder / "out.h5.tfjob"
        wait_for(lambda: chunks_done(job_dir) >= 2, what="two committed chunks")
        victim = fleet[0]
        victim.stop(signal.SIGKILL)
        total = 1000 // 32 + 1
        assert chunks_done(job_dir) < total, "the job finished before the kill; make it longer"

        def victim_down() -> bool:
            status = json.loads((job_dir / "status.json").read_text())
            return any(s["address"] == victim.address and not s["alive"] for s in status.get("servers", []))

        wait_for(victim_down, what="the coordinator to notice the dead server")
        # Now take the others down too: only the returning server can finish the job.
        for server in fleet[1:]:
            server.stop(signal.SIGKILL)
        assert chunks_done(job_dir) < total, "the job finished before the others were killed; make it longer"
        revived = launch_server(MODELS, "--port", str(victim.port), env=slow)
        fleet.append(revived)
        revived_at = time.time()
        assert coordinator.wait(240) == 0, (folder / "coordinator.log").read_text()
    finally:
        for server in fleet:
            server.stop(signal.SIGKILL)
    ids, embeddings, ok = read_output(folder / "out.h5")
    ref_ids, ref_embeddings, _ = read_output(reference_dir / "out.h5")
    assert ids == ref_ids == [name for name, _ in records]
    assert len(set(ids)) == len(ids) and ok.all()
    assert embeddings.tobytes() == ref_embeddings.tobytes()
    import sqlite3

    with sqlite3.connect(job_dir / "manifest.sqlite") as db:
        leased_twice = db.execute("SELECT COUNT(*) FROM (SELECT chunk FROM leases GROUP BY chunk HAVING COUNT(*) > 1)").fetchone()[0]
        by_revived = db.execute(
            "SELECT COUNT(*) FROM chunks WHERE server = ? AND committed_at > ?", (victim.address, revived_at)
        ).fetchone()[0]
    assert leased_twice >= 1, "the killed server's chunks should have been handed out again"
    assert by_revived >= 1, "the server that came back should have been used again"


def test_coordinator_killed_then_resume_is_bitwise_identical_and_skips_committed_chunks(tmp_path, servers):
    reference_dir, reference_job, records = fasta_job(
        tmp_path, "reference", {"name": "embed", "servers": [s.address for s in servers]}, rows=500
    )
    assert run_tensorfleet("run", reference_job).returncode == 0
    folder, job, _ = fasta_job(tmp_path, "killed", local_model("embed", count=2), rows=500)
    job_dir = folder / "out.h5.tfjob"
    first_log, second_log = folder / "rows-first.log", folder / "rows-second.log"
    coordinator = start_tensorfleet(
        "run", job, env={"TF_TEST_DELAY_MS": "60", "TF_TEST_ROW_LOG": str(first_log)}, log=folder / "first.log"
    )
    wait_for(lambda: chunks_done(job_dir) >= 4, what="four committed chunks")
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait(30)
    total = 500 // 32 + 1
    before = committed_rows(job_dir)
    assert 0 < len(before) < 500, "the kill should land mid-job"
    pids = [entry["pid"] for entry in json.loads((job_dir / "servers" / "servers.json").read_text())]

    def servers_gone() -> bool:  # they follow their coordinator (parent-death signal)
        return not any(os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid) for pid in pids)

    wait_for(servers_gone, what="the orphaned servers to exit")
    status = run_tensorfleet("status", job_dir)
    assert status.returncode == 0 and "state: stopped" in status.stdout and "again to continue" in status.stdout
    resumed = run_tensorfleet("run", job, env={"TF_TEST_ROW_LOG": str(second_log)})  # the same command continues it
    assert resumed.returncode == 0, resumed.stderr
    ids, embeddings, ok = read_output(folder / "out.h5")
    ref_ids, ref_embeddings, _ = read_output(reference_dir / "out.h5")
    assert ids == ref_ids and ok.all()
    assert embeddings.tobytes() == ref_embeddings.tobytes()
    sequence_row = {sequence: row for row, (_, sequence) in enumerate(records)}
    resent = {sequence_row[line] for line in second_log.read_text().split()}
    assert resent, "the resume computed nothing"
    assert not (resent & before), f"{len(resent & before)} committed rows were sent again"
    assert resent | before == set(range(500))
    assert chunks_done(job_dir) == total


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next((line for line in handle if line.startswith("State:")), "")
    except FileNotFoundError:
        return "zombie"


def test_changed_input_is_refused_and_restart_starts_over(tmp_path, servers):
    folder, job, _ = fasta_job(tmp_path, "changed", {"name": "embed", "servers": [s.address for s in servers]}, rows=100)
    assert run_tensorfleet("run", job).returncode == 0
    make_fasta(folder / "in.fasta", 100, seed=2)
    refused = run_tensorfleet("run", job, "--resume")
    assert refused.returncode == 2
    assert "in.fasta changed since this job began" in refused.stderr and "--restart" in refused.stderr
    restarted = run_tensorfleet("run", job, "--restart")
    assert restarted.returncode == 0, restarted.stderr
    ids, embeddings, _ = read_output(folder / "out.h5")
    assert len(ids) == 100 and np.isfinite(embeddings).all()


def test_stalled_server_loses_its_leases_and_the_job_completes_identically(tmp_path, servers):
    reference_dir, reference_job, _ = fasta_job(
        tmp_path, "reference", {"name": "embed", "servers": [s.address for s in servers]}, rows=400
    )
    assert run_tensorfleet("run", reference_job).returncode == 0
    slow = {"TF_TEST_DELAY_MS": "40"}
    fleet = [launch_server(MODELS, env=slow) for _ in range(2)]
    try:
        folder = tmp_path / "stalled"
        folder.mkdir()
        (folder / "in.fasta").write_bytes((reference_dir / "in.fasta").read_bytes())
        job = write_job(
            folder / "job.yaml", input={"path": "in.fasta"}, model={"name": "embed", "servers": [s.address for s in fleet]},
            output={"path": "out.h5"}, chunking={"chunk_rows": 32, "batch_rows": 8},
            policy={"window": 2, "request_timeout_s": 2},
        )
        coordinator = start_tensorfleet("run", job, log=folder / "coordinator.log")
        job_dir = folder / "out.h5.tfjob"
        wait_for(lambda: chunks_done(job_dir) >= 1, what="a committed chunk")
        os.kill(fleet[0].pid, signal.SIGSTOP)  # alive but silent: only the request timeout can tell
        assert chunks_done(job_dir) < 400 // 32 + 1, "the job finished before the stall"
        assert coordinator.wait(240) == 0, (folder / "coordinator.log").read_text()
    finally:
        for server in fleet:
            server.stop(signal.SIGKILL)
    ids, embeddings, ok = read_output(folder / "out.h5")
    ref_ids, ref_embeddings, _ = read_output(reference_dir / "out.h5")
    assert ids == ref_ids and ok.all()
    assert embeddings.tobytes() == ref_embeddings.tobytes()
    status = json.loads((job_dir / "status.json").read_text())
    stalled = next(s for s in status["servers"] if s["address"] == fleet[0].address)
    assert not stalled["alive"] and stalled["last_error"]


def test_a_row_that_kills_its_server_fails_alone_and_the_local_server_is_started_again(tmp_path):
    """One local server and a row that kills it (as a segfault or the OOM killer would). The
    server is started again on its port after each death; after policy.retries losses its chunk
    goes one request at a time, and the request in flight at a death is halved down to the row,
    which alone fails. Before: the first crash left the job with no server (exit 2 after
    server_wait_s), every --resume crashed the same way, and at best the whole chunk failed."""
    marker, bad_row = "WCRASHCRASHW", 40
    records, job = _job_with_a_bad_row(tmp_path, 64, 4, bad_row, marker, chunking={"chunk_rows": 16, "batch_rows": 16},
                                       policy={"retries": 2, "server_wait_s": 60})
    result = run_tensorfleet("run", job, env={"TF_TEST_CRASH_ON": marker}, timeout=300)
    assert result.returncode == 1, result.stderr
    # 3 losses of the chunk (retries 2), then its 16-row request halved at each death: 16, 8, 4, 2, 1
    assert "local servers died or stalled and were started again 8 time(s)" in result.stdout, result.stdout
    folder = tmp_path / "out.h5.tfjob" / "servers"
    log = (folder / "server-0.log").read_text()  # one log, appended
    port = json.loads((folder / "servers.json").read_text())[0]["port"]
    assert log.count(f"SERVING on port {port} ") == 9, log  # started, then again after each death
    with h5py.File(tmp_path / "out.h5") as f:
        ok = f["ok"][:]
        assert set(np.nonzero(~ok)[0].tolist()) == {bad_row}
        assert [v.decode() for v in f["errors/id"][:]] == [f"seq{bad_row}"]
        assert "died with this row alone in flight" in f["errors/message"][0].decode()
        embeddings = f["embedding"][:]
    assert np.isnan(embeddings[bad_row]).all()
    _assert_computed_as_in_process(embeddings, records, [row for row in range(64) if row != bad_row])
    for entry in json.loads((folder / "servers.json").read_text()):
        status = Path(f"/proc/{entry['pid']}/status")
        assert not status.exists() or "zombie" in status.read_text()


def test_a_row_that_sets_off_a_device_side_assert_fails_alone(tmp_path):
    """A row that breaks the device (CUDA's device-side assert: an index out of range) makes its
    server answer UNAVAILABLE and exit, again at each restart: it is isolated like a row that
    kills the process, and fails alone."""
    bad_row = 21
    records, job = _job_with_a_bad_row(tmp_path, 32, 9, bad_row, "WASSERTW",
                                       chunking={"chunk_rows": 8, "batch_rows": 4}, policy={"retries": 1})
    result = run_tensorfleet("run", job, env={"TF_TEST_DEVICE_ASSERT_ON": "WASSERTW"}, timeout=300)
    assert result.returncode == 1, result.stderr
    with h5py.File(tmp_path / "out.h5") as f:
        assert set(np.nonzero(~f["ok"][:])[0].tolist()) == {bad_row}
        assert "alone in flight" in f["errors/message"][0].decode()
        embeddings = f["embedding"][:]
    _assert_computed_as_in_process(embeddings, records, [row for row in range(32) if row != bad_row])


def test_a_row_that_hangs_its_local_server_fails_alone(tmp_path):
    """A model stuck on a batch keeps its server alive and its model thread busy for good: each
    stall (policy.request_timeout_s) now kills the local server, whose supervisor starts it
    afresh, so the isolated requests after it run on a free server and the row is found."""
    marker, bad_row = "WHANGHANGW", 9
    records, job = _job_with_a_bad_row(tmp_path, 24, 6, bad_row, marker, chunking={"chunk_rows": 8, "batch_rows": 4},
                                       policy={"retries": 1, "request_timeout_s": 2, "server_wait_s": 60})
    result = run_tensorfleet("run", job, env={"TF_TEST_HANG_ON": marker}, timeout=300)
    assert result.returncode == 1, result.stderr
    # 2 losses of the chunk (retries 1), then its 4-row request halved at each stall: 4, 2, 1
    assert "local servers died or stalled and were started again 5 time(s)" in result.stdout, result.stdout
    with h5py.File(tmp_path / "out.h5") as f:
        ok = f["ok"][:]
        assert set(np.nonzero(~ok)[0].tolist()) == {bad_row}
        assert "alone in flight" in f["errors/message"][0].decode()
        embeddings = f["embedding"][:]
    _assert_computed_as_in_process(embeddings, records, [row for row in range(24) if row != bad_row])
    for entry in json.loads((tmp_path / "out.h5.tfjob" / "servers" / "servers.json").read_text()):
        status = Path(f"/proc/{entry['pid']}/status")
        assert not status.exists() or "zombie" in status.read_text()


def test_a_local_server_whose_device_fails_exits_and_is_started_again_with_no_row_failed(tmp_path):
    """A GPU that fails mid-job (simulated: every batch raises CUDA's illegal-address error from
    then on in that process) used to fail every row sent to it as the rows' fault. Now the server
    answers UNAVAILABLE and exits; its chunks go back to the queue, the supervisor starts it
    afresh, and the output holds every row, as a run without the fault would."""
    records = make_fasta(tmp_path / "in.fasta", 160, seed=8)
    trigger = tmp_path / "fail-now"
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.fasta"}, model=local_model("embed"),
        output={"path": "out.h5"}, chunking={"chunk_rows": 16, "batch_rows": 8},
    )
    env = {"TF_TEST_DEVICE_FAIL_FILE": str(trigger), "TF_TEST_DELAY_MS": "40"}
    coordinator = start_tensorfleet("run", job, env=env, log=tmp_path / "coordinator.log")
    try:
        wait_for(lambda: chunks_done(tmp_path / "out.h5.tfjob") >= 2, what="two committed chunks")
        trigger.write_text("")
        assert coordinator.wait(timeout=240) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
    assert not trigger.exists(), "the device never failed: the fault was not injected"
    output = (tmp_path / "coordinator.log").read_text()
    assert "local servers died or stalled and were started again 1 time(s)" in output, output[-2000:]
    server_log = (tmp_path / "out.h5.tfjob" / "servers" / "server-0.log").read_text()
    assert "the device failed" in server_log and server_log.count("SERVING on port") == 2
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["ok"][:].all()
        embeddings = f["embedding"][:]
    _assert_computed_as_in_process(embeddings, records, list(range(len(records))))


def test_retry_failed_computes_again_only_the_chunks_with_failed_rows(tmp_path):
    """Rows that failed for a passing reason (here: the model failed them while an environment
    variable was set) are computed again by `run --retry-failed`; the chunks with no failure are
    not touched, and the output is the one a clean run gives."""
    records = make_fasta(tmp_path / "in.fasta", 64, seed=10)
    for row in (5, 40):
        _with_marker(tmp_path / "in.fasta", row, "WFAILW")
    records = [(name, ("WFAILW" + seq) if int(name[3:]) in (5, 40) else seq) for name, seq in records]
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.fasta"}, model=local_model("embed"),
        output={"path": "out.h5"}, chunking={"chunk_rows": 16, "batch_rows": 4},
    )
    first = run_tensorfleet("run", job, env={"TF_TEST_FAIL_ON": "WFAILW"})
    assert first.returncode == 1 and "2 of 64 rows failed" in first.stderr, first.stderr
    parts = tmp_path / "out.h5.tfjob" / "parts"
    untouched = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.part")}
    again = run_tensorfleet("run", job, "--retry-failed", env={"TF_TEST_ROW_LOG": str(tmp_path / "rows.log")})
    assert again.returncode == 0, again.stderr
    assert "computing again 2 chunk(s) holding 2 failed row(s)" in again.stderr
    recomputed = (tmp_path / "rows.log").read_text().splitlines()
    assert len(recomputed) == 32  # the two 16-row chunks holding the failed rows, no other
    changed = {name for name, stamp in untouched.items() if (parts / name).stat().st_mtime_ns != stamp}
    assert changed == {"chunk-0000000.part", "chunk-0000002.part"}
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["ok"][:].all() and len(f["errors/row"][:]) == 0
        embeddings = f["embedding"][:]
    _assert_computed_as_in_process(embeddings, records, list(range(len(records))))


def test_retry_failed_in_a_multi_stage_job_computes_the_earlier_stage_first(tmp_path):
    """The failed row's first-stage chunk is computed again even though that stage had finished,
    then the second stage's chunk that carried the failure: the table equals a clean run's."""
    import pyarrow.parquet as pq
    import yaml

    tables = {}
    for name, env in (("clean", {}), ("retried", {"TF_TEST_FAIL_ON": "WFAILW"})):
        folder = tmp_path / name
        folder.mkdir()
        make_fasta(folder / "in.fasta", 80, seed=3)
        _with_marker(folder / "in.fasta", 33, "WFAILW")
        model = {"local": {"repository": str(MODELS)}}
        (folder / "job.yaml").write_text(yaml.safe_dump({
            "name": "two", "input": {"path": "in.fasta"}, "output": {"path": "out.parquet"},
            "stages": [{"name": "embed", "model": {"name": "embed", **model}, "batch_rows": 8},
                       {"name": "head", "model": {"name": "head16", **model}, "tensors": {"x": "embedding"}}],
            "chunking": {"chunk_rows": 16},
        }))
        done = run_tensorfleet("run", folder / "job.yaml", env=env)
        assert done.returncode == (1 if env else 0), done.stderr
        if env:
            again = run_tensorfleet("run", folder / "job.yaml", "--retry-failed")
            assert again.returncode == 0, again.stderr
            assert "00-embed: computing again 1 chunk(s)" in again.stderr and "01-head: computing again" in again.stderr
        tables[name] = pq.read_table(folder / "out.parquet").replace_schema_metadata(None)
    assert all(tables["retried"].column("ok").to_pylist())
    assert tables["retried"].equals(tables["clean"])
