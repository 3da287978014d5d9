"""FASTA as databases ship it, written by Biopython (wrapped lines, gzip, bgzip), through
`tensorfleet run`: duplicate ids, stop codons, over-length rows, and where row errors point."""

from __future__ import annotations

import gzip
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from Bio import SeqIO, bgzf
from Bio.Seq import Seq
from Bio.SeqRecord import SeqRecord

from tensorfleet.coordinator.io.readers import open_reader, unpack
from tensorfleet.coordinator.spec import InputSpec

from .helpers import ALPHABET, run_tensorfleet, write_job


def records(count: int, seed: int = 0, long_every: int = 0) -> list[SeqRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        size = 70 if long_every and i % long_every == 0 else rng.randint(5, 35)
        sequence = "".join(rng.choice(ALPHABET) for _ in range(size))
        out.append(SeqRecord(Seq(sequence), id=f"sp|P{i:05d}|PROT{i}", description=f"protein {i} OS=Test"))
    return out


def write(path, items: list[SeqRecord], how: str) -> None:
    if how == "plain":
        SeqIO.write(items, path, "fasta")  # Biopython wraps at 60 residues
    elif how == "gzip":
        with gzip.open(path, "wt") as handle:
            SeqIO.write(items, handle, "fasta")
    else:
        with bgzf.BgzfWriter(str(path), "wb") as handle:
            SeqIO.write(items, handle, "fasta")


def servers_model(servers, name: str = "seqlen") -> dict:
    return {"name": name, "servers": [s.address for s in servers]}


def run_parquet(tmp_path, servers, source: str, **input_options):
    job = write_job(
        tmp_path / "job.yaml", input={"path": source, **input_options}, model=servers_model(servers),
        output={"path": "out.parquet"}, chunking={"chunk_rows": 8, "batch_rows": 4},
    )
    result = run_tensorfleet("run", job)
    table = pq.read_table(tmp_path / "out.parquet").to_pydict() if (tmp_path / "out.parquet").exists() else None
    return result, table


@pytest.mark.parametrize(("how", "name"), [("plain", "in.fasta"), ("gzip", "in.fa.gz"), ("bgzip", "in.fa.bgz")])
def test_wrapped_gzip_and_bgzip_fasta_give_the_same_rows(tmp_path, servers, how, name):
    items = records(30, long_every=7)  # 70 residues: wrapped by Biopython onto 2 lines, over the model's 40
    write(tmp_path / name, items, how)
    result, table = run_parquet(tmp_path, servers, name)
    assert result.returncode == 0, result.stderr
    assert table["id"] == [r.id for r in items]
    assert table["length"] == [min(len(r.seq), 40) for r in items]
    assert table["truncated"] == [len(r.seq) > 40 for r in items]
    assert "truncated: 5 rows longer than the model's max_length 40" in result.stdout


def test_over_length_error_fails_those_rows_naming_record_line_and_id(tmp_path, servers):
    items = records(12, seed=1, long_every=5)
    write(tmp_path / "in.fasta", items, "plain")
    result, table = run_parquet(tmp_path, servers, "in.fasta", over_length="error")
    assert result.returncode == 1, result.stderr
    assert table["ok"] == [len(r.seq) <= 40 for r in items]
    assert "truncated" not in table
    errors = pq.read_table(tmp_path / "out.errors.parquet").to_pydict()
    assert errors["row"] == [0, 5, 10]
    # record 1 takes 3 lines (70 residues wrap at 60), records 2-5 two each: record 6 starts on line 12
    assert errors["message"][1].startswith(f"record 6 (line 12), id '{items[5].id}': 'sequence' is 70 long")
    assert "the model takes at most 40 (input.over_length: error)" in errors["message"][1]


def test_terminal_stop_is_removed_and_an_internal_one_fails_its_row(tmp_path, servers):
    text = ">a first\nMKTA*\n>b internal stop\nMK*TA\nQQ\n>c\nMKT\n"
    (tmp_path / "in.fasta").write_text(text)
    result, table = run_parquet(tmp_path, servers, "in.fasta")
    assert result.returncode == 1
    assert table["ok"] == [True, False, True]
    assert table["length"][0] == 4 and table["length"][2] == 3
    assert table["error"][1].startswith(
        "INVALID_ARGUMENT: record 2 (line 3), id 'b': sequence has a '*' (stop) at residue 3 of 7"
    )


@pytest.mark.parametrize(
    ("policy", "code", "ids"),
    [("suffix", 0, ["x", "y", "x-1", "z", "x-2", "y-1"]), ("first", 0, ["x", "y", "z"]), ("error", 2, None)],
)
def test_duplicate_ids(tmp_path, servers, policy, code, ids):
    names = ["x", "y", "x", "z", "x", "y"]
    (tmp_path / "in.fasta").write_text("".join(f">{n} r{i}\n{'M' * (i + 1)}\n" for i, n in enumerate(names)))
    result, table = run_parquet(tmp_path, servers, "in.fasta", duplicate_ids=policy)
    assert result.returncode == code, result.stderr
    if policy == "error":
        assert "2 ids occur more than once in the input" in result.stderr
        assert "'x' at rows [0, 2, 4]" in result.stderr and "'y' at rows [1, 5]" in result.stderr
        return
    assert table["id"] == ids
    kept = [0, 1, 2, 3, 4, 5] if policy == "suffix" else [0, 1, 3]
    assert table["length"] == [i + 1 for i in kept]
    assert "duplicate ids: 3 repeated ids" in result.stdout


def test_a_server_side_row_error_names_the_record_and_id(tmp_path, servers):
    items = records(10, seed=3)
    items[6] = SeqRecord(Seq("MK!LV"), id="bad_one", description="")
    write(tmp_path / "in.fasta", items, "plain")
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.fasta"}, model=servers_model(servers, "embed"),
        output={"path": "out.parquet"}, chunking={"chunk_rows": 8, "batch_rows": 4},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 1
    errors = pq.read_table(tmp_path / "out.errors.parquet").to_pydict()
    assert errors["row"] == [6]
    assert errors["message"][0].startswith("record 7 (line 13), id 'bad_one': ")


@pytest.mark.parametrize("pieces", [False, True])
@pytest.mark.parametrize("how", ["gzip", "bgzip"])
def test_compressed_rows_read_in_any_order_from_access_points(tmp_path, monkeypatch, how, pieces):
    """`pieces`: decompress calls return at most 61 bytes and lines come in pieces of at most
    7 bytes (the bounds that keep a gzip bomb or one 12 GiB line out of memory, issue #28)."""
    if pieces:
        monkeypatch.setattr(unpack, "OUT_BLOCK", 61)
        monkeypatch.setattr(unpack, "LINE_PIECE", 7)
    monkeypatch.setattr(unpack, "SPACING", 1 << 12)
    monkeypatch.setattr(unpack, "MEMBER_SPACING", 1 << 11)
    monkeypatch.setattr(unpack, "CACHE", 1 << 11)
    monkeypatch.setattr(unpack, "_BLOCK", 997)
    items = records(400, seed=5)
    write(tmp_path / "in.fa.gz", items, how)
    rng = random.Random(2)
    with open_reader(InputSpec(path=str(tmp_path / "in.fa.gz"))) as reader:
        assert reader.num_rows == 400
        for _ in range(200):
            start = rng.randrange(400)
            stop = min(400, start + rng.randint(1, 12))
            assert list(reader.read("sequence", start, stop)) == [str(r.seq).encode() for r in items[start:stop]]
        assert list(reader.ids(0, 400)) == [r.id for r in items]
        np.testing.assert_array_equal(reader.lengths("sequence", 0, 400), [len(r.seq) for r in items])


def test_an_h5ad_output_from_fasta_keeps_truncated_in_obs(tmp_path, servers):
    """A per-row fact of the input is an obs column for anndata users; outputs stay in obsm."""
    import anndata

    items = records(20, long_every=7)
    write(tmp_path / "in.fasta", items, "plain")
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.fasta"}, model=servers_model(servers),
        output={"path": "out.h5ad"}, chunking={"chunk_rows": 8, "batch_rows": 4},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert list(out.obs_names) == [r.id for r in items]
    assert out.obs["truncated"].tolist() == [len(r.seq) > 40 for r in items]
    assert "truncated" not in out.obsm
    assert out.obsm["length"][:, 0].tolist() == [min(len(r.seq), 40) for r in items]
    assert out.obs["tensorfleet_ok"].all()
