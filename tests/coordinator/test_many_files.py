"""Many input files, one job (issue 27 item 3): `input.path` as a glob or a list of FASTA or .h5ad
files, each row's file kept in `source_file`; `output.per_file: true` (one output per file); resume
after kill -9 identical to an uninterrupted run; a file added after a partial run refused."""

from __future__ import annotations

import shutil
import signal
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from .h5ad_files import expression
from .helpers import MODELS, make_fasta, run_tensorfleet, write_job
from .test_run import load_test_model

MODEL_GENES = (MODELS / "genes" / "genes.txt").read_text().split()


def _samples(folder: Path, sizes=(30, 45, 25)) -> dict[str, list[tuple[str, str]]]:
    """FASTA files s1..s3 with distinct ids (sN_seqK): file name -> its records."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for index, rows in enumerate(sizes, start=1):
        path = folder / f"s{index}.fasta"
        records = make_fasta(path, rows, seed=index)
        text = path.read_text().replace(">seq", f">s{index}_seq")
        path.write_text(text)
        out[path.name] = [(f"s{index}_{name}", sequence) for name, sequence in records]
    return out


def _model(servers) -> dict:
    return {"name": "embed", "servers": [s.address for s in servers]}


def _table(path: Path):
    """The output's rows without its provenance (which names the run's time and folders)."""
    return pq.read_table(path).replace_schema_metadata(None)


def _expected(records: list[tuple[str, str]]) -> np.ndarray:
    sequences = np.array([sequence.encode() for _, sequence in records], dtype=object)
    return load_test_model("embed").predict({"sequence": sequences})["embedding"]


def test_a_glob_of_three_fasta_files_is_one_job_in_file_order_with_each_rows_file(tmp_path, servers):
    samples = _samples(tmp_path / "samples")
    job = write_job(tmp_path / "job.yaml", input={"path": "samples/s*.fasta"}, model=_model(servers),
                    output={"path": "out.parquet"}, chunking={"chunk_rows": 16, "batch_rows": 8})
    dry = run_tensorfleet("run", job, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "rows: 100" in dry.stdout and dry.stdout.count("input: ") == 3, dry.stdout
    done = run_tensorfleet("run", job)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "out.parquet")
    records = [record for name in sorted(samples) for record in samples[name]]
    assert table.column("id").to_pylist() == [key for key, _ in records]
    assert table.column("source_file").to_pylist() == [name for name in sorted(samples) for _ in samples[name]]
    served = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(served, _expected(records), rtol=1e-5, atol=1e-6)


def test_a_list_with_an_id_repeated_across_files_fails_before_compute_naming_both_files(tmp_path, servers):
    folder = tmp_path / "samples"
    folder.mkdir()
    make_fasta(folder / "a.fasta", 5, seed=1)
    make_fasta(folder / "b.fasta", 5, seed=2)  # the same ids seq0..seq4
    job = write_job(tmp_path / "job.yaml", input={"path": ["samples/a.fasta", "samples/b.fasta"]},
                    model=_model(servers), output={"path": "out.h5"})
    refused = run_tensorfleet("run", job)
    assert refused.returncode == 2, refused.stderr
    assert "'seq0' at rows [0, 5] (in a.fasta record 1" in refused.stderr and "b.fasta record 1" in refused.stderr
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.tfjob").exists()
    suffixed = write_job(tmp_path / "suffix.yaml", input={"path": ["samples/a.fasta", "samples/b.fasta"],
                                                          "duplicate_ids": "suffix"},
                         model=_model(servers), output={"path": "suffixed.parquet"})
    assert run_tensorfleet("run", suffixed).returncode == 0
    assert pq.read_table(tmp_path / "suffixed.parquet").column("id").to_pylist()[4:7] == ["seq4", "seq0-1", "seq1-1"]


def test_inputs_that_cannot_be_one_job_are_refused_naming_the_field(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    make_fasta(folder / "a.fasta", 3)
    (folder / "b.parquet").write_bytes(b"")
    model = {"name": "embed", "local": {"repository": str(MODELS)}}
    for path, message in (("samples/*.fa", "matches no file"),
                          (["samples/a.fasta", "samples/b.parquet"], "one job reads files of one format"),
                          (["samples/a.fasta", "samples/a.fasta"], "more than once"),
                          ([], "empty list")):
        job = write_job(tmp_path / "job.yaml", input={"path": path}, model=model, output={"path": "out.h5"})
        refused = run_tensorfleet("run", job, "--dry-run")
        assert refused.returncode == 2 and "input.path" in refused.stderr and message in refused.stderr, refused.stderr


def _per_file_job(tmp_path: Path, name: str, servers, samples_from: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(samples_from, folder / "samples")
    return write_job(folder / "job.yaml", input={"path": "samples/*.fasta"}, model=_model(servers),
                     output={"path": "out", "format": "parquet", "per_file": True},
                     chunking={"chunk_rows": 8, "batch_rows": 4})


def test_per_file_writes_one_output_per_file_and_a_kill_9_resume_is_identical(tmp_path, servers):
    samples = _samples(tmp_path / "samples")
    reference = _per_file_job(tmp_path, "reference", servers, tmp_path / "samples")
    done = run_tensorfleet("run", reference)
    assert done.returncode == 0, done.stderr
    outputs = sorted((reference.parent / "out").glob("*.parquet"))
    assert [p.name for p in outputs] == ["s1.parquet", "s2.parquet", "s3.parquet"]
    for path in outputs:
        records = samples[path.stem + ".fasta"]
        table = pq.read_table(path)
        assert table.column("id").to_pylist() == [key for key, _ in records]
        np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                                   _expected(records), rtol=1e-5, atol=1e-6)

    job = _per_file_job(tmp_path, "killed", servers, tmp_path / "samples")
    crashed = run_tensorfleet("run", job, env={"TENSORFLEET_CRASH_AT": "part_renamed:6"})  # s1 has 4 chunks: in s2
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    out = job.parent / "out"
    assert (out / "s1.parquet").is_file() and not (out / "s2.parquet").exists()
    status = run_tensorfleet("status", job.parent / "out.tfjob")
    assert "kind: per file" in status.stdout and "s1.fasta: done" in status.stdout, status.stdout

    (job.parent / "samples" / "s4.fasta").write_text(">late\nACDE\n")  # a file added after the partial run
    refused = run_tensorfleet("run", job)
    assert refused.returncode == 2 and "input.path" in refused.stderr and "s4.fasta" in refused.stderr, refused.stderr
    (job.parent / "samples" / "s4.fasta").unlink()

    resumed = run_tensorfleet("run", job)
    assert resumed.returncode == 0, resumed.stderr
    for path in outputs:
        assert _table(out / path.name).equals(_table(path)), path.name


def test_a_kill_9_resume_of_a_many_file_job_is_identical_and_a_changed_file_is_refused(tmp_path, servers):
    _samples(tmp_path / "samples")
    model = _model(servers)
    chunking = {"chunk_rows": 8, "batch_rows": 4}
    reference = write_job(tmp_path / "reference.yaml", input={"path": "samples/*.fasta"}, model=model,
                          output={"path": "reference.parquet"}, chunking=chunking)
    assert run_tensorfleet("run", reference).returncode == 0
    job = write_job(tmp_path / "job.yaml", input={"path": "samples/*.fasta"}, model=model,
                    output={"path": "out.parquet"}, chunking=chunking)
    crashed = run_tensorfleet("run", job, env={"TENSORFLEET_CRASH_AT": "part_renamed:7"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    second = tmp_path / "samples" / "s2.fasta"
    original = second.read_text()
    second.write_text(original.replace("s2_seq0 ", "s2_seqX ", 1))
    refused = run_tensorfleet("run", job)
    assert refused.returncode == 2 and "s2.fasta changed" in refused.stderr, refused.stderr
    second.write_text(original)
    resumed = run_tensorfleet("run", job)
    assert resumed.returncode == 0, resumed.stderr
    assert _table(tmp_path / "out.parquet").equals(_table(tmp_path / "reference.parquet"))


def _write_sample(path: Path, index: int, rows: int) -> anndata.AnnData:
    """An .h5ad sample as anndata writes it: the model's genes, obs of its own beside a shared column."""
    x = expression(rows, MODEL_GENES, seed=index)
    obs = pd.DataFrame({"cell_type": pd.Categorical(["T", "B"] * (rows // 2) + ["T"] * (rows % 2)),
                        f"only_in_sample{index}": np.arange(rows) * index},
                       index=[f"sample{index}_cell{i}" for i in range(rows)])
    adata = anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=MODEL_GENES))
    adata.write_h5ad(path)
    return adata


def _genes_embedding(x: np.ndarray) -> np.ndarray:
    return load_test_model("genes").predict({"expression": x.astype(np.float32)})["embedding"]


def test_three_h5ad_samples_with_different_obs_make_one_h5ad_resumed_identically_and_per_file_three(tmp_path, servers):
    folder = tmp_path / "samples"
    folder.mkdir()
    samples = [_write_sample(folder / f"sample{i}.h5ad", i, rows) for i, rows in ((1, 20), (2, 33), (3, 15))]
    model = {"name": "genes", "servers": [s.address for s in servers]}
    job = write_job(tmp_path / "job.yaml", input={"path": "samples/*.h5ad"}, model=model,
                    output={"path": "cells.h5ad"}, chunking={"chunk_rows": 16})
    done = run_tensorfleet("run", job)
    assert done.returncode == 0, done.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = anndata.read_h5ad(tmp_path / "cells.h5ad")
    assert list(merged.obs_names) == [name for sample in samples for name in sample.obs_names]
    assert list(merged.obs["source_file"]) == [f"sample{i}.h5ad" for i, rows in ((1, 20), (2, 33), (3, 15))
                                               for _ in range(rows)]
    # the obs columns every sample has are kept; a column of one sample only is not
    assert "cell_type" in merged.obs and not any(c.startswith("only_in_sample") for c in merged.obs.columns)
    x = np.concatenate([np.asarray(sample.X) for sample in samples])
    np.testing.assert_allclose(np.asarray(merged.X), x)
    np.testing.assert_allclose(merged.obsm["embedding"], _genes_embedding(x), rtol=1e-5, atol=1e-6)
    assert merged.obs["tensorfleet_ok"].all()

    killed = write_job(tmp_path / "killed.yaml", input={"path": "samples/*.h5ad"}, model=model,
                       output={"path": "killed.h5ad"}, chunking={"chunk_rows": 16})
    crashed = run_tensorfleet("run", killed, env={"TENSORFLEET_CRASH_AT": "part_renamed:3"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    resumed = run_tensorfleet("run", killed)
    assert resumed.returncode == 0, resumed.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = anndata.read_h5ad(tmp_path / "killed.h5ad")
    assert list(again.obs_names) == list(merged.obs_names) and list(again.var_names) == list(merged.var_names)
    assert again.obsm["embedding"].tobytes() == merged.obsm["embedding"].tobytes()
    assert np.asarray(again.X).tobytes() == np.asarray(merged.X).tobytes()
    assert again.obs.equals(merged.obs)

    per_file = write_job(tmp_path / "per_file.yaml", input={"path": "samples/*.h5ad"}, model=model,
                         output={"path": "per_sample", "format": "h5ad", "per_file": True})
    done = run_tensorfleet("run", per_file)
    assert done.returncode == 0, done.stderr
    for index, sample in enumerate(samples, start=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            own = anndata.read_h5ad(tmp_path / "per_sample" / f"sample{index}.h5ad")
        assert list(own.obs_names) == list(sample.obs_names)
        assert f"only_in_sample{index}" in own.obs  # each sample keeps its own obs
        np.testing.assert_allclose(own.obsm["embedding"], _genes_embedding(np.asarray(sample.X)), rtol=1e-5, atol=1e-6)


def test_per_file_refuses_two_files_that_would_write_the_same_output(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        make_fasta(tmp_path / name / "same.fasta", 3)
    job = write_job(tmp_path / "job.yaml", input={"path": ["a/same.fasta", "b/same.fasta"], "duplicate_ids": "suffix"},
                    model={"name": "embed", "local": {"repository": str(MODELS)}},
                    output={"path": "out", "format": "parquet", "per_file": True})
    refused = run_tensorfleet("run", job, "--dry-run")
    assert refused.returncode == 2 and "would both write" in refused.stderr, refused.stderr
    no_format = write_job(tmp_path / "job2.yaml", input={"path": "a/same.fasta"},
                          model={"name": "embed", "local": {"repository": str(MODELS)}},
                          output={"path": "out", "per_file": True})
    refused = run_tensorfleet("run", no_format, "--dry-run")
    assert refused.returncode == 2 and "set output.format" in refused.stderr, refused.stderr


@pytest.mark.parametrize("fmt", ["csv", "hdf5"])
def test_source_file_is_kept_by_table_and_hdf5_outputs(tmp_path, servers, fmt):
    samples = _samples(tmp_path / "samples", sizes=(4, 3))
    job = write_job(tmp_path / "job.yaml", input={"path": "samples/*.fasta"}, model=_model(servers),
                    output={"path": f"out.{'csv' if fmt == 'csv' else 'h5'}"})
    assert run_tensorfleet("run", job).returncode == 0
    expected = [name for name in sorted(samples) for _ in samples[name]]
    if fmt == "csv":
        assert pd.read_csv(tmp_path / "out.csv")["source_file"].tolist() == expected
    else:
        import h5py

        with h5py.File(tmp_path / "out.h5") as f:
            assert [v.decode() for v in f["source_file"][:]] == expected
