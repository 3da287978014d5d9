"""A models x sources job driven by one table split by a column (`sources[].group_by`), into one
table of models whose widths differ (vec8's `y` is 4 wide, scaled's 8): real local servers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .helpers import local_model, run_tensorfleet
from .test_run import load_test_model

COLUMNS = ",".join(f"x{i}" for i in range(8))


def _table(path, sources: list[str]) -> np.ndarray:
    """A CSV of rows x0..x7 with an id and a source column; the rows' values."""
    x = np.random.default_rng(5).standard_normal((len(sources), 8)).astype(np.float32)
    lines = ["id,source," + COLUMNS]
    lines += [f"r{i},{source}," + ",".join(f"{v:.6f}" for v in row) for i, (source, row) in enumerate(zip(sources, x, strict=True))]
    path.write_text("\n".join(lines) + "\n")
    return np.array([[float(f"{v:.6f}") for v in row] for row in x], dtype=np.float32)


def _job(tmp_path, **changes):
    spec = {
        "name": "groups",
        "sources": [{"path": "table.csv", "group_by": "source", "ids": "id", "tensors": {"x": COLUMNS}}],
        "models": [{**local_model("vec8"), "outputs": {"y": "y"}},
                   {**local_model("scaled"), "outputs": {"y": "y"}, "sources": ["a"]}],
        "output": {"dir": "out", "layout": "one_table"},
        "chunking": {"chunk_rows": 4},
    }
    spec.update(changes)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_one_csv_split_by_its_source_column_into_one_table_of_two_widths(tmp_path):
    sources = ["b", "a", "b", "b", "a", "c", "a", "b", "c", "a"]
    x = _table(tmp_path / "table.csv", sources)
    done = run_tensorfleet("run", _job(tmp_path))
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "out" / "groups.parquet")
    order = {"b": [], "a": [], "c": []}  # groups in order of first appearance, rows in file order
    for row, source in enumerate(sources):
        order[source].append(row)
    keys = list(zip(table.column("model").to_pylist(), table.column("source").to_pylist(), strict=True))
    assert keys == [("vec8", s) for s in "bac" for _ in order[s]] + [("scaled", "a")] * 4
    rows = [row for s in "bac" for row in order[s]] + order["a"]
    assert table.column("id").to_pylist() == [f"r{row}" for row in rows]
    assert table.schema.field("y").type == pa.list_(pa.float32())  # 4 and 8 wide
    y = table.column("y").to_pylist()
    vec8 = load_test_model("vec8").predict({"x": x})["y"]
    np.testing.assert_allclose(np.array(y[:10], dtype=np.float32), vec8[rows[:10]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(y[10:], dtype=np.float32), x[order["a"]], rtol=1e-6)
    status = run_tensorfleet("status", tmp_path / "out" / ".groups.tfjob")
    assert "model scaled source a (scaled): done" in status.stdout, status.stdout


def test_group_by_mistakes_are_exit_2_before_any_server(tmp_path):
    _table(tmp_path / "table.csv", ["a", "b", "a"])
    cases = [
        ({"sources": [{"path": "table.csv", "group_by": "kind", "ids": "id", "tensors": {"x": COLUMNS}}]},
         "has no column 'kind'"),
        ({"models": [{**local_model("vec8"), "outputs": {"y": "y"}, "sources": ["z"]}]}, "sources ['z']"),
        ({"sources": [{"path": "table.csv", "group_by": "id", "group": "r9", "ids": "id", "tensors": {"x": COLUMNS}}],
          "models": [{**local_model("vec8"), "outputs": {"y": "y"}}]}, "no row of"),
    ]
    for changes, words in cases:
        refused = run_tensorfleet("run", _job(tmp_path, **changes))
        assert refused.returncode == 2 and words in refused.stderr, (words, refused.stderr)
        assert not list(tmp_path.glob("out/.groups.tfjob/*/servers")), "no server started"
    (tmp_path / "table.csv").write_text("id,source," + COLUMNS + "\nr0,a b," + ",".join(["0"] * 8) + "\n")
    refused = run_tensorfleet("run", _job(tmp_path))
    assert refused.returncode == 2 and "cannot label a source" in refused.stderr, refused.stderr
