"""BYTES model outputs, through part files and the merge, into every output format.

Before, a part stored an object array as its buffer (the values' addresses) and every merge of
a BYTES output failed with "cannot create an OBJECT array from memory buffer" (issue #28)."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from tensorfleet.coordinator.io.parts import CorruptPart, Part, encode_part, write_part
from tests.serving import REPO_ROOT

from .helpers import run_tensorfleet

REPOSITORY = REPO_ROOT / "tests" / "models"  # echo_bytes: BYTES `text` -> BYTES `upper`, INT64 `length`
RECORDS = [("a", b"ACDEfg"), ("b", b"kkll"), ("c", b"MK*QR"), ("d", "ünï".encode()), ("e", b"w")]
FAILED = 2  # an internal '*' makes the FASTA reader fail the row: it is never sent


def _job(tmp_path, fmt: str, records=RECORDS) -> tuple[int, str]:
    with open(tmp_path / "in.fasta", "wb") as handle:
        for name, sequence in records:
            handle.write(b">" + name.encode() + b" record\n" + sequence + b"\n")
    spec = {"name": f"bytes-{fmt}", "input": {"path": "in.fasta", "tensors": {"text": "sequence"}},
            "model": {"name": "echo_bytes", "local": {"repository": str(REPOSITORY), "count": 1}},
            "output": {"path": f"out.{fmt}", "format": fmt}, "chunking": {"chunk_rows": 2, "batch_rows": 2}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    done = run_tensorfleet("run", tmp_path / "job.yaml", timeout=180)
    return done.returncode, done.stderr


def _stored(tmp_path, fmt: str) -> tuple[list, list, list]:
    """(upper, length, ok) as the output file holds them."""
    path = tmp_path / f"out.{fmt}"
    if fmt == "hdf5":
        with h5py.File(path) as f:
            return list(f["upper"][:]), list(f["length"][:]), list(f["ok"][:])
    if fmt == "parquet":
        table = pq.read_table(path).to_pydict()
        return table["upper"], table["length"], table["ok"]
    if fmt == "h5ad":
        import anndata

        adata = anndata.read_h5ad(path)
        return list(adata.obsm["upper"][:, 0]), list(adata.obsm["length"][:, 0]), list(adata.obs["tensorfleet_ok"])
    frame = pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", keep_default_na=False)
    return list(frame["upper"]), list(frame["length"]), list(frame["ok"])


@pytest.mark.parametrize("fmt", ["hdf5", "parquet", "h5ad", "csv", "tsv"])
def test_a_bytes_output_merges_into_every_format(tmp_path, fmt):
    code, stderr = _job(tmp_path, fmt)
    assert code == 1, stderr  # one row failed (the internal stop), the rest succeeded
    assert "cannot create an OBJECT array" not in stderr, stderr
    upper, length, ok = _stored(tmp_path, fmt)
    assert [bool(v) for v in ok] == [row != FAILED for row in range(len(RECORDS))]
    keeps_bytes = fmt in ("hdf5", "parquet")  # the text formats hold the UTF-8 text instead
    for row, (_, sequence) in enumerate(RECORDS):
        if row == FAILED:
            assert upper[row] in (b"", "", None), upper[row]
            continue
        want = sequence.upper()
        assert upper[row] == (want if keeps_bytes else want.decode()), (row, upper[row])
        assert int(length[row]) == len(sequence)


def test_an_hdf5_output_refuses_a_nul_byte_by_row_and_names_parquet(tmp_path):
    """HDF5 strings end at a NUL byte: the merge stops with a clear message, no value is cut short."""
    records = [("a", b"AB"), ("b", b"C\0D")]
    code, stderr = _job(tmp_path, "hdf5", records)
    assert code != 0 and "output 'upper', row 1" in stderr and "NUL byte" in stderr and "parquet" in stderr, stderr
    assert not (tmp_path / "out.hdf5").exists()
    code, stderr = _job(tmp_path, "parquet", records)
    assert code == 0, stderr
    assert pq.read_table(tmp_path / "out.parquet").column("upper").to_pylist() == [b"AB", b"C\0D"]


def test_a_part_keeps_bytes_of_any_shape_and_refuses_stored_addresses(tmp_path):
    values = np.empty((3, 2), dtype=object)
    values[:] = [[b"", b"x"], [b"\0\xff", "é"], [b"abc" * 100, b"q"]]
    write_part(tmp_path / "p.part", {"words": values, "ok": np.ones(3, bool)}, {"ids": np.array(["1", "2", "3"])})
    with Part(tmp_path / "p.part") as part:
        assert part.names == ["words", "ok"]
        back = part.array("words")
        assert back.shape == (3, 2) and back.dtype == object
        assert back.tolist() == [[b"", b"x"], [b"\0\xff", "é".encode()], [b"abc" * 100, b"q"]]
        assert part.strings("ids").tolist() == ["1", "2", "3"]
    # What the old code wrote: the object array's buffer under its own dtype
    pieces = encode_part({"ok": np.ones(3, bool)}, {})
    header = pieces[0].replace(b'"dtype": "|b1"', b'"dtype": "|O" ')  # same length
    (tmp_path / "old.part").write_bytes(header + b"".join(bytes(p) for p in pieces[1:]))
    with pytest.raises(CorruptPart, match="--restart"):
        Part(tmp_path / "old.part", verify=False)
