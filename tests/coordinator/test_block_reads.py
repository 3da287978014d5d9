"""Requests are sliced from one block read per chunk (engine/source.py), whatever their row order.

A length-sorted chunk picks rows all over its span; each request must still cost only its own
rows: the file is read once per chunk, never once per request. The h5ad reader keeps its
per-file objects: no anndata construction or package-version lookup per request.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from tensorfleet.coordinator.engine import source as source_module
from tensorfleet.coordinator.engine.planner import make_plan
from tensorfleet.coordinator.engine.source import RequestSource
from tensorfleet.coordinator.io.readers import h5ad as h5ad_module
from tensorfleet.coordinator.io.readers import open_reader
from tensorfleet.coordinator.io.readers.csr_rows import CsrRows
from tensorfleet.coordinator.spec import InputSpec
from tensorfleet.core.sparse import INDICES_SUFFIX, INDPTR_SUFFIX, csr_tensors


def write_fasta(path, count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    sequences = [bytes(rng.choice(list(b"ACDEFGHIKLMNPQRSTVWY"), rng.integers(5, 200))) for _ in range(count)]
    with open(path, "wb") as handle:
        for index, sequence in enumerate(sequences):
            handle.write(b">p%d some words\n" % index)
            for at in range(0, len(sequence), 60):  # wrapped lines
                handle.write(sequence[at : at + 60] + b"\n")
    return sequences


class Counting:
    """Counts a reader's block reads and the rows they covered."""

    def __init__(self, reader) -> None:
        self.reader, self.calls, self.rows = reader, 0, 0
        original = reader.read_block

        def read_block(field, start, stop):
            self.calls += 1
            self.rows += stop - start
            return original(field, start, stop)

        reader.read_block = read_block


def test_a_length_sorted_chunk_is_read_once_and_each_request_gets_exactly_its_rows(tmp_path):
    sequences = write_fasta(tmp_path / "p.fasta", 300)
    reader = open_reader(InputSpec(path=str(tmp_path / "p.fasta"), format="fasta"))
    plan = make_plan(reader, {"seq": "sequence"}, batch_rows=16, chunk_rows=100, token_budget=800)
    assert all(chunk.order for chunk in plan.chunks)  # rows sorted by length: scattered over the span
    counting = Counting(reader)
    source = RequestSource(reader, {"seq": "sequence"}, {"seq": "BYTES"}, "m")
    requests = 0
    for chunk in plan.chunks:
        for start, stop in chunk.requests():
            rows = chunk.rows_at(start, stop)
            got = source.inputs_at(rows, (chunk.start, chunk.stop))["seq"]
            assert list(got) == [sequences[row] for row in rows]
            requests += 1
        source.release(chunk.start, chunk.stop)
    assert requests > 3 * len(plan.chunks)
    assert counting.calls == len(plan.chunks)  # one block per chunk, not one read per request
    assert counting.rows == 300  # every row read once
    reader.close()


def test_blocks_are_bounded_windows_when_a_chunk_is_larger_than_the_budget(tmp_path, monkeypatch):
    values = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    np.save(tmp_path / "x.npy", values)
    reader = open_reader(InputSpec(path=str(tmp_path / "x.npy"), format="npy"))
    monkeypatch.setattr(source_module, "BLOCK_BYTES", 16 * 100)  # 100 rows of 16 bytes
    counting = Counting(reader)
    source = RequestSource(reader, {"x": "array"}, {"x": "FP32"}, "m")
    for start in range(0, 1000, 25):  # one chunk of 1,000 rows, requests of 25 in order
        assert np.array_equal(source.inputs_at(slice(start, start + 25), (0, 1000))["x"], values[start : start + 25])
    assert counting.calls == 10 and counting.rows == 1000  # 100-row windows, each read once
    assert len(source._blocks) <= source_module.MAX_BLOCKS
    source.release(0, 1000)
    assert not source._blocks
    reader.close()


@pytest.fixture
def csr_h5ad(tmp_path):
    rng = np.random.default_rng(1)
    dense = ((rng.random((500, 60)) < 0.1) * rng.poisson(4.0, (500, 60))).astype(np.float32)
    path = tmp_path / "cells.h5ad"
    anndata.AnnData(
        X=scipy.sparse.csr_matrix(dense),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(500)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(60)]),
    ).write_h5ad(path)
    return path, dense


def test_h5ad_requests_make_no_library_objects_and_look_up_no_versions(csr_h5ad, monkeypatch):
    path, dense = csr_h5ad
    reader = open_reader(InputSpec(path=str(path), format="h5ad"))
    calls = {"version": 0}
    version = importlib.metadata.version

    def counted_version(name):
        calls["version"] += 1
        return version(name)

    monkeypatch.setattr(importlib.metadata, "version", counted_version)
    assert not hasattr(h5ad_module, "sparse_dataset")  # no anndata object, at open or per request
    source = RequestSource(reader, {"counts": "X"}, {"counts": "FP32"}, "m")
    order = np.random.default_rng(2).permutation(100)  # rows of a chunk in any order
    for chunk_start in range(0, 500, 100):
        for at in range(0, 100, 10):
            rows = chunk_start + order[at : at + 10]
            got = source.inputs_at(rows, (chunk_start, chunk_start + 100))["counts"]
            assert np.array_equal(got, dense[rows])
    assert calls == {"version": 0}
    reader.close()


def test_sparse_inputs_get_the_three_csr_tensors_of_their_rows(csr_h5ad):
    path, dense = csr_h5ad
    reader = open_reader(InputSpec(path=str(path), format="h5ad"))
    source = RequestSource(reader, {"counts": "X"}, {"counts": "FP32"}, "m")
    source.sparse = {"counts"}
    rows = np.array([107, 3, 450, 260, 261])
    tensors = source.inputs_at(rows, (0, 500))
    assert sorted(tensors) == ["counts", "counts" + INDICES_SUFFIX, "counts" + INDPTR_SUFFIX]
    assert tensors["counts"].dtype == np.float32 and tensors["counts" + INDPTR_SUFFIX][0] == 0
    rebuilt = scipy.sparse.csr_matrix(
        (tensors["counts"], tensors["counts" + INDICES_SUFFIX], tensors["counts" + INDPTR_SUFFIX]), shape=(5, 60)
    )
    assert np.array_equal(rebuilt.toarray(), dense[rows])
    assert len(tensors["counts"]) == np.count_nonzero(dense[rows])  # zeros do not travel
    reader.close()


def test_csr_rows_slice_gather_and_densify_as_scipy_does():
    """CsrRows (the h5ad reader's blocks, numpy alone) against scipy on the same arrays: row
    ranges, index arrays in any order, the tensors sent, and repeated entries summed."""
    rng = np.random.default_rng(5)
    matrix = scipy.sparse.random(300, 40, density=0.1, format="csr", dtype=np.float32, random_state=rng)
    rows = CsrRows(matrix.data, matrix.indices, matrix.indptr, 40)
    for pick in (slice(0, 300), slice(17, 121), slice(299, 300), slice(50, 50), rng.permutation(300)[:57],
                 np.array([3, 3, 250, 0])):
        mine, theirs = rows[pick], matrix[pick]
        assert mine.shape == theirs.shape
        assert np.array_equal(mine.toarray(), theirs.toarray())
        got, want = csr_tensors("x", mine, np.float32), csr_tensors("x", theirs, np.float32)
        assert all(np.array_equal(got[key], want[key]) for key in want)
    nested = rows[40:200][np.array([5, 100, 7])]  # a request's rows picked from a chunk's range
    assert np.array_equal(nested.toarray(), matrix[40:200][[5, 100, 7]].toarray())
    repeated = (np.array([1.5, 2.0, 4.0], np.float32), np.array([3, 3, 0]), np.array([0, 3, 3]))
    summed = scipy.sparse.csr_matrix(repeated, shape=(2, 5))
    assert np.array_equal(CsrRows(*repeated, 5).toarray(), summed.toarray())


def test_a_csr_h5ad_job_reads_without_importing_scipy_or_anndata(csr_h5ad):
    """Reading CSR blocks and building a request's tensors (dense and sparse) import neither."""
    path, dense = csr_h5ad
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from tensorfleet.coordinator.engine.source import RequestSource
        from tensorfleet.coordinator.io.readers import open_reader
        from tensorfleet.coordinator.spec import InputSpec
        reader = open_reader(InputSpec(path={str(path)!r}, format="h5ad"))
        source = RequestSource(reader, {{"counts": "X"}}, {{"counts": "FP32"}}, "m")
        dense = source.inputs_at(np.array([7, 2, 300]), (0, 500))["counts"]
        source.sparse = {{"counts"}}
        source.inputs_at(slice(100, 164), (100, 200))
        print(json.dumps([dense.tolist(), sorted(sys.modules)]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows, modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert np.array_equal(np.array(rows, dtype=np.float32), dense[[7, 2, 300]])
    assert not [m for m in modules if m.split(".")[0] in ("scipy", "anndata", "pandas")]


def test_cached_requests_are_built_only_from_kept_blocks_and_match_the_read_path(csr_h5ad):
    """The event loop builds a request itself only when its rows sit in a kept block (no read);
    the request is byte for byte the one the reader thread would build."""
    from tensorfleet.coordinator.io.readers.views import View
    from tensorfleet.core.wire import encode_request

    path, _ = csr_h5ad
    reader = open_reader(InputSpec(path=str(path), format="h5ad"))
    source = RequestSource(reader, {"counts": "X"}, {"counts": "FP32"}, "m")
    source.sparse = {"counts"}
    rows = np.array([7, 3, 50, 26])
    assert source.cached_request("r1", rows, (0, 100)) is None  # nothing read yet
    built = source.request("r1", rows, (0, 100))  # reads the chunk's block
    cached = source.cached_request("r1", rows, (0, 100))
    assert cached is not None and encode_request(cached) == encode_request(built)
    assert source.cached_request("r2", slice(100, 110), (100, 200)) is None  # another chunk: a read
    source.release(0, 100)
    assert source.cached_request("r1", rows, (0, 100)) is None
    assert not reader.checks_rows and not View(reader).checks_rows  # a plain view passes the question on

    class Checking(View):
        def row_errors(self, start: int, stop: int) -> dict[int, str]:  # may read: stays on the reader thread
            return {}

    checked = RequestSource(Checking(reader), {"counts": "X"}, {"counts": "FP32"}, "m")
    checked.request("r", rows, (0, 100))
    assert checked.cached_request("r", rows, (0, 100)) is None
    reader.close()
