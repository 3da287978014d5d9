"""The models x sources job's one table with models of differing widths (sheet_table.py), on part
files as the merge writes them (parquet, fixed-size list columns, provenance in the metadata)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tensorfleet.coordinator.spec.errors import JobFatal
from tensorfleet.coordinator.workflows.sheet_table import unified_type, write_table


def _rows_file(path, model: str, width: int, rows: int, dtype=np.float32):
    values = np.arange(rows * width, dtype=dtype).reshape(rows, width) + width
    table = pa.table({
        "id": [f"r{i}" for i in range(rows)],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width),
        "ok": [True] * rows,
        "error": [""] * rows,
    }).replace_schema_metadata({b"tensorfleet": json.dumps({"model_name": model}).encode()})
    pq.write_table(table, path)
    return values


def test_widths_32_and_64_share_one_list_column_each_row_its_own_models_width(tmp_path):
    wide = _rows_file(tmp_path / "wide.parquet", "embed_small", 64, 5)
    narrow = _rows_file(tmp_path / "narrow.parquet", "embed_tiny", 32, 3)
    same = _rows_file(tmp_path / "narrow2.parquet", "embed_tiny", 32, 2)
    sheet = tmp_path / "out" / "job.parquet"
    keys = [("model", ["embed_small", "embed_tiny", "embed_tiny"]), ("source", ["a", "a", "b"])]
    write_table(sheet, keys, [tmp_path / "wide.parquet", tmp_path / "narrow.parquet", tmp_path / "narrow2.parquet"])
    table = pq.read_table(sheet)
    assert table.column_names == ["model", "source", "id", "embedding", "ok", "error"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert table.column("model").to_pylist() == ["embed_small"] * 5 + ["embed_tiny"] * 5
    rows = table.column("embedding").to_pylist()
    np.testing.assert_array_equal(np.array(rows[:5], dtype=np.float32), wide)
    np.testing.assert_array_equal(np.array(rows[5:], dtype=np.float32), np.concatenate([narrow, same]))
    provenance = json.loads(table.schema.metadata[b"tensorfleet"])
    assert [p["model_name"] for p in provenance["parts"]] == ["embed_small", "embed_tiny", "embed_tiny"]
    assert provenance["models"] == ["embed_small", "embed_tiny"] and provenance["sources"] == ["a", "b"]


def test_equal_widths_keep_the_fixed_size_list_and_other_types_widen_or_fail(tmp_path):
    _rows_file(tmp_path / "a.parquet", "m1", 8, 2)
    _rows_file(tmp_path / "b.parquet", "m2", 8, 2, dtype=np.float16)
    write_table(tmp_path / "t.parquet", [("model", ["m1", "m2"])], [tmp_path / "a.parquet", tmp_path / "b.parquet"])
    # float16 beside float32 of one width: float32, still a fixed-size list of that width
    assert pq.read_schema(tmp_path / "t.parquet").field("embedding").type == pa.list_(pa.float32(), 8)
    assert unified_type("x", [pa.list_(pa.float16(), 4), pa.list_(pa.float32(), 6)]) == pa.list_(pa.float32())
    with pytest.raises(JobFatal, match="column 'x'"):
        unified_type("x", [pa.list_(pa.float32(), 4), pa.string()])
