"""Input files and job files from others: a header that declares more than any job could read,
or a YAML file built to explode, gets a clear error (exit 2) before anything large is allocated."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import yaml

from tests.coordinator.helpers import local_model, run_tensorfleet

from .helpers import snapshot


def _run(tmp_path, input_spec: dict) -> tuple[int, str]:
    spec = {"name": "hostile", "input": input_spec, "model": {"name": "embed", "servers": ["127.0.0.1:1"]},
            "output": {"path": "out.h5"}, "policy": {"server_wait_s": 1}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    done = run_tensorfleet("run", tmp_path / "job.yaml", timeout=120)
    return done.returncode, done.stderr


def _assert_clean_refusal(tmp_path, code: int, stderr: str, *words: str) -> None:
    assert code == 2, stderr
    assert "MemoryError" not in stderr and "Traceback" not in stderr, stderr
    for word in words:
        assert word in stderr, stderr
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.tfjob").exists()


def test_hdf5_declaring_gigantic_rows_is_refused(tmp_path):
    with h5py.File(tmp_path / "in.h5", "w") as f:  # a few KB on disk: chunks are never written
        f.create_dataset("x", shape=(10, 10**9), dtype="f4", chunks=(1, 1000))
    before = snapshot(tmp_path)
    code, stderr = _run(tmp_path, {"path": "in.h5", "tensors": {"x": "x"}})
    _assert_clean_refusal(tmp_path, code, stderr, "field 'x'", "TENSORFLEET_MAX_ROW_BYTES")
    assert snapshot(tmp_path) - before <= {"job.yaml"}


def test_h5ad_declaring_a_billion_genes_is_refused(tmp_path):
    with h5py.File(tmp_path / "in.h5ad", "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        f.create_dataset("X", shape=(2, 10**9), dtype="f4", chunks=(1, 1000))
        for group, size in (("obs", 2), ("var", 10**9)):
            g = f.create_group(group)
            g.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index",
                            "column-order": np.array([], dtype="S")})
            g.create_dataset("_index", shape=(size,), dtype="S1", chunks=(min(size, 1000),))
    code, stderr = _run(tmp_path, {"path": "in.h5ad"})
    _assert_clean_refusal(tmp_path, code, stderr, "field 'X'", "TENSORFLEET_MAX_ROW_BYTES")


def test_npy_whose_header_declares_more_than_the_file_holds_is_refused(tmp_path):
    with open(tmp_path / "in.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (10**12, 10**6)})
        handle.write(b"\0" * 64)
    code, stderr = _run(tmp_path, {"path": "in.npy"})
    _assert_clean_refusal(tmp_path, code, stderr, "cannot read", "in.npy")


def test_npy_with_a_structured_dtype_is_refused(tmp_path):
    np.save(tmp_path / "in.npy", np.zeros(4, dtype=[("a", "f4"), ("b", "i8")]))
    code, stderr = _run(tmp_path, {"path": "in.npy"})
    _assert_clean_refusal(tmp_path, code, stderr, "dtype", "inputs hold numbers or strings")


def test_a_yaml_alias_bomb_job_file_is_refused(tmp_path):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (tmp_path / "job.yaml").write_text("\n".join(lines) + "\n")
    done = run_tensorfleet("run", tmp_path / "job.yaml", timeout=60)
    _assert_clean_refusal(tmp_path, done.returncode, done.stderr, "alias")


@pytest.mark.parametrize("size", [2 * 1024 * 1024])
def test_an_oversized_job_file_is_refused(tmp_path, size):
    (tmp_path / "job.yaml").write_text("name: big\n# " + "x" * size + "\n")
    done = run_tensorfleet("run", tmp_path / "job.yaml", timeout=60)
    _assert_clean_refusal(tmp_path, done.returncode, done.stderr, "TENSORFLEET_MAX_SPEC_BYTES")


def test_parquet_whose_lists_decode_far_beyond_their_bytes_is_refused(tmp_path):
    """Encoded, a list of zeros takes a few bytes: a small file can decode to any size. The
    bounds are checked against the values a row group counts, before it is read. The bound is
    lowered here so that the file stays small; the rows are 4 MB each once decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [np.zeros(1 << 20, np.float32)] * 8
    pq.write_table(pa.table({"x": pa.array(rows, type=pa.list_(pa.float32()))}), tmp_path / "in.parquet")
    assert (tmp_path / "in.parquet").stat().st_size < 64 * 1024
    spec = {"name": "hostile", "input": {"path": "in.parquet", "tensors": {"x": "x"}},
            "model": {"name": "embed", "servers": ["127.0.0.1:1"]}, "output": {"path": "out.h5"},
            "policy": {"server_wait_s": 1}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    for bound, words in (({"TENSORFLEET_MAX_ROW_BYTES": str(1 << 20)}, ("decodes to 33554432 bytes, 4194304 a row", "TENSORFLEET_MAX_ROW_BYTES")),
                         ({"TENSORFLEET_MAX_ROW_GROUP_BYTES": str(16 << 20)}, ("33554432 bytes", "smaller row groups"))):
        done = run_tensorfleet("run", tmp_path / "job.yaml", env=bound, timeout=120)
        _assert_clean_refusal(tmp_path, done.returncode, done.stderr, "column 'x', row group 0 (8 rows)", *words)


def test_parquet_strings_repeated_from_a_dictionary_are_measured_before_they_decode(tmp_path):
    """Dictionary encoding stores one long string once, however many rows repeat it: a 14 KB
    file here decodes to 131 MB of strings. Strings are read dictionary-encoded and their
    decoded size is checked before they are decoded (the bound is lowered to keep the test
    small). Before, a bound refused mid-run also ended in a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sequence": ["A" * 65536] * 2000}), tmp_path / "in.parquet")
    assert (tmp_path / "in.parquet").stat().st_size < 64 * 1024
    spec = {"name": "hostile", "input": {"path": "in.parquet"}, "model": local_model("embed"), "output": {"path": "out.h5"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    done = run_tensorfleet("run", tmp_path / "job.yaml", env={"TENSORFLEET_MAX_ROW_GROUP_BYTES": str(16 << 20)}, timeout=120)
    # Read when the first request is built (the plan needs no string): exit 2 then, no output.
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    for words in ("column 'sequence', row group 0 (2000 rows)", "131072000 bytes of strings", "TENSORFLEET_MAX_ROW_GROUP_BYTES"):
        assert words in done.stderr, done.stderr
    assert not (tmp_path / "out.h5").exists()
