"""Reliability: damaged parts recomputed on resume, kill -9 at named points, a full disk,
one coordinator per job folder, the manifest's journal mode per filesystem."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tensorfleet.coordinator.engine.manifest import Manifest
from tensorfleet.coordinator.io.filesystems import journal_mode_for
from tensorfleet.coordinator.io.joblock import LOCK_NAME, STALE_S, JobLock, JobLocked
from tests.serving import launch_server, running_server

from .helpers import (
    MODELS,
    chunks_done,
    committed_rows,
    make_fasta,
    run_tensorfleet,
    start_tensorfleet,
    wait_for,
)
from .test_faults import fasta_job, read_output


def _reference(tmp_path: Path, servers, rows: int) -> tuple:
    folder, job, records = fasta_job(tmp_path, "reference", {"name": "embed", "servers": [s.address for s in servers]}, rows=rows)
    assert run_tensorfleet("run", job).returncode == 0
    return read_output(folder / "out.h5"), records


def _same_as(reference: tuple, output: Path) -> None:
    ids, embeddings, ok = read_output(output)
    assert ids == reference[0] and ok.all()
    assert embeddings.tobytes() == reference[1].tobytes()


def test_killed_after_a_part_rename_then_damaged_parts_are_recomputed_never_merged(tmp_path, servers):
    reference, records = _reference(tmp_path, servers, 300)
    folder, job, _ = fasta_job(tmp_path, "damaged", {"name": "embed", "servers": [s.address for s in servers]}, rows=300)
    job_dir = folder / "out.h5.tfjob"
    crashed = run_tensorfleet("run", job, env={"TENSORFLEET_CRASH_AT": "part_renamed:4"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    parts = sorted((job_dir / "parts").glob("*.part"))
    assert len(parts) == 4 and chunks_done(job_dir) == 3, "the 4th part is on disk, its manifest row is not"
    committed = sorted(committed_rows(job_dir))
    truncated, flipped = parts[0], parts[1]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    log = folder / "rows.log"
    other = [launch_server(MODELS, env={"TF_TEST_ROW_LOG": str(log)})]
    try:
        resumed = run_tensorfleet("run", job, "--resume", "--servers", other[0].address)
    finally:
        other[0].stop()
    assert resumed.returncode == 0, resumed.stderr
    assert "chunk 0: parts/chunk-0000000.part does not match the checksum" in resumed.stderr
    assert "chunk 1: parts/chunk-0000001.part does not match the checksum" in resumed.stderr
    _same_as(reference, folder / "out.h5")
    row_of = {sequence: row for row, (_, sequence) in enumerate(records)}
    recomputed = {row_of[line] for line in log.read_text().split()}
    assert set(range(64)) <= recomputed, "the two damaged chunks (rows 0-63) were computed again"
    assert not recomputed & set(committed[64:]), "the undamaged committed chunk was computed again"


def test_killed_during_the_merge_leaves_no_output_and_resume_finishes_it(tmp_path, servers):
    reference, _ = _reference(tmp_path, servers, 200)
    folder, job, _ = fasta_job(tmp_path, "merge", {"name": "embed", "servers": [s.address for s in servers]}, rows=200)
    crashed = run_tensorfleet("run", job, env={"TENSORFLEET_CRASH_AT": "merge:3"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert not (folder / "out.h5").exists(), "a merge killed midway must not leave a finished-looking output"
    resumed = run_tensorfleet("run", job, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _same_as(reference, folder / "out.h5")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (needs root and mount rights); unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    point = tmp_path / "small"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_disk_full_stops_with_exit_2_and_resume_finishes_after_space_is_freed(tmp_path, servers, small_tmpfs):
    reference, _ = _reference(tmp_path, servers, 1500)
    folder, job, _ = fasta_job(tmp_path, "full", {"name": "embed", "servers": [s.address for s in servers]}, rows=1500)
    job_dir = small_tmpfs / "job"
    stopped = run_tensorfleet("run", job, "--job-dir", job_dir)
    assert stopped.returncode == 2, stopped.stderr
    assert "no space left" in stopped.stderr and "--resume" in stopped.stderr, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert not list((job_dir / "parts").glob("*.tmp")), "a failed part write leaves no temp file"
    done_before = chunks_done(job_dir)
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
    resumed = run_tensorfleet("run", job, "--job-dir", job_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert done_before > 0
    _same_as(reference, folder / "out.h5")


def test_disk_full_while_planning_stops_with_exit_2_and_resume_finishes(tmp_path, servers, small_tmpfs):
    """Found by bench.chaos: a disk that filled while the plan was written ended in a traceback."""
    reference, _ = _reference(tmp_path, servers, 1500)
    folder, job, _ = fasta_job(tmp_path, "full", {"name": "embed", "servers": [s.address for s in servers]}, rows=1500)
    filler = small_tmpfs / "filler"
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    filler.write_bytes(b"\0" * (free - 12 * 1024))
    stopped = run_tensorfleet("run", job, "--job-dir", small_tmpfs / "job")
    assert stopped.returncode == 2, stopped.stderr
    assert "no space left" in stopped.stderr and "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
    resumed = run_tensorfleet("run", job, "--job-dir", small_tmpfs / "job", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _same_as(reference, folder / "out.h5")


def test_a_second_coordinator_on_a_job_folder_is_refused_and_nothing_is_corrupted(tmp_path, servers):
    reference, _ = _reference(tmp_path, servers, 600)
    fleet = [launch_server(MODELS, env={"TF_TEST_DELAY_MS": "50"})]
    try:
        folder, job, _ = fasta_job(tmp_path, "two", {"name": "embed", "servers": [fleet[0].address]}, rows=600)
        job_dir = folder / "out.h5.tfjob"
        first = start_tensorfleet("run", job, log=folder / "first.log")
        wait_for(lambda: chunks_done(job_dir) >= 1, what="a committed chunk")
        for flag in ("--resume", "--restart"):
            second = run_tensorfleet("run", job, flag)
            assert second.returncode == 2, second.stderr
            assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr, second.stderr
        assert chunks_done(job_dir) < 600 // 32 + 1, "the first finished before the second tried; make it longer"
        assert first.wait(240) == 0, (folder / "first.log").read_text()
    finally:
        fleet[0].stop(signal.SIGKILL)
    _same_as(reference, folder / "out.h5")
    assert (job_dir / LOCK_NAME).read_text() == "", "the lock is released at the end"


def test_lock_from_another_host_is_refused_while_fresh_and_taken_over_once_stale(tmp_path):
    lock_file = tmp_path / LOCK_NAME
    lock_file.write_text(json.dumps({"host": "node17", "pid": 4242, "since": time.time()}))
    with pytest.raises(JobLocked, match="pid 4242 on host node17"):
        JobLock(tmp_path)
    old = time.time() - STALE_S - 5
    os.utime(lock_file, (old, old))
    lock = JobLock(tmp_path)
    assert lock.previous["host"] == "node17"
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    with pytest.raises(JobLocked, match=f"pid {os.getpid()}"):
        JobLock(tmp_path)  # the same host: the kernel lock refuses even a fresh process
    lock.release()
    JobLock(tmp_path).release()


def test_manifest_journal_mode_follows_the_filesystem(tmp_path):
    mounts = "\n".join([
        "/dev/sda1 / ext4 rw 0 0",
        "server:/export /scratch nfs4 rw 0 0",
        "lustre@o2ib:/fs /scratch/lus\\040fs lustre rw 0 0",
        "/dev/sdb1 /scratch/local xfs rw 0 0",
    ])
    assert journal_mode_for(Path("/home/me/job"), mounts) == "WAL"
    assert journal_mode_for(Path("/scratch/me/job"), mounts) == "DELETE"
    assert journal_mode_for(Path("/scratch/lus fs/job"), mounts) == "DELETE"
    assert journal_mode_for(Path("/scratch/local/job"), mounts) == "WAL"
    assert journal_mode_for(Path("/scratch/localx"), mounts) == "DELETE"
    manifest = Manifest(tmp_path / "manifest.sqlite")
    try:
        mode = manifest._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode.upper() == journal_mode_for(tmp_path) == manifest.journal_mode.upper()
    finally:
        manifest.close()


def test_a_worker_that_dies_of_an_unexpected_error_fails_the_job_instead_of_hanging(servers):
    """Found by bench.chaos: a damaged upstream part raised in a worker, and the job hung."""
    import asyncio

    from tensorfleet.coordinator.engine.dispatcher import Dispatcher
    from tensorfleet.coordinator.engine.planner import Chunk
    from tensorfleet.coordinator.io.parts import CorruptPart
    from tensorfleet.coordinator.spec import PolicySpec

    class Unreadable:
        model, version = "embed", ""

        def preamble(self):
            return []

        def ids(self, start, stop):
            return [f"seq{i}" for i in range(start, stop)]

        def cached_request(self, request_id, rows, span=None):
            return None  # nothing kept: every request is read on the reader thread

        def request(self, request_id, rows, span=None):
            raise CorruptPart("parts/chunk-0000000.part is truncated")

    dispatcher = Dispatcher(
        servers=[s.address for s in servers], source=Unreadable(), chunks=[Chunk(0, 0, 8, (0, 8), b"")],
        commit=lambda done: None, policy=PolicySpec(server_wait_s=30),
    )
    with pytest.raises(CorruptPart, match="truncated"):
        asyncio.run(asyncio.wait_for(dispatcher.run(), 30))


def test_a_damaged_part_of_a_finished_stage_is_recomputed_before_the_next_stage_reads_it(tmp_path, servers):
    """Found by bench.chaos: on --resume a finished first stage was skipped unchecked."""
    addresses = [s.address for s in servers]
    outputs = {}
    for name in ("reference", "damaged"):
        folder = tmp_path / name
        folder.mkdir()
        make_fasta(folder / "in.fasta", 200)
        job = folder / "job.yaml"
        job.write_text(yaml.safe_dump({
            "name": "two-stages", "input": {"path": "in.fasta"}, "output": {"path": "out.parquet"},
            "stages": [
                {"name": "embed", "model": {"name": "embed", "servers": addresses}, "batch_rows": 8},
                {"name": "head", "model": {"name": "head16", "servers": addresses}, "tensors": {"x": "embedding"}},
            ],
            "chunking": {"chunk_rows": 32},
        }))
        outputs[name] = (folder, job)
    assert run_tensorfleet("run", outputs["reference"][1]).returncode == 0
    folder, job = outputs["damaged"]
    crashed = run_tensorfleet("run", job, env={"TENSORFLEET_CRASH_AT": "merge:1"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    stages = folder / "out.parquet.tfjob" / "stages"
    first, second = next(stages.glob("00-*")), next(stages.glob("01-*"))
    part = sorted((first / "parts").glob("*.part"))[2]
    part.write_bytes(part.read_bytes()[:-50])
    with sqlite3.connect(first / "manifest.sqlite") as db:
        row = db.execute("SELECT start FROM chunks WHERE idx = 2").fetchone()[0]
    with sqlite3.connect(second / "manifest.sqlite") as db:  # as if killed before the second stage committed it
        index, name = db.execute("SELECT idx, part FROM chunks WHERE start <= ? AND ? < stop", (row, row)).fetchone()
        db.execute("UPDATE chunks SET done = 0, part = NULL, checksum = NULL WHERE idx = ?", (index,))
    (second / name).unlink()
    resumed = run_tensorfleet("run", job, "--resume", timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "chunk 2:" in resumed.stderr and "computing it again" in resumed.stderr
    import pyarrow.parquet as pq

    reference = pq.read_table(outputs["reference"][0] / "out.parquet").replace_schema_metadata(None)
    result = pq.read_table(folder / "out.parquet").replace_schema_metadata(None)
    assert result.equals(reference)


def test_a_server_not_serving_the_model_is_retried_not_fatal(tmp_path):
    """Found by bench.chaos: a server back from a kill answers NOT_SERVING while it loads; the
    probe's ServerLost killed its worker (now: the job)."""
    import asyncio

    from tensorfleet.client import InferenceClient
    from tensorfleet.coordinator.engine.dispatcher import Dispatcher, DispatchFatal
    from tensorfleet.coordinator.engine.planner import Chunk
    from tensorfleet.coordinator.spec import PolicySpec
    from tests.serving import REPO_ROOT, running_server

    class Source:
        model, version = "simple", ""

    with running_server(REPO_ROOT / "tests" / "models", "--model", "simple") as other:
        with InferenceClient(other.address) as client:
            client.unload_model("simple")  # serving, but the model is not ready: as while loading
        dispatcher = Dispatcher(
            servers=[other.address], source=Source(), chunks=[Chunk(0, 0, 8, (0, 8), b"")],
            commit=lambda done: None, policy=PolicySpec(server_wait_s=2),
        )
        with pytest.raises(DispatchFatal):
            asyncio.run(asyncio.wait_for(dispatcher.run(), 60))
    assert "not ready" in dispatcher.servers[0].last_error


def test_a_connection_dropped_between_health_and_description_is_retried(tmp_path: Path):
    """bench.chaos found it: a reset during the start-up model check ended the job with a
    traceback. The proxy resets the second connection (the description's, after the health
    check's), and the fleet check must describe the model anyway."""
    import asyncio

    from bench.chaos_proxy import ChaosProxy
    from tensorfleet.client import ConnectionOptions
    from tensorfleet.coordinator.fleet.model_info import inspect_fleet

    injected = 0
    with running_server(MODELS) as server:
        for _ in range(6):  # grpc may reuse the health check's connection: then nothing was dropped
            proxy = ChaosProxy(server.port, refuse={2})
            try:
                info, ready = asyncio.run(inspect_fleet([proxy.address], "embed", "", ConnectionOptions(), 20.0))
            finally:
                proxy.close()
            assert info.name == "embed" and ready == [proxy.address]
            injected += proxy.accepted >= 2
            if injected >= 2:
                break
    assert injected, "the second connection was never opened, so the fault was never injected"



def test_a_stream_reset_while_a_request_is_written_loses_the_server_not_the_job(tmp_path: Path, caplog):
    """bench.chaos found it: a connection reset finished the stream while the dispatcher was
    building its next request; `call.write` then raised InvalidStateError ("RPC already
    finished"), which ended the worker and so the job. Here the source resets the proxy while the
    second request is built and waits until the stream's receiver has ended, so the write that
    follows is always to a finished call. The server must count as lost and the job finish."""
    import asyncio
    import logging
    import threading

    from bench.chaos_proxy import ChaosProxy
    from tensorfleet.coordinator.engine.dispatcher import Dispatcher
    from tensorfleet.coordinator.engine.planner import make_plan
    from tensorfleet.coordinator.engine.source import RequestSource
    from tensorfleet.coordinator.io.readers import open_reader
    from tensorfleet.coordinator.spec import InputSpec, PolicySpec

    make_fasta(tmp_path / "in.fasta", 32)
    reader = open_reader(InputSpec(path=str(tmp_path / "in.fasta")))
    plan = make_plan(reader, {"sequence": "sequence"}, batch_rows=4, chunk_rows=16)
    reset_done, stream_ended = threading.Event(), threading.Event()
    built = 0

    class ResetWhileBuilding(RequestSource):
        def request(self, request_id, rows, span=None):
            nonlocal built
            built += 1
            if built == 2:  # the first stream has one request written; the next is being built
                assert proxy.reset() >= 1, "the stream's connection was not open"
                reset_done.set()
                assert stream_ended.wait(20), "the stream never saw the reset"
            return super().request(request_id, rows, span)

    async def watch_receivers() -> None:
        """Sets stream_ended once the first stream's receiver task has finished (the call is done)."""
        seen: set[asyncio.Task] = set()
        while not stream_ended.is_set():
            receivers = {t for t in asyncio.all_tasks() if t.get_coro().__qualname__.endswith("_stream.<locals>.receive")}
            seen |= receivers
            if reset_done.is_set() and any(task.done() for task in seen):
                stream_ended.set()
            await asyncio.sleep(0.01)

    async def run(dispatcher: Dispatcher) -> None:
        watcher = asyncio.create_task(watch_receivers())
        try:
            await asyncio.wait_for(dispatcher.run(), 60)
        finally:
            watcher.cancel()

    committed: list[int] = []
    with running_server(MODELS) as server:
        proxy = ChaosProxy(server.port)
        try:
            source = ResetWhileBuilding(reader, {"sequence": "sequence"}, {"sequence": "BYTES"}, "embed")
            dispatcher = Dispatcher(
                servers=[proxy.address], source=source, chunks=plan.chunks,
                commit=lambda done: committed.append(done.chunk.index),
                policy=PolicySpec(window=1, server_wait_s=30, shared_memory=False),
            )
            with caplog.at_level(logging.WARNING, logger="tensorfleet"):
                asyncio.run(run(dispatcher))
        finally:
            proxy.close()
            reader.close()
    assert sorted(committed) == [chunk.index for chunk in plan.chunks]
    lost = [r.getMessage() for r in caplog.records if " lost: " in r.getMessage()]
    assert any("RPC already finished" in message for message in lost), lost
