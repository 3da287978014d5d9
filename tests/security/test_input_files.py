"""Issue #28, findings 2, 3 and 8: input files built to read outside the data root, to crash the
engine, or to exhaust memory from a few KB on disk. Each runs `tensorfleet run` for real (a
local model server where the rows must be read for the attack to work) and expects a clear
error, exit 2, and nothing of the outside file in any output.

Valid baselines are written by anndata itself; the crafted files are built from them with h5py.
Memory is measured as the maximum RSS of the run's processes (getrusage of a wrapper process),
compared with a control run of the same command on a small file in the same test."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zlib
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import yaml

from tests.coordinator.helpers import MODELS, REPO_ROOT, run_tensorfleet

SECRET = b"TOPSECRET-outside-the-data-root-" * 4  # 128 bytes: 32 float32, or 2 rows of 16


def _model(local: bool, name: str) -> dict:
    if local:
        return {"name": name, "local": {"repository": str(MODELS), "count": 1}}
    return {"name": name, "servers": ["127.0.0.1:1"]}  # refused before any server is needed


def _job(folder: Path, input_spec: dict, *, model: str = "head16", local: bool = False, output: str = "out.h5") -> Path:
    spec = {"name": "hostile", "input": input_spec, "model": _model(local, model), "output": {"path": output},
            "policy": {"server_wait_s": 1}}
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    return folder / "job.yaml"


def _run(folder: Path, input_spec: dict, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return run_tensorfleet("run", _job(folder, input_spec, **kwargs), env=env, timeout=240)


def _outputs_hold(folder: Path, needle: bytes) -> list[str]:
    """Files under `folder` (outputs, job folders; not the outside folder) holding `needle`."""
    outside = folder / "outside"
    return [str(p) for p in folder.rglob("*")
            if p.is_file() and outside not in p.parents and needle in p.read_bytes()]


def _assert_refused(done: subprocess.CompletedProcess, folder: Path, *words: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, (word, done.stderr)
    assert not (folder / "out.h5").exists()
    assert not _outputs_hold(folder, SECRET[:16])


def _max_rss_run(job: Path, env: dict) -> tuple[subprocess.CompletedProcess, int]:
    """`tensorfleet run job` in a wrapper that reports the largest RSS of the processes it waited for (bytes)."""
    wrapper = ("import resource, subprocess, sys\n"
               "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stdout.write(done.stderr)\n"
               "sys.stderr.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
               "sys.exit(done.returncode)\n")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "tensorfleet.coordinator", "run", str(job)],
                          capture_output=True, text=True, timeout=240, env=full_env, cwd=REPO_ROOT)
    return subprocess.CompletedProcess(done.args, done.returncode, "", done.stdout), int(done.stderr.strip()) * 1024


# --- baselines anndata writes ---------------------------------------------------------------------------------

def _write_h5ad(path: Path, layout: str = "dense", rows: int = 2) -> np.ndarray:
    x = np.arange(rows * 16, dtype=np.float32).reshape(rows, 16) % 5
    x[:, ::3] = 0
    matrix = {"dense": x, "csr": scipy.sparse.csr_matrix(x), "csc": scipy.sparse.csc_matrix(x)}[layout]
    obs = pd.DataFrame({"batch": ["a"] * rows}, index=[f"cell{i}" for i in range(rows)])
    var = pd.DataFrame({"symbol": [f"S{i}" for i in range(16)]}, index=[f"g{i}" for i in range(16)])
    adata = anndata.AnnData(X=matrix, obs=obs, var=var)
    adata.uns["title"] = "atlas"
    adata.write_h5ad(path)
    return x


@pytest.mark.parametrize("layout", ["dense", "csr", "csc"])
def test_files_anndata_wrote_still_run(tmp_path, layout):
    """The control: the checks below refuse none of anndata's own encodings."""
    x = _write_h5ad(tmp_path / "in.h5ad", layout)
    done = _run(tmp_path, {"path": "in.h5ad", "tensors": {"x": "X"}}, local=True)
    assert done.returncode == 0, done.stderr
    spec = importlib.util.spec_from_file_location("security_head16", MODELS / "head16" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Model()
    model.load(None)
    with h5py.File(tmp_path / "out.h5") as out:
        np.testing.assert_allclose(out["y"][:], model.predict({"x": x})["y"], rtol=1e-6)


# --- #28.2: HDF5 and h5ad bytes that live outside the file ---------------------------------------------------

def _secret(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(SECRET)
    return outside / "secret.bin"


def test_hdf5_external_storage_outside_the_file_is_refused(tmp_path):
    """#28.2: a dataset whose raw bytes are another file. Before, the secret's bytes were read as
    rows, sent to the model and stored in the output."""
    secret = _secret(tmp_path)
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f.create_dataset("x", shape=(2, 16), dtype="f4", external=[(str(secret), 0, len(SECRET))])
    done = _run(tmp_path, {"path": "in.h5", "tensors": {"x": "x"}}, local=True, output="out.h5")
    _assert_refused(done, tmp_path, "dataset '/x'", "external storage", str(secret))


def test_hdf5_virtual_dataset_sourced_outside_is_refused(tmp_path):
    """#28.2: a virtual dataset mapping a dataset of a file outside the data root."""
    secret = _secret(tmp_path)
    with h5py.File(secret.parent / "source.h5", "w") as f:
        f["data"] = np.frombuffer(SECRET, dtype="f4").reshape(2, 16)
    layout = h5py.VirtualLayout(shape=(2, 16), dtype="f4")
    layout[:] = h5py.VirtualSource(str(secret.parent / "source.h5"), "data", shape=(2, 16))
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f.create_virtual_dataset("x", layout)
    done = _run(tmp_path, {"path": "in.h5", "tensors": {"x": "x"}}, local=True)
    _assert_refused(done, tmp_path, "dataset '/x'", "virtual dataset", "source.h5")


def _replace_with_external(group: h5py.Group, name: str, secret: Path, shape, dtype) -> None:
    """`group[name]` as a dataset of the same attributes whose bytes are `secret`."""
    attrs = dict(group[name].attrs)
    del group[name]
    dataset = group.create_dataset(name, shape=shape, dtype=dtype, external=[(str(secret), 0, len(SECRET))])
    dataset.attrs.update(attrs)


def _craft(path: Path, secret: Path, how: str) -> None:
    with h5py.File(path, "r+") as f:
        if how == "dense-X-external":
            _replace_with_external(f, "X", secret, (2, 16), "f4")
        elif how == "csr-data-external":
            _replace_with_external(f["X"], "data", secret, f["X/data"].shape, "f4")
        elif how == "csc-indices-virtual":
            with h5py.File(secret.parent / "source.h5", "w") as source:
                source["indices"] = np.zeros(len(f["X/indices"]), dtype="i4")
            count = len(f["X/indices"])
            layout = h5py.VirtualLayout(shape=(count,), dtype="i4")
            layout[:] = h5py.VirtualSource(str(secret.parent / "source.h5"), "indices", shape=(count,))
            del f["X/indices"]
            f["X"].create_virtual_dataset("indices", layout)
        elif how == "X-external-link":
            with h5py.File(secret.parent / "other.h5ad", "w") as other:
                other["X"] = np.frombuffer(SECRET, dtype="f4").reshape(2, 16)
                other["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            del f["X"]
            f["X"] = h5py.ExternalLink(str(secret.parent / "other.h5ad"), "/X")
        elif how == "obs-index-external":  # the ids: they land in the output's ids
            _replace_with_external(f["obs"], "_index", secret, (2,), "S64")
        elif how == "var-column-external":  # read for feature names, copied by the .h5ad writer
            _replace_with_external(f["var"], "symbol", secret, (16,), "S8")
        elif how == "uns-external":  # never a model input, but the .h5ad output copies uns
            _replace_with_external(f["uns"], "title", secret, (128,), "u1")
        else:
            raise AssertionError(how)


@pytest.mark.parametrize(("layout", "how", "words"), [
    ("dense", "dense-X-external", ("dataset '/X'", "external storage")),
    ("csr", "csr-data-external", ("dataset '/X/data'", "external storage")),
    ("csc", "csc-indices-virtual", ("dataset '/X/indices'", "virtual dataset")),
    ("dense", "X-external-link", ("'/X' is an external link", "other.h5ad")),
    ("dense", "obs-index-external", ("dataset '/obs/_index'", "external storage")),
    ("dense", "var-column-external", ("dataset '/var/symbol'", "external storage")),
    ("dense", "uns-external", ("dataset '/uns/title'", "external storage")),
])
def test_h5ad_parts_stored_outside_the_file_are_refused(tmp_path, layout, how, words):
    """#28.2 in every slot an h5ad job reads or copies: X (dense, CSR, CSC), obs names, var, uns.
    The output is an .h5ad so that what the writer copies counts too."""
    _write_h5ad(tmp_path / "in.h5ad", layout)
    _craft(tmp_path / "in.h5ad", _secret(tmp_path), how)
    done = _run(tmp_path, {"path": "in.h5ad", "tensors": {"x": "X"}}, local=True, output="out.h5ad")
    _assert_refused(done, tmp_path, *words)
    assert not (tmp_path / "out.h5ad").exists()


# --- #28.3: sparse structures that lie to scipy ----------------------------------------------------------------

def _set(group: h5py.Group, name: str, values: np.ndarray) -> None:
    del group[name]
    group[name] = values


def _craft_sparse(path: Path, how: str) -> None:
    with h5py.File(path, "r+") as f:
        x = f["X"]
        nnz = len(x["indices"])
        if how == "index-past-the-row":  # the probe's: an index of 10**6 in a 2 x 16 matrix
            indices = x["indices"][:]
            indices[1] = 10**6
            _set(x, "indices", indices)
        elif how == "negative-index":
            indices = x["indices"][:]
            indices[0] = -7
            _set(x, "indices", indices)
        elif how == "negative-indptr":
            _set(x, "indptr", np.array([0, -5, nnz], dtype=x["indptr"].dtype))
        elif how == "indptr-decreasing":
            _set(x, "indptr", np.array([0, nnz, nnz - 3], dtype=np.int64))
        elif how == "indptr-past-nnz":
            _set(x, "indptr", np.array([0, nnz + 1000, nnz], dtype=np.int64))
        elif how == "data-shorter-than-indices":
            _set(x, "data", x["data"][:-2])
        elif how == "indptr-not-from-zero":
            _set(x, "indptr", np.array([2, 5, nnz], dtype=np.int64))
        elif how == "negative-shape":
            x.attrs["shape"] = np.array([2, -16])
        else:
            raise AssertionError(how)


@pytest.mark.parametrize(("layout", "how", "words"), [
    ("csr", "index-past-the-row", ("index 1000000", "outside its 16 columns")),
    ("csr", "negative-index", ("index -7", "outside its 16 columns")),
    ("csc", "index-past-the-row", ("index 1000000", "outside its 2 rows")),
    ("csr", "negative-indptr", ("'indptr' points outside", )),
    ("csr", "indptr-decreasing", ("'indptr' runs from 0 to",)),
    ("csr", "indptr-past-nnz", ("'indptr' points outside",)),
    ("csr", "data-shorter-than-indices", ("'data' holds",)),
    ("csr", "indptr-not-from-zero", ("'indptr' runs from 2",)),
    ("csr", "negative-shape", ("shape (2, -16)",)),
])
def test_crafted_sparse_h5ad_is_an_input_error_not_a_segfault(tmp_path, layout, how, words):
    """#28.3: before, these reached scipy's `toarray` and the engine died of SIGSEGV (or read
    garbage). Each is now refused naming the matrix and what is wrong, exit 2."""
    _write_h5ad(tmp_path / "in.h5ad", layout)
    _craft_sparse(tmp_path / "in.h5ad", how)
    done = _run(tmp_path, {"path": "in.h5ad", "tensors": {"x": "X"}}, local=True)
    assert done.returncode != -11, "the engine segfaulted"
    _assert_refused(done, tmp_path, *words)


# --- #28.8: small files that declare or hold far more than memory ------------------------------------------

def test_h5ad_declaring_200_million_sparse_entries_is_refused_in_bounded_memory(tmp_path):
    """#28.8: a few KB on disk (the entries' chunks are never written) declaring 10**8 stored
    entries in row 0 of a 2 x 16 CSR matrix. Before, the engine read them all (0.8 GB here; the
    probe's 10**9 reached 2.5 GB in 11 s). Now the row's entry count is checked against its
    columns and TENSORFLEET_MAX_ROW_BYTES from indptr, before any entry is read."""
    for name, declared in (("control.h5ad", 32), ("in.h5ad", 2 * 10**8)):
        _write_h5ad(tmp_path / name, "csr")
        with h5py.File(tmp_path / name, "r+") as f:
            x = f["X"]
            for key, dtype in (("indices", "i4"), ("data", "f4")):
                del x[key]
                x.create_dataset(key, shape=(declared,), dtype=dtype, chunks=(min(declared, 1 << 16),), fillvalue=0)
            _set(x, "indptr", np.array([0, declared // 2, declared], dtype=np.int64))
    assert (tmp_path / "in.h5ad").stat().st_size < 64 * 1024
    control, control_rss = _max_rss_run(_job(tmp_path, {"path": "control.h5ad", "tensors": {"x": "X"}}, local=True,
                                                 output="control.h5"), {})
    assert control.returncode == 0, control.stderr  # 16 entries per row of 16 columns (duplicates): read, summed
    done, rss = _max_rss_run(_job(tmp_path, {"path": "in.h5ad", "tensors": {"x": "X"}}, local=True), {})
    _assert_refused(done, tmp_path, "row 0 declares 100000000 stored entries", "TENSORFLEET_MAX_ROW_BYTES")
    assert rss < control_rss + (200 << 20), (rss, control_rss)


@pytest.mark.parametrize("part, var_column", [("_index", None), ("symbol", "symbol")])
def test_h5ad_var_declaring_more_names_than_genes_is_refused_before_it_is_read(tmp_path, part, var_column):
    """Review finding: gene alignment reads X's var frame (names, or input.align.var_column),
    and nothing bounded its size: a few KB on disk declaring 10**8 names would be read whole.
    Now each part's declared length is checked against X's width first, naming both numbers."""
    _write_h5ad(tmp_path / "in.h5ad", "csr")
    with h5py.File(tmp_path / "in.h5ad", "r+") as f:
        del f["var"][part]
        f["var"].create_dataset(part, shape=(10**8,), dtype=h5py.string_dtype(), chunks=(1 << 16,))
    assert (tmp_path / "in.h5ad").stat().st_size < 64 * 1024
    align = {"var_column": var_column} if var_column else {}
    done = _run(tmp_path, {"path": "in.h5ad", "tensors": {"expression": "X"}, "align": align},
                model="genes", local=True)
    named = "index" if part == "_index" else "column 'symbol'"
    _assert_refused(done, tmp_path, f"var {named} declares 100000000 rows but X has 16 columns")


def _gzip_fasta(path: Path, line_bytes: int) -> None:
    """A gzip FASTA whose first record is one line of `line_bytes` residues (gzip makes it tiny)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"A" * (1 << 20)
    with open(path, "wb") as handle:
        handle.write(compressor.compress(b">long one line\n"))
        for start in range(0, line_bytes, len(block)):
            handle.write(compressor.compress(block[: min(len(block), line_bytes - start)]))
        handle.write(compressor.compress(b"\n>short\nACDE\n") + compressor.flush())


def test_gzip_fasta_with_one_huge_line_is_refused_in_bounded_memory(tmp_path):
    """#28.8: a gzip FASTA of one 256 MiB line (about 256 KB on disk). Before, the indexing pass
    held the line whole (the probe's 13 MB file held 12.5 GiB). Now lines are scanned in
    bounded pieces and the record is refused once it passes TENSORFLEET_MAX_ROW_BYTES (lowered
    to 1 MiB here), naming it."""
    _gzip_fasta(tmp_path / "control.fasta.gz", 2 << 20)
    _gzip_fasta(tmp_path / "in.fasta.gz", 256 << 20)
    assert (tmp_path / "in.fasta.gz").stat().st_size < 1 << 20
    env = {"TENSORFLEET_MAX_ROW_BYTES": str(1 << 20)}
    control, control_rss = _max_rss_run(_job(tmp_path, {"path": "control.fasta.gz"}, model="embed"), env)
    done, rss = _max_rss_run(_job(tmp_path, {"path": "in.fasta.gz"}, model="embed"), env)
    _assert_refused(done, tmp_path, "record 1 (line 1) is over 1048576 bytes", "TENSORFLEET_MAX_ROW_BYTES")
    assert rss < control_rss + (128 << 20), (rss, control_rss)


def test_fasta_record_over_max_row_bytes_is_refused_naming_it(tmp_path):
    """#28.8: FASTA records had no TENSORFLEET_MAX_ROW_BYTES check; now a record (wrapped lines,
    3 MiB) over it is refused with its number and line."""
    with open(tmp_path / "in.fasta", "w") as handle:
        handle.write(">first\nACDE\n>second big\n")
        handle.write(("ACDEFGHIKL" * 6 + "\n") * (3 * (1 << 20) // 61))
        handle.write(">third\nKLMN\n")
    done = _run(tmp_path, {"path": "in.fasta"}, env={"TENSORFLEET_MAX_ROW_BYTES": str(1 << 20)}, model="embed")
    _assert_refused(done, tmp_path, "record 2 (line 3) is over 1048576 bytes", "TENSORFLEET_MAX_ROW_BYTES")


def test_csv_is_read_in_blocks_not_whole(tmp_path):
    """#28.8: a CSV was read whole (to sniff gzip from its first two bytes). This one is a header,
    a row, and a 512 MiB hole of NUL bytes (no disk used): it is refused at the first block
    that holds no row end, in bounded memory."""
    for name, size in (("control.csv", 8 << 20), ("in.csv", 512 << 20)):
        with open(tmp_path / name, "wb") as handle:
            handle.write(b"id,seq\nr1,ACDE\n")
            handle.truncate(size)
    control, control_rss = _max_rss_run(_job(tmp_path, {"path": "control.csv", "ids": "id", "tensors": {"sequence": "seq"}},
                                             model="embed"), {})
    done, rss = _max_rss_run(_job(tmp_path, {"path": "in.csv", "ids": "id", "tensors": {"sequence": "seq"}},
                                  model="embed"), {})
    _assert_refused(done, tmp_path, "cannot read", "in.csv", "straddling")
    assert control.returncode == 2 and "cannot read" in control.stderr, control.stderr
    assert rss < control_rss + (200 << 20), (rss, control_rss)


def test_findings_are_in_the_attack_table():
    """docs/security.md lists each finding of this file by its number."""
    table = (REPO_ROOT / "docs" / "security.md").read_text()
    for finding in ("#28.2", "#28.3", "#28.8"):
        assert finding in table, finding
