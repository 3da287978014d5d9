"""Workload 4 (epistasis): two models over two sources, one parquet sheet per model; or one table
for the job (the models' widths differ), from FASTA files or one TSV split by its source column.

Each sheet is compared with the same model run in this process on the same sequences.
Tolerance: 1e-4 absolute (float32; the server pads each batch to its own width, and the
masked mean over a different padding length reorders the sums).
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from .helpers import REPO_ROOT, run_tensorfleet, write_yaml

sys.path.insert(0, str(REPO_ROOT))
from examples.epistasis import build  # noqa: E402
from examples.protein.inprocess import load_python_model  # noqa: E402


def read_fasta(path) -> list[tuple[str, str]]:
    lines = path.read_text().split()
    return [(lines[i][1:], lines[i + 1]) for i in range(0, len(lines), 2)]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("epistasis")
    build.build_models(root / "models")
    build.build_data(root / "data", singles=12, doubles=20)
    model = {"local": {"repository": "models"}, "outputs": {"embedding": "embedding"}}
    job = write_yaml(root / "epistasis.yaml", {
        "name": "epistasis",
        "sources": [{"name": "singles", "path": "data/singles.fasta"}, {"name": "doubles", "path": "data/doubles.fasta"}],
        "models": [{"name": "embed_small", "batch_rows": 8, **model}, {"name": "embed_tiny", "batch_rows": 3, **model}],
        "output": {"dir": "sheets"},
        "chunking": {"chunk_rows": 10},
    })
    return root, job


def test_one_sheet_per_model_with_the_same_columns_matching_in_process(example):
    root, job = example
    done = run_tensorfleet("run", job)
    assert done.returncode == 0, done.stderr
    records = {label: read_fasta(root / "data" / f"{label}.fasta") for label in ("singles", "doubles")}
    columns = None
    for name, dim in (("embed_small", 64), ("embed_tiny", 32)):
        table = pq.read_table(root / "sheets" / f"{name}.parquet")
        columns = columns or table.column_names
        # truncated: the models declare max_length, so input.over_length (truncate) says which rows were cut
        assert table.column_names == columns == ["source", "id", "embedding", "truncated", "ok", "error"]
        assert table.column("source").to_pylist() == ["singles"] * 13 + ["doubles"] * 20
        expected_ids = [key for label in ("singles", "doubles") for key, _ in records[label]]
        assert table.column("id").to_pylist() == expected_ids
        served = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        assert served.shape == (33, dim)
        model = load_python_model(root / "models" / name)
        sequences = np.array([seq.encode() for label in ("singles", "doubles") for _, seq in records[label]], dtype=object)
        np.testing.assert_allclose(served, model.predict({"sequence": sequences})["embedding"], atol=1e-4)


def test_limit_is_a_smoke_test_with_its_own_sheets_and_dry_run_writes_nothing(example):
    root, job = example
    dry = run_tensorfleet("run", job, "--dry-run", "--job-dir", root / "dry")
    assert dry.returncode == 0, dry.stderr
    assert "2 models x 2 sources" in dry.stdout
    assert "source doubles" in dry.stdout and "requests: 8 (at most 3 rows" in dry.stdout
    assert not (root / "dry").exists()
    limited = run_tensorfleet("run", job, "--limit", "4")
    assert limited.returncode == 0, limited.stderr
    for name in ("embed_small", "embed_tiny"):
        table = pq.read_table(root / "sheets" / f"{name}.limit4.parquet")
        assert table.column("source").to_pylist() == ["singles"] * 4 + ["doubles"] * 4


def _served_by_model(table, name: str) -> np.ndarray:
    rows = [i for i, model in enumerate(table.column("model").to_pylist()) if model == name]
    return np.stack([np.asarray(v, dtype=np.float32) for v in table.column("embedding").take(rows).to_pylist()])


def test_the_example_in_one_table_keeps_each_models_width(example):
    """examples/epistasis itself with `layout: one_table`: widths 64 and 32 in one table (it
    crashed after all compute with pyarrow's 'Schema at index 2 was different')."""
    root, _ = example
    spec = yaml.safe_load((REPO_ROOT / "examples" / "epistasis" / "epistasis.yaml").read_text())
    spec["output"] = {"dir": "one_table", "layout": "one_table"}
    job = write_yaml(root / "one_table.yaml", spec)
    done = run_tensorfleet("run", job)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(root / "one_table" / "epistasis.parquet")
    assert table.column_names == ["model", "source", "id", "embedding", "truncated", "ok", "error"]
    assert pa.types.is_list(table.schema.field("embedding").type)  # a variable-length list: widths differ
    records = [seq for label in ("singles", "doubles") for _, seq in read_fasta(root / "data" / f"{label}.fasta")]
    sequences = np.array([seq.encode() for seq in records], dtype=object)
    for name, dim in (("embed_small", 64), ("embed_tiny", 32)):
        served = _served_by_model(table, name)
        assert served.shape == (33, dim)
        model = load_python_model(root / "models" / name)
        np.testing.assert_allclose(served, model.predict({"sequence": sequences})["embedding"], atol=1e-4)


def test_a_tsv_with_a_source_column_drives_the_models_x_sources_job(example):
    """examples/epistasis/epistasis-table.yaml: one TSV split by its `source` column, no file per source."""
    root, _ = example
    (root / "epistasis-table.yaml").write_text((REPO_ROOT / "examples" / "epistasis" / "epistasis-table.yaml").read_text())
    dry = run_tensorfleet("run", root / "epistasis-table.yaml", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "2 models x 2 sources" in dry.stdout and "source doubles" in dry.stdout, dry.stdout
    done = run_tensorfleet("run", root / "epistasis-table.yaml")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(root / "output" / "epistasis-table.parquet")
    keys = list(zip(table.column("model").to_pylist(), table.column("source").to_pylist(), strict=True))
    assert keys == [("embed_small", "singles")] * 13 + [("embed_small", "doubles")] * 20 + [("embed_tiny", "doubles")] * 20
    records = {label: read_fasta(root / "data" / f"{label}.fasta") for label in ("singles", "doubles")}
    assert table.column("id").to_pylist() == [k for label in ("singles", "doubles", "doubles") for k, _ in records[label]]
    for name, labels in (("embed_small", ("singles", "doubles")), ("embed_tiny", ("doubles",))):
        sequences = np.array([seq.encode() for label in labels for _, seq in records[label]], dtype=object)
        model = load_python_model(root / "models" / name)
        np.testing.assert_allclose(_served_by_model(table, name), model.predict({"sequence": sequences})["embedding"],
                                   atol=1e-4)
    again = run_tensorfleet("run", root / "epistasis-table.yaml")  # finished: no server, the same table
    assert again.returncode == 0, again.stderr
    assert pq.read_table(root / "output" / "epistasis-table.parquet").equals(table)


def test_models_whose_columns_differ_fail_before_any_compute(example):
    root, _ = example
    model = {"local": {"repository": "models"}}
    job = write_yaml(root / "differ.yaml", {
        "name": "differ",
        "sources": [{"name": "singles", "path": "data/singles.fasta"}],
        "models": [{"name": "embed_small", **model, "outputs": {"embedding": "small"}},
                   {"name": "embed_tiny", **model, "outputs": {"embedding": "tiny"}}],
        "output": {"dir": "differ", "layout": "one_table"},
    })
    refused = run_tensorfleet("run", job)
    assert refused.returncode == 2 and "map its outputs with models[].outputs" in refused.stderr, refused.stderr
    assert not (root / "differ" / ".differ.tfjob").exists(), "no server started, no job folder left"
