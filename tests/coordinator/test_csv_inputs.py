"""CSV / TSV in and out (pyarrow's CSV reader and writer), on tables pandas and pyarrow wrote."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from .helpers import MODELS, run_tensorfleet, write_job


def model(name: str):
    spec = importlib.util.spec_from_file_location(f"coordinator_test_{name}", MODELS / name / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.Model()
    instance.load(None)
    return instance


def servers_model(servers, name: str) -> dict:
    return {"name": name, "servers": [s.address for s in servers]}


def test_a_pandas_csv_of_sequences_to_csv_in_input_order_with_ok_and_error(tmp_path, servers):
    rng = np.random.default_rng(0)
    sequences = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=rng.integers(5, 40))) for _ in range(50)]
    sequences[17] = "MK!Q"  # the test embedder fails a sequence holding '!'
    frame = pd.DataFrame({"epistasis_id": [f"pair{i}" for i in range(50)], "source": "okgp", "seq": sequences})
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    job = write_job(
        tmp_path / "job.yaml",
        input={"path": "pairs.csv", "ids": "epistasis_id", "tensors": {"sequence": "seq"}},
        model=servers_model(servers, "embed"), output={"path": "out.csv"},
        chunking={"chunk_rows": 16, "batch_rows": 4},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 1, result.stderr
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(out.columns) == ["id", *[f"embedding_{i}" for i in range(16)], "ok", "error"]
    assert out["id"].tolist() == frame["epistasis_id"].tolist()
    assert out["ok"].tolist() == [i != 17 for i in range(50)]
    assert out["error"][17].startswith("INTERNAL") or "poison row" in out["error"][17]
    assert "row 17, id 'pair17': " in out["error"][17]
    good = [i for i in range(50) if i != 17]
    embedder = model("embed")
    want = np.concatenate([embedder.predict({"sequence": np.array([sequences[i].encode()], dtype=object)})["embedding"] for i in good])
    got = out.loc[good, [f"embedding_{i}" for i in range(16)]].to_numpy(dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # CSV text round-trips float32 within 1 ulp
    errors = pd.read_csv(tmp_path / "out.errors.csv")
    assert errors["row"].tolist() == [17] and errors["id"].tolist() == ["pair17"]
    assert (tmp_path / "out.provenance.json").exists()


def test_a_pyarrow_tsv_of_number_columns_joined_into_a_vector(tmp_path, servers):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 8)).astype(np.float32)
    x[4, 0] = -500.0  # vec8 fails a row whose x[0] is below -100
    table = pa.table({"name": [f"m{i}" for i in range(30)], **{f"x{j}": x[:, j] for j in range(8)}})
    pacsv.write_csv(table, tmp_path / "in.tsv", write_options=pacsv.WriteOptions(delimiter="\t"))
    job = write_job(
        tmp_path / "job.yaml",
        input={"path": "in.tsv", "ids": "name", "tensors": {"x": ",".join(f"x{j}" for j in range(8))}},
        model=servers_model(servers, "vec8"), output={"path": "out.tsv", "tensors": {"y": "y", "norm": "norm"}},
        chunking={"chunk_rows": 8},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 1, result.stderr
    out = pacsv.read_csv(tmp_path / "out.tsv", parse_options=pacsv.ParseOptions(delimiter="\t")).to_pandas()
    assert list(out.columns) == ["id", "norm", "y_0", "y_1", "y_2", "y_3", "ok", "error"]  # output.tensors order
    assert out["id"].tolist() == [f"m{i}" for i in range(30)]
    assert out["ok"].tolist() == [i != 4 for i in range(30)]
    assert out.loc[4, ["y_0", "norm"]].isna().all()
    keep = [i for i in range(30) if i != 4]
    want = model("vec8").predict({"x": x[keep]})
    np.testing.assert_allclose(out.loc[keep, ["y_0", "y_1", "y_2", "y_3"]].to_numpy(np.float32), want["y"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.loc[keep, "norm"].to_numpy(np.float32), want["norm"], rtol=1e-6)
    assert (tmp_path / "out.errors.tsv").exists()


def test_a_gzipped_pandas_csv_is_read_like_a_plain_one(tmp_path, servers):
    x = np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32)
    pd.DataFrame(x, columns=[f"f{j}" for j in range(8)]).to_csv(tmp_path / "in.csv.gz", index=False, compression="gzip")
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.csv.gz", "tensors": {"x": ",".join(f"f{j}" for j in range(8))}},
        model=servers_model(servers, "vec8"), output={"path": "out.parquet"},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out["id"].tolist() == [str(i) for i in range(20)]  # no id column: row numbers
    np.testing.assert_allclose(np.stack(out["norm"].to_numpy()).ravel(), model("vec8").predict({"x": x})["norm"], rtol=1e-6)


def test_a_value_that_does_not_fit_the_type_inferred_from_the_first_block_is_a_clear_error(tmp_path, monkeypatch):
    from tensorfleet.coordinator.io.readers import InputError, open_reader
    from tensorfleet.coordinator.io.readers import csv as csv_reader
    from tensorfleet.coordinator.spec import InputSpec

    monkeypatch.setattr(csv_reader, "_BLOCK_BYTES", 64)
    (tmp_path / "bad.csv").write_text("id,v\n" + "".join(f"r{i},{i}\n" for i in range(40)) + "r40,oops\n")
    with pytest.raises(InputError, match=r"cannot read .*bad\.csv as CSV: .*oops"):
        open_reader(InputSpec(path=str(tmp_path / "bad.csv"))).close()
