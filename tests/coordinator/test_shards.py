"""Sharded jobs: `tensorfleet run JOB --shard I/N` as three coordinators in one job folder, then
the one output, bitwise the one-coordinator run's, for a plain job (the bundled protein job), a
multi-stage job (the DPAM example) and a models x sources job (the epistasis example); a shard
killed mid-run continues from its committed chunks; `tensorfleet merge` refuses, naming the
shards not complete, and `tensorfleet status` shows every shard.

Real servers on loopback, real files: the three shards run as three processes at once, sharing
one server (a sharded job's shards each have their own; here they share it to keep the machine
free), and the reference is `tensorfleet run` of the same job by one coordinator.
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.serving import running_server

from .helpers import (
    REPO_ROOT,
    chunks_done,
    committed_rows,
    local_model,
    make_fasta,
    run_tensorfleet,
    start_tensorfleet,
    wait_for,
    write_job,
)

EXAMPLES = REPO_ROOT / "examples"


def _run_shards(job: Path, count: int, folder: Path, *extra: str) -> list[str]:
    """Every shard as its own process, all at once; each one's output (they must all succeed)."""
    logs = [folder / f"shard-{index}.log" for index in range(count)]
    processes = [start_tensorfleet("run", job, *extra, "--shard", f"{index}/{count}", log=log)
                 for index, log in enumerate(logs)]
    codes = [process.wait(600) for process in processes]
    texts = [log.read_text() for log in logs]
    assert codes == [0] * count, "\n\n".join(texts)
    return texts


def _h5(path: Path) -> dict[str, bytes]:
    with h5py.File(path) as handle:
        return {name: np.asarray(handle[name][()]).tobytes() if handle[name].dtype.kind != "O"
                else repr(list(handle[name][()])).encode() for name in handle if isinstance(handle[name], h5py.Dataset)}


def _parquet(path: Path) -> dict[str, list]:
    table = pq.read_table(path)
    return {name: table.column(name).to_pylist() for name in table.column_names}


# --- the bundled protein job (plain) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def protein_server():
    if not (EXAMPLES / "data" / "proteins.fasta").exists():
        pytest.skip("examples/data/proteins.fasta not built (examples/build_models.py)")
    with running_server(EXAMPLES / "models", "--threads", "1") as server:
        yield server


def _protein_job(folder: Path) -> Path:
    """examples/jobs/protein-embeddings.yaml, its output in `folder`, in 8-row chunks (its own are 256
    rows: on this shared 2-core machine the CPU embedder runs ~2 proteins/s, so the test runs the
    first 24 proteins, --limit 24, in three chunks: one a shard)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load((EXAMPLES / "jobs" / "protein-embeddings.yaml").read_text())
    spec["chunking"]["chunk_rows"] = 8
    spec["input"]["path"] = str(EXAMPLES / "data" / "proteins.fasta")
    spec["model"]["local"]["repository"] = str(EXAMPLES / "models")
    spec["output"]["path"] = str(folder / "protein-embeddings.h5")
    path = folder / "protein-embeddings.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_three_shards_of_the_protein_job_give_the_one_coordinator_output(tmp_path, protein_server):
    servers = ("--servers", protein_server.address, "--limit", "24")
    reference = _protein_job(tmp_path / "one")
    done = run_tensorfleet("run", reference, *servers, timeout=600)
    assert done.returncode == 0, done.stderr
    job = _protein_job(tmp_path / "sharded")
    logs = _run_shards(job, 3, tmp_path, *servers)
    assert any("output: " in log for log in logs), logs  # the last to finish merged
    output = "protein-embeddings.limit24.h5"
    expected, actual = _h5(tmp_path / "one" / output), _h5(tmp_path / "sharded" / output)
    assert set(expected) == set(actual) and {"ids", "embedding", "ok"} <= set(actual)
    for name, values in expected.items():
        assert actual[name] == values, name
    top = tmp_path / "sharded" / f"{output}.tfjob"
    status = run_tensorfleet("status", top)
    assert status.returncode == 0, status.stderr
    assert "kind: sharded (3 shards)" in status.stdout and "merge: done" in status.stdout
    assert status.stdout.count(", complete") == 3 and "total: rows 24/24" in status.stdout
    # a re-run of the whole job (no --shard) and the merge: nothing computed, the output as it was
    before = (tmp_path / "sharded" / output).stat().st_mtime_ns
    again = run_tensorfleet("run", job, *servers)
    assert again.returncode == 0 and "nothing computed" in again.stdout, again.stdout + again.stderr
    merged = run_tensorfleet("merge", job, "--limit", "24")
    assert merged.returncode == 0 and "output: " in merged.stdout, merged.stderr
    assert (tmp_path / "sharded" / output).stat().st_mtime_ns == before


# --- a shard killed mid-run; the merge refuses while a shard is incomplete --------------------------
def _fasta_job(folder: Path, model: dict, rows: int) -> tuple[Path, list]:
    folder.mkdir(parents=True, exist_ok=True)
    records = make_fasta(folder / "in.fasta", rows)
    job = write_job(folder / "job.yaml", input={"path": "in.fasta"}, model=model, output={"path": "out.h5"},
                    chunking={"chunk_rows": 32, "batch_rows": 8}, policy={"window": 2, "server_wait_s": 60})
    return job, records


def test_a_killed_shard_continues_and_the_merge_waits_for_it_by_name(tmp_path, servers):
    rows = 960  # 30 chunks of 32 rows: 10 a shard
    reference, records = _fasta_job(tmp_path / "one", {"name": "embed", "servers": [s.address for s in servers]}, rows)
    assert run_tensorfleet("run", reference).returncode == 0
    job, _ = _fasta_job(tmp_path / "sharded", local_model("embed"), rows)
    top = tmp_path / "sharded" / "out.h5.tfjob"
    for index in (0, 2):
        done = run_tensorfleet("run", job, "--shard", f"{index}/3")
        assert done.returncode == 0, done.stderr
        assert "the merge waits for shard 1/3 (not started)" in done.stdout, done.stdout
    assert not (tmp_path / "sharded" / "out.h5").exists()
    refused = run_tensorfleet("merge", job)
    assert refused.returncode == 2 and "shard 1/3 (not started)" in refused.stderr, refused.stderr
    assert "shard 0/3" not in refused.stderr and "shard 2/3" not in refused.stderr

    shard = top / "shards" / "1-of-3"
    first_log, second_log = tmp_path / "rows-first.log", tmp_path / "rows-second.log"
    killed = start_tensorfleet("run", job, "--shard", "1/3", log=tmp_path / "shard-1.log",
                               env={"TF_TEST_DELAY_MS": "60", "TF_TEST_ROW_LOG": str(first_log)})
    wait_for(lambda: chunks_done(shard) >= 2, what="two committed chunks in shard 1")
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    before = committed_rows(shard)
    assert 0 < len(before) < rows // 3, "the kill should land mid-shard"
    refused = run_tensorfleet("merge", job)
    assert refused.returncode == 2, refused.stdout
    assert f"shard 1/3 (stopped, rows {len(before)}/320" in refused.stderr, refused.stderr
    status = run_tensorfleet("status", top)
    assert "shard 1/3 (stopped" in status.stdout and "merge: waiting for shards" in status.stdout, status.stdout

    waiting = start_tensorfleet("merge", job, "--wait", log=tmp_path / "merge-wait.log")  # as a merge Job would
    try:
        resumed = run_tensorfleet("run", job, "--shard", "1/3", env={"TF_TEST_ROW_LOG": str(second_log)})
        assert resumed.returncode == 0, resumed.stderr
        assert "output: " in resumed.stdout, resumed.stdout  # the last shard to finish merged (or found it merged)
        assert waiting.wait(120) == 0, (tmp_path / "merge-wait.log").read_text()
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait(30)
    merge_log = (tmp_path / "merge-wait.log").read_text()
    assert "waiting for shard 1/3" in merge_log and "output: " in merge_log, merge_log
    expected, actual = _h5(tmp_path / "one" / "out.h5"), _h5(tmp_path / "sharded" / "out.h5")
    for name, values in expected.items():
        assert actual[name] == values, name
    sequence_row = {sequence: row for row, (_, sequence) in enumerate(records)}
    resent = {sequence_row[line] for line in second_log.read_text().split()}
    assert resent and not (resent & before), "committed rows were computed again"
    assert resent | before == set(range(320, 640))


def test_shards_are_refused_where_they_do_not_fit(tmp_path, servers):
    job, _ = _fasta_job(tmp_path / "job", {"name": "embed", "servers": [s.address for s in servers]}, 100)
    assert run_tensorfleet("run", job, "--shard", "0/2").returncode == 0
    other = run_tensorfleet("run", job, "--shard", "0/3")
    assert other.returncode == 2 and "in 2 shards, not 3" in other.stderr
    bad = run_tensorfleet("run", job, "--shard", "2/2")
    assert bad.returncode == 2 and "I must be 0 to N-1" in bad.stderr
    nothing = run_tensorfleet("merge", tmp_path / "job" / "job.yaml", "--job-dir", tmp_path / "elsewhere")
    assert nothing.returncode == 2 and "holds no sharded job" in nothing.stderr
    # the rest of the job by one coordinator: every shard left in turn, then the merge
    whole = run_tensorfleet("run", job)
    assert whole.returncode == 0 and "output: " in whole.stdout, whole.stdout + whole.stderr


# --- a multi-stage job (DPAM) and a models x sources job (epistasis) ---------------------------------
@pytest.fixture(scope="module")
def dpam_server():
    if not (EXAMPLES / "dpam" / "models" / "domass").is_dir():
        pytest.skip("examples/dpam not built (python examples/dpam/build.py)")
    pytest.importorskip("tensorflow")
    with running_server(EXAMPLES / "dpam" / "models", "--threads", "1", timeout=300) as server:
        yield server


def _example_copy(name: str, folder: Path) -> Path:
    shutil.copytree(EXAMPLES / name, folder, ignore=shutil.ignore_patterns("output", "*.tfjob", ".*.tfjob"))
    return folder


def test_three_shards_of_the_dpam_pipeline_give_the_one_coordinator_output(tmp_path, dpam_server):
    servers = ("--servers", dpam_server.address)
    one, sharded = _example_copy("dpam", tmp_path / "one"), _example_copy("dpam", tmp_path / "sharded")
    done = run_tensorfleet("run", one / "dpam.yaml", *servers, timeout=600)
    assert done.returncode == 0, done.stderr
    _run_shards(sharded / "dpam.yaml", 3, tmp_path, *servers)
    assert _parquet(sharded / "output" / "domass.parquet") == _parquet(one / "output" / "domass.parquet")
    shards = sorted((sharded / "output" / "domass.parquet.tfjob" / "shards").glob("*-of-3/stages/01-domass"))
    assert len(shards) == 3  # each shard ran both stages on its own rows


@pytest.fixture(scope="module")
def epistasis_server():
    if not (EXAMPLES / "epistasis" / "models" / "embed_small").is_dir():
        pytest.skip("examples/epistasis not built (make models)")
    with running_server(EXAMPLES / "epistasis" / "models", "--threads", "1") as server:
        yield server


def test_three_shards_of_the_epistasis_sweep_give_the_one_coordinator_sheets(tmp_path, epistasis_server):
    servers = ("--servers", epistasis_server.address)
    one, sharded = _example_copy("epistasis", tmp_path / "one"), _example_copy("epistasis", tmp_path / "sharded")
    done = run_tensorfleet("run", one / "epistasis.yaml", *servers, timeout=600)
    assert done.returncode == 0, done.stderr
    logs = _run_shards(sharded / "epistasis.yaml", 3, tmp_path, *servers)
    assert any("sheet: " in log for log in logs), logs
    for sheet in ("embed_small.parquet", "embed_tiny.parquet"):
        assert _parquet(sharded / "output" / sheet) == _parquet(one / "output" / sheet), sheet
    # 41 and 60 rows in 32-row chunks: 2 chunks a source, so shard 0 has none: planned, empty, complete
    shards = sharded / "output" / ".epistasis.tfjob" / "shards"
    counts = []
    for index in range(3):
        with sqlite3.connect(shards / f"{index}-of-3" / "embed_small" / "singles" / "manifest.sqlite") as db:
            counts.append(db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
    assert counts == [0, 1, 1]


def test_an_in_context_job_shards(tmp_path):
    if not (EXAMPLES / "stack" / "models" / "stack_toy").is_dir():
        pytest.skip("examples/stack not built (python examples/stack/build.py)")
    one, sharded = _example_copy("stack", tmp_path / "one"), _example_copy("stack", tmp_path / "sharded")
    assert run_tensorfleet("run", one / "stack.yaml", timeout=600).returncode == 0
    for index in range(2):
        done = run_tensorfleet("run", sharded / "stack.yaml", "--shard", f"{index}/2", timeout=600)
        assert done.returncode == 0, done.stderr
    import anndata

    expected = anndata.read_h5ad(one / "output" / "predictions.h5ad")
    actual = anndata.read_h5ad(sharded / "output" / "predictions.h5ad")
    assert list(actual.obs_names) == list(expected.obs_names)
    assert sorted(actual.layers) == sorted(expected.layers)
    for name in expected.layers:
        assert np.asarray(actual.layers[name]).tobytes() == np.asarray(expected.layers[name]).tobytes(), name



def test_retry_failed_recomputes_the_failed_chunks_of_one_shard_or_of_every_shard(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    records = make_fasta(folder / "in.fasta", 100, poison={10, 70})  # in chunk 0 (shard 0) and chunk 2 (shard 1)
    row_of = {sequence: row for row, (_, sequence) in enumerate(records)}
    job = write_job(folder / "job.yaml", input={"path": "in.fasta"}, model=local_model("embed"),
                    output={"path": "out.h5"}, chunking={"chunk_rows": 32, "batch_rows": 16})
    for index in (0, 1):
        assert run_tensorfleet("run", job, "--shard", f"{index}/2").returncode == 1  # failed rows: exit 1
    with h5py.File(folder / "out.h5") as handle:
        failed = set(np.nonzero(~handle["ok"][()])[0].tolist())
    assert {10, 70} <= failed <= set(range(0, 32)) | set(range(64, 96)), failed

    def chunks_sent(log: Path) -> set[int]:
        return {row_of[line] // 32 for line in log.read_text().split()}

    log = tmp_path / "rows-shard.log"
    one = run_tensorfleet("run", job, "--shard", "1/2", "--retry-failed", env={"TF_TEST_ROW_LOG": str(log)})
    assert one.returncode == 1 and "computing again 1 chunk(s)" in one.stderr, one.stderr
    assert chunks_sent(log) == {2}  # shard 1's failed chunk only; shard 0 untouched
    log = tmp_path / "rows-whole.log"
    whole = run_tensorfleet("run", job, "--retry-failed", env={"TF_TEST_ROW_LOG": str(log)})
    assert whole.returncode == 1 and whole.stderr.count("computing again 1 chunk(s)") == 2, whole.stderr
    assert chunks_sent(log) == {0, 2}  # every shard's failed chunk, nothing else
    assert "output: " in whole.stdout
