""".h5ad inputs as anndata writes them (today's encoding and the one before 0.7; X dense, CSR,
CSC; raw), and gene alignment to a model's declared feature list, through `tensorfleet run`."""

from __future__ import annotations

import importlib.util
import json
import warnings

import anndata
import numpy as np
import pytest
import scipy.sparse

from tensorfleet.coordinator.io.readers import open_reader
from tensorfleet.coordinator.spec import InputSpec

from .h5ad_files import expression, write_current, write_pre_0_7
from .helpers import MODELS, run_tensorfleet, write_job

MODEL_GENES = (MODELS / "genes" / "genes.txt").read_text().split()


def genes_model():
    spec = importlib.util.spec_from_file_location("coordinator_test_genes", MODELS / "genes" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Model()
    model.load(None)
    return model


def servers_model(servers) -> dict:
    return {"name": "genes", "servers": [s.address for s in servers]}


def dense(matrix) -> np.ndarray:
    return np.asarray(matrix.toarray() if scipy.sparse.issparse(matrix) else matrix)


def read_quietly(path) -> anndata.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anndata.read_h5ad(path)


def run_aligned(tmp_path, servers, *, chunk_rows: int, batch_rows: int) -> anndata.AnnData:
    """`tensorfleet run` over tmp_path/cells.h5ad into out.h5ad: every gene found; the output."""
    job = write_job(
        tmp_path / "job.yaml", input={"path": "cells.h5ad"}, model=servers_model(servers),
        output={"path": "out.h5ad"}, chunking={"chunk_rows": chunk_rows, "batch_rows": batch_rows},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    assert "aligned: 20/20 model features found in var_names (100.0%)" in result.stdout
    return read_quietly(tmp_path / "out.h5ad")


WRITERS = {
    "pre-0.7 dense": lambda path, x, genes: write_pre_0_7(path, x, genes),
    "pre-0.7 csr": lambda path, x, genes: write_pre_0_7(path, x, genes, sparse=True),
    "current dense": lambda path, x, genes: write_current(path, x, genes, "dense"),
    "current csr": lambda path, x, genes: write_current(path, x, genes, "csr"),
    "current csc": lambda path, x, genes: write_current(path, x, genes, "csc"),
}


@pytest.mark.parametrize("encoding", sorted(WRITERS))
def test_a_job_over_any_encoding_keeps_every_slot_and_adds_the_embedding(tmp_path, servers, encoding):
    x = expression(45, MODEL_GENES, seed=2)
    source = tmp_path / "cells.h5ad"
    WRITERS[encoding](source, x, MODEL_GENES)
    before = read_quietly(source)
    after = run_aligned(tmp_path, servers, chunk_rows=16, batch_rows=8)
    assert list(after.obs_names) == list(before.obs_names)
    assert list(after.var_names) == list(before.var_names)
    assert after.obs["cell_type"].tolist() == before.obs["cell_type"].tolist()
    assert after.obs["tensorfleet_ok"].all()
    np.testing.assert_array_equal(after.var["gene_ids"], before.var["gene_ids"])
    np.testing.assert_array_equal(dense(after.X), dense(before.X))
    np.testing.assert_array_equal(dense(after.raw.X), dense(before.raw.X))
    np.testing.assert_array_equal(after.obsm["X_pca"], before.obsm["X_pca"])
    assert after.uns["title"] == before.uns["title"]
    for key in before.obsp:
        np.testing.assert_array_equal(dense(after.obsp[key]), dense(before.obsp[key]))
    for key in before.layers:
        np.testing.assert_array_equal(dense(after.layers[key]), dense(before.layers[key]))
    if "params" in before.uns:
        assert after.uns["params"]["k"] == before.uns["params"]["k"]
    want = genes_model().predict({"expression": x})["embedding"]
    np.testing.assert_array_equal(after.obsm["embedding"], want)
    provenance = after.uns["tensorfleet"]["provenance"]
    assert provenance["alignment_coverage"] == 1.0 and provenance["model_name"] == "genes"


def test_raw_x_feeds_the_model_with_raw_var_names(tmp_path, servers):
    x = expression(12, MODEL_GENES, seed=3)
    write_current(tmp_path / "cells.h5ad", x, MODEL_GENES, "csr")  # raw.X holds the same counts
    job = write_job(
        tmp_path / "job.yaml", input={"path": "cells.h5ad", "tensors": {"expression": "raw/X"}},
        model=servers_model(servers), output={"path": "out.parquet"},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out.parquet")
    np.testing.assert_array_equal(
        np.array(table.column("embedding").to_pylist(), dtype=np.float32), genes_model().predict({"expression": x})["embedding"]
    )


def test_shuffled_genes_with_ten_percent_missing_give_the_aligned_predictions(tmp_path, servers):
    rng = np.random.default_rng(11)
    missing = set(rng.choice(MODEL_GENES, size=2, replace=False).tolist())  # 10% of 20
    query_genes = [g for g in MODEL_GENES if g not in missing] + ["EXTRA1", "EXTRA2", "EXTRA3"]
    query_genes = [query_genes[i] for i in rng.permutation(len(query_genes))]
    x = expression(40, query_genes, seed=4)
    write_current(tmp_path / "query.h5ad", x, query_genes, "csr", raw=False)
    job = write_job(
        tmp_path / "job.yaml", input={"path": "query.h5ad", "align": {"fill_value": 0.0, "min_coverage": 0.8}},
        model=servers_model(servers), output={"path": "out.h5ad"}, chunking={"chunk_rows": 16},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    assert "aligned: 18/20 model features found in var_names (90.0%); 2 missing filled with 0" in result.stdout
    assert "3 input genes not in the model dropped" in result.stdout

    aligned = np.zeros((len(x), len(MODEL_GENES)), dtype=np.float32)  # built here, by name, independently
    for j, gene in enumerate(MODEL_GENES):
        if gene in query_genes:
            aligned[:, j] = x[:, query_genes.index(gene)]
    want = genes_model().predict({"expression": aligned})["embedding"]
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(out.obsm["embedding"], want)
    unaligned = genes_model().predict({"expression": x[:, :20]})["embedding"]
    assert not np.allclose(unaligned, want)  # fed as is, the numbers would differ
    provenance = out.uns["tensorfleet"]["provenance"]
    assert provenance["alignment_missing"] == 2 and provenance["alignment_dropped"] == 3
    assert provenance["alignment_coverage"] == pytest.approx(0.9)


def test_alignment_by_a_var_column(tmp_path, servers):
    symbols = [f"sym{i}" for i in range(20)]
    x = expression(10, symbols, seed=6)
    adata = anndata.AnnData(X=x, var={"gene": MODEL_GENES[::-1]})
    adata.var_names = symbols
    adata.write_h5ad(tmp_path / "q.h5ad")
    job = write_job(
        tmp_path / "job.yaml", input={"path": "q.h5ad", "align": {"var_column": "gene"}},
        model=servers_model(servers), output={"path": "out.h5ad"},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    want = genes_model().predict({"expression": x[:, ::-1].copy()})["embedding"]
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "out.h5ad").obsm["embedding"], want)


def test_below_minimum_coverage_the_job_exits_2_naming_the_missing_genes(tmp_path, servers):
    query_genes = MODEL_GENES[:5] + ["OTHER1", "OTHER2"]
    write_current(tmp_path / "q.h5ad", expression(6, query_genes), query_genes, "dense", raw=False)
    job = write_job(
        tmp_path / "job.yaml", input={"path": "q.h5ad", "align": {"min_coverage": 0.5}},
        model=servers_model(servers), output={"path": "out.h5ad"},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cover 5 of model 'genes''s 20 features (25.0%), below input.align.min_coverage 0.5" in result.stderr
    assert "15 missing, e.g. GENE5, GENE6, GENE7" in result.stderr
    assert not (tmp_path / "out.h5ad").exists()


def test_dry_run_with_a_local_repository_reads_the_feature_list_from_the_model_folder(tmp_path):
    query_genes = list(reversed(MODEL_GENES))
    write_current(tmp_path / "q.h5ad", expression(6, query_genes), query_genes, "dense", raw=False)
    job = write_job(
        tmp_path / "job.yaml", input={"path": "q.h5ad"},
        model={"name": "genes", "local": {"repository": str(MODELS)}}, output={"path": "out.h5ad"},
    )
    result = run_tensorfleet("run", job, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "aligned: 20/20 model features found in var_names" in result.stdout


def test_the_server_tells_its_feature_list_in_model_config(servers):
    from tensorfleet.client import InferenceClient

    with InferenceClient(servers[0].address) as client:
        parameters = client.model_config("genes").parameters
        seqlen = client.model_config("seqlen").parameters
    assert parameters["features"].string_value.split("\n") == MODEL_GENES
    assert parameters["features_input"].string_value == "expression"
    assert seqlen["max_length.sequence"].string_value == "40"


def test_csc_rows_are_read_in_blocks_that_match_the_matrix(tmp_path, monkeypatch):
    from tensorfleet.coordinator.io.readers import h5ad as h5ad_reader

    x = expression(50, MODEL_GENES, seed=9)
    write_current(tmp_path / "c.h5ad", x, MODEL_GENES, "csc", raw=False)
    monkeypatch.setattr(h5ad_reader, "CSC_BLOCK_BYTES", 12 * 40)  # a few rows per block
    monkeypatch.setattr(h5ad_reader, "_CSC_COLUMNS", 3)
    with open_reader(InputSpec(path=str(tmp_path / "c.h5ad"))) as reader:
        for start, stop in [(0, 7), (7, 9), (3, 30), (44, 50), (0, 50)]:
            np.testing.assert_array_equal(reader.read("X", start, stop), x[start:stop])
        assert json.dumps(list(reader.feature_names("X"))) == json.dumps(MODEL_GENES)


def test_an_h5ad_to_h5ad_job_refuses_to_rename_or_drop_obs(tmp_path):
    from tensorfleet.coordinator.spec import SpecError, parse_spec

    for policy in ("suffix", "first"):
        with pytest.raises(SpecError, match=f"input.duplicate_ids '{policy}': an .h5ad output keeps the input's obs names"):
            parse_spec({
                "input": {"path": "a.h5ad", "duplicate_ids": policy},
                "model": {"name": "genes", "servers": ["127.0.0.1:1"]}, "output": {"path": "b.h5ad"},
            })
    parse_spec({
        "input": {"path": "a.h5ad", "duplicate_ids": "first"},
        "model": {"name": "genes", "servers": ["127.0.0.1:1"]}, "output": {"path": "b.parquet"},
    })


OLD_FILES = sorted((MODELS.parent / "data" / "old_anndata").glob("*.h5ad"))


@pytest.mark.parametrize("source", OLD_FILES, ids=[path.stem for path in OLD_FILES])
def test_files_written_by_anndata_0_6_and_0_7_themselves(tmp_path, servers, source):
    """Not re-creations: these files were written by anndata 0.6.22 and 0.7.8 (see make.py
    beside them), with the model's genes in reverse order. Every slot survives; the embedding
    is the aligned one."""
    assert len(OLD_FILES) == 6
    (tmp_path / "cells.h5ad").write_bytes(source.read_bytes())
    before = read_quietly(source)
    after = run_aligned(tmp_path, servers, chunk_rows=10, batch_rows=4)
    assert list(after.obs_names) == list(before.obs_names)
    assert list(after.var_names) == list(before.var_names) == MODEL_GENES[::-1]
    assert after.obs["cell_type"].tolist() == before.obs["cell_type"].tolist()
    np.testing.assert_array_equal(after.obs["n_counts"], before.obs["n_counts"])
    np.testing.assert_array_equal(dense(after.X), dense(before.X))
    np.testing.assert_array_equal(dense(after.raw.X), dense(before.raw.X))
    np.testing.assert_array_equal(dense(after.layers["counts"]), dense(before.layers["counts"]))
    np.testing.assert_array_equal(after.obsm["X_pca"], before.obsm["X_pca"])
    assert after.uns["title"] == "atlas"
    aligned = dense(before.X)[:, ::-1]  # the file's genes are the model's, reversed
    np.testing.assert_array_equal(after.obsm["embedding"], genes_model().predict({"expression": aligned})["embedding"])
