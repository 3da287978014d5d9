"""Pieces that need no server: spec, readers, planner, parts, manifest, writers via merge."""

from __future__ import annotations

import dataclasses

import anndata
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from tensorfleet.coordinator.engine.manifest import Manifest, RowError
from tensorfleet.coordinator.engine.planner import (
    IdsDigest,
    Plan,
    PlanError,
    PlanSettings,
    make_chunks,
    make_plan,
    request_bounds,
)
from tensorfleet.coordinator.io.parts import CorruptPart, Part, write_part
from tensorfleet.coordinator.io.readers import open_reader
from tensorfleet.coordinator.spec import InputSpec, SpecError, json_schema, parse_spec

from .helpers import make_fasta

GOOD = {
    "input": {"path": "in.fasta"},
    "model": {"name": "embed", "servers": ["127.0.0.1:1"]},
    "output": {"path": "out.h5"},
}


def test_spec_errors_name_the_field():
    with pytest.raises(SpecError, match=r"chunking\.chunk_rows"):
        parse_spec({**GOOD, "chunking": {"chunk_rows": 0}})
    with pytest.raises(SpecError, match=r"model: .*exactly one of model.servers"):
        parse_spec({**GOOD, "model": {"name": "m"}})
    with pytest.raises(SpecError, match=r"output: .*cannot tell the format of 'out.txt'"):
        parse_spec({**GOOD, "output": {"path": "out.txt"}})
    with pytest.raises(SpecError, match=r"policy\.windw: Extra inputs are not permitted"):
        parse_spec({**GOOD, "policy": {"windw": 3}})
    with pytest.raises(SpecError, match=r"model\.servers: .*not host:port"):
        parse_spec({**GOOD, "model": {"name": "m", "servers": ["nohost"]}})
    assert parse_spec(GOOD).input.format == "fasta"
    assert set(json_schema()["properties"]) >= {"input", "model", "output", "chunking", "policy"}


def test_token_budget_requests_respect_rows_and_tokens():
    lengths = np.array([10, 10, 50, 5, 5, 5, 100, 1, 1])
    bounds = request_bounds(len(lengths), 4, lengths, token_budget=100)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        rows = stop - start
        assert rows <= 4
        assert rows == 1 or rows * lengths[start:stop].max() <= 100
    assert bounds[0] == 0 and bounds[-1] == len(lengths)
    assert request_bounds(10, 4) == [0, 4, 8, 10]
    chunks = make_chunks([0, 4, 8, 10], 5)
    assert [(c.start, c.stop, c.bounds) for c in chunks] == [(0, 8, (0, 4, 8)), (8, 10, (8, 10))]


def test_plan_is_deterministic_and_covers_every_row(tmp_path):
    make_fasta(tmp_path / "a.fasta", 300)
    plans = []
    for _ in range(2):
        with open_reader(InputSpec(path=str(tmp_path / "a.fasta"))) as reader:
            plans.append(make_plan(reader, {"sequence": "sequence"}, batch_rows=7, chunk_rows=50, token_budget=300))
    assert plans[0].chunks == plans[1].chunks and plans[0].ids_digest == plans[1].ids_digest
    with open_reader(InputSpec(path=str(tmp_path / "a.fasta"))) as reader:
        lengths = reader.lengths("sequence", 0, 300)
    for chunk in plans[0].chunks:
        requests = chunk.request_rows()
        sent = np.concatenate(requests)
        # every row of the chunk exactly once, sent shortest first, each request within budget
        assert sorted(sent.tolist()) == list(range(chunk.start, chunk.stop))
        assert np.all(np.diff(lengths[sent]) >= 0)
        for rows in requests:
            assert len(rows) <= 7 and (len(rows) == 1 or len(rows) * lengths[rows].max() <= 300)
    assert [chunk.start for chunk in plans[0].chunks] == list(range(0, 300, 50))


def test_a_plan_holds_its_settings_once_and_the_manifest_records_them(tmp_path):
    """Plan keeps one PlanSettings (no copy of its fields to drift apart from it); the manifest's
    plan record is those settings plus the ids digest, and reads back equal."""
    make_fasta(tmp_path / "s.fasta", 30)
    with open_reader(InputSpec(path=str(tmp_path / "s.fasta"))) as reader:
        plan = make_plan(reader, {"sequence": "sequence"}, batch_rows=4, chunk_rows=8, limit=25,
                         parameters={"steps": 3})
    assert {f.name for f in dataclasses.fields(Plan)} & {f.name for f in dataclasses.fields(PlanSettings)} == set()
    assert plan.settings == PlanSettings(25, 4, None, 8, 25, {"sequence": "sequence"}, {"steps": 3})
    manifest = Manifest(tmp_path / "manifest.sqlite")
    manifest.record_plan(plan)
    assert manifest.plan_settings() == {**plan.settings.as_dict(), "ids_digest": plan.ids_digest}
    manifest.close()


def test_ids_digest_in_blocks_equals_one_id_at_a_time():
    """The plan digests ids in blocks and the merge part by part: both must give the digest of
    each id added alone (empty ids, non-ASCII, long ones, blocks of any size)."""
    ids = ["seq1", "", "é-ü", "x" * 70_000, *(f"cell-{i}" for i in range(1000))]
    one = IdsDigest()
    for value in ids:
        one.add(value)
    blocks = IdsDigest()
    for start, stop in ((0, 1), (1, 1), (1, 4), (4, 600), (600, len(ids))):
        blocks.add_many(ids[start:stop])
    assert blocks.hexdigest() == one.hexdigest()
    other = IdsDigest()
    other.add_many(ids[:3] + ids[4:])
    assert other.hexdigest() != one.hexdigest()


def test_duplicate_ids_are_named(tmp_path):
    make_fasta(tmp_path / "d.fasta", 50, duplicate={10: 3, 20: 7})
    with open_reader(InputSpec(path=str(tmp_path / "d.fasta"))) as reader, pytest.raises(PlanError) as caught:
        make_plan(reader, {"sequence": "sequence"}, batch_rows=8, chunk_rows=16)
    assert "'seq3' at rows [3, 10]" in str(caught.value) and "'seq7' at rows [7, 20]" in str(caught.value)


def test_fasta_reader_reads_row_ranges(tmp_path):
    records = make_fasta(tmp_path / "f.fasta", 40)
    with open_reader(InputSpec(path=str(tmp_path / "f.fasta"))) as reader:
        assert reader.num_rows == 40
        assert list(reader.ids(5, 9)) == [name for name, _ in records[5:9]]
        assert list(reader.read("sequence", 37, 40)) == [s.encode() for _, s in records[37:40]]
        assert list(reader.lengths("sequence", 0, 3)) == [len(s) for _, s in records[:3]]


def test_hdf5_parquet_npy_and_h5ad_readers_read_row_ranges(tmp_path):
    data = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    ids = [f"r{i}" for i in range(50)]
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["grp/x"] = data
        f["names"] = np.array(ids, dtype=object).astype("S")
    np.save(tmp_path / "a.npy", data)
    table = pa.table({"name": ids, "x": pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), 8),
                      "v": pa.array([list(map(float, row)) for row in data], pa.list_(pa.float64()))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=7)
    dense = anndata.AnnData(X=data, obs=pd.DataFrame(index=ids))
    dense.obsm["emb"] = data[:, :3]
    dense.write_h5ad(tmp_path / "dense.h5ad")
    anndata.AnnData(X=sp.csr_matrix(np.where(data > 0.5, data, 0)), obs=pd.DataFrame(index=ids)).write_h5ad(
        tmp_path / "sparse.h5ad"
    )
    cases = [
        (InputSpec(path=str(tmp_path / "a.h5"), ids="names"), "grp/x", data),
        (InputSpec(path=str(tmp_path / "a.npy")), "array", data),
        (InputSpec(path=str(tmp_path / "a.parquet"), ids="name"), "x", data),
        (InputSpec(path=str(tmp_path / "a.parquet"), ids="name"), "v", data.astype(np.float64)),
        (InputSpec(path=str(tmp_path / "dense.h5ad")), "X", data),
        (InputSpec(path=str(tmp_path / "dense.h5ad")), "obsm/emb", data[:, :3]),
        (InputSpec(path=str(tmp_path / "sparse.h5ad")), "X", np.where(data > 0.5, data, 0)),
    ]
    for spec, field, expected in cases:
        with open_reader(spec) as reader:
            assert reader.num_rows == 50
            got = reader.read(field, 5, 23)
            np.testing.assert_array_equal(got, expected[5:23], err_msg=f"{spec.path} {field}")
            if spec.format != "npy":
                assert list(reader.ids(5, 23)) == ids[5:23], spec.path
            assert reader.fields()[field].row_shape == expected.shape[1:]


def test_part_round_trip_and_corruption_is_detected(tmp_path):
    path = tmp_path / "p.part"
    arrays = {"y": np.arange(12, dtype=np.float32).reshape(3, 4), "ok": np.array([True, False, True])}
    write_part(path, arrays, {"ids": np.array(["a", "ü", ""], dtype=object)})
    with Part(path) as part:
        np.testing.assert_array_equal(part.array("y"), arrays["y"])
        assert list(part.strings("ids")) == ["a", "ü", ""]
        assert sorted(part.names) == ["ok", "y"]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptPart, match="checksum"):
        Part(path)
    assert not list(tmp_path.glob("*.tmp"))


def test_manifest_commits_a_chunk_once_with_its_errors(tmp_path):
    make_fasta(tmp_path / "m.fasta", 20)
    with open_reader(InputSpec(path=str(tmp_path / "m.fasta"))) as reader:
        plan = make_plan(reader, {"sequence": "sequence"}, batch_rows=4, chunk_rows=8)
    manifest = Manifest(tmp_path / "manifest.sqlite")
    manifest.record_plan(plan)
    assert manifest.commit_chunk(1, "parts/1", [RowError(9, "seq9", "INTERNAL", "boom")], "s:1")
    assert not manifest.commit_chunk(1, "parts/1", [], "s:2")
    manifest.close()
    reopened = Manifest.open_existing(tmp_path)
    assert reopened.done_chunks() == {1}
    assert reopened.errors() == [RowError(9, "seq9", "INTERNAL", "boom")]
    assert reopened.chunks() == plan.chunks
    assert reopened.counts()["rows_failed"] == 1


def test_lease_notes_are_written_with_the_next_commit_not_one_write_each(tmp_path):
    import sqlite3

    make_fasta(tmp_path / "m.fasta", 20)
    with open_reader(InputSpec(path=str(tmp_path / "m.fasta"))) as reader:
        plan = make_plan(reader, {"sequence": "sequence"}, batch_rows=4, chunk_rows=8)
    manifest = Manifest(tmp_path / "manifest.sqlite")
    manifest.record_plan(plan)
    other = sqlite3.connect(tmp_path / "manifest.sqlite")  # what a crash would leave on disk
    written = lambda: other.execute("SELECT chunk, server FROM leases ORDER BY chunk, server").fetchall()  # noqa: E731
    for chunk in (0, 1, 2):
        manifest.note_lease(chunk, "s:1")
    manifest.note_lease(1, "s:2")
    assert written() == []  # in memory: no synchronous write per lease
    assert manifest.commit_chunk(0, "parts/0", [], "s:1")
    assert written() == [(0, "s:1"), (1, "s:1"), (1, "s:2"), (2, "s:1")]  # in the commit's transaction
    manifest.note_lease(2, "s:2")
    assert manifest.lease_counts() == {0: 1, 1: 2, 2: 2}
    manifest.note_lease(0, "s:3")
    manifest.close()  # the rest at close
    assert written()[0] == (0, "s:1") and len(written()) == 6
    other.close()


def test_a_server_the_fleet_check_just_saw_skips_only_its_first_probe():
    import time

    from tensorfleet.coordinator.engine import dispatcher
    from tensorfleet.coordinator.spec import PolicySpec

    now = time.monotonic()
    stale = now - dispatcher.VERIFIED_FOR_S - 1
    checked = dispatcher.Dispatcher(
        servers=["a:1", "b:1", "c:1"], source=None, chunks=[], commit=lambda done: None,
        policy=PolicySpec(), verified={"a:1": now, "b:1": stale},
    )
    assert checked._just_verified("a:1")
    assert not checked._just_verified("a:1")  # a reconnect probes again
    assert not checked._just_verified("b:1")  # checked too long ago (the plan took a while)
    assert not checked._just_verified("c:1")  # the fleet check did not see it serving
