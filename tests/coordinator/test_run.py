"""`tensorfleet run` end to end against real servers: outputs, order, formats, errors, exit codes."""

from __future__ import annotations

import importlib.util
import json

import anndata
import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tensorfleet.coordinator.engine.planner import make_plan
from tensorfleet.coordinator.io.readers import open_reader
from tensorfleet.coordinator.spec import InputSpec

from .helpers import MODELS, local_model, make_fasta, run_tensorfleet, write_job


def load_test_model(name: str):
    spec = importlib.util.spec_from_file_location(f"coordinator_test_{name}", MODELS / name / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Model()
    model.load(None)
    return model


def servers_model(servers, name: str) -> dict:
    return {"name": name, "servers": [s.address for s in servers]}


def expected_embeddings(fasta, batch_rows: int, chunk_rows: int, token_budget: int | None = None) -> np.ndarray:
    """The test model run in-process on exactly the planned requests: what the job must reproduce bitwise."""
    model = load_test_model("embed")
    with open_reader(InputSpec(path=str(fasta))) as reader:
        plan = make_plan(
            reader, {"sequence": "sequence"}, batch_rows=batch_rows, chunk_rows=chunk_rows, token_budget=token_budget
        )
        everything = reader.read("sequence", 0, plan.settings.rows)
        out = np.empty((plan.settings.rows, 16), dtype=np.float32)
        for chunk in plan.chunks:
            for rows in chunk.request_rows():
                out[rows] = model.predict({"sequence": everything[rows]})["embedding"]
    return out


def test_fasta_to_hdf5_matches_the_model_in_process_bitwise(tmp_path, servers):
    records = make_fasta(tmp_path / "in.fasta", 300)
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.fasta"}, model=servers_model(servers, "embed"),
        output={"path": "out.h5"}, chunking={"chunk_rows": 40, "batch_rows": 8},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    assert "rows: 300 (300 ok, 0 failed)" in result.stdout and "embedding [16] float32" in result.stdout
    with h5py.File(tmp_path / "out.h5") as f:
        assert [v.decode() for v in f["ids"][:]] == [name for name, _ in records]
        np.testing.assert_array_equal(f["embedding"][:], expected_embeddings(tmp_path / "in.fasta", 8, 40))
        assert f["ok"][:].all()
        assert f.attrs["model_name"] == "embed" and f.attrs["model_version"] == "3"
        assert len(f.attrs["model_artifact_sha256"]) == 64 and len(f.attrs["spec_sha256"]) == 64
        assert sorted(json.loads(f.attrs["servers"])) == sorted(s.address for s in servers)
        assert f.attrs["precision"] == "fp32" and f.attrs["tensorfleet_version"]
    assert not list(tmp_path.glob(".*partial*"))


def test_token_budget_requests_are_length_sorted_and_the_output_stays_in_input_order(tmp_path, servers):
    records = make_fasta(tmp_path / "in.fasta", 240, seed=4)
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.fasta"}, model=servers_model(servers, "embed"),
        output={"path": "out.h5"}, chunking={"chunk_rows": 60, "batch_rows": 16, "token_budget": 400},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "out.h5") as f:
        assert [v.decode() for v in f["ids"][:]] == [name for name, _ in records]
        np.testing.assert_array_equal(f["embedding"][:], expected_embeddings(tmp_path / "in.fasta", 16, 60, 400))
    with open_reader(InputSpec(path=str(tmp_path / "in.fasta"))) as reader:
        plan = make_plan(reader, {"sequence": "sequence"}, batch_rows=16, chunk_rows=60, token_budget=400)
        lengths = reader.lengths("sequence", 0, 240)
    in_order = make_plan_padding(lengths, 16, 400)
    sorted_padding = sum(len(r) * lengths[r].max() for c in plan.chunks for r in c.request_rows())
    assert sorted_padding < 0.8 * in_order, (sorted_padding, in_order)


def make_plan_padding(lengths: np.ndarray, batch_rows: int, budget: int) -> int:
    """Padded tokens when requests are cut in input order (the plan before length sorting)."""
    from tensorfleet.coordinator.engine.planner import request_bounds

    bounds = request_bounds(len(lengths), batch_rows, lengths, budget)
    return sum((b - a) * lengths[a:b].max() for a, b in zip(bounds[:-1], bounds[1:], strict=True))


def test_failing_rows_in_length_sorted_requests_are_reported_at_their_input_rows(tmp_path, servers):
    poison = {5, 61, 62, 119}
    records = make_fasta(tmp_path / "in.fasta", 120, seed=9, poison=poison)
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.fasta"}, model=servers_model(servers, "embed"),
        output={"path": "out.h5"}, chunking={"chunk_rows": 40, "batch_rows": 16, "token_budget": 600},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 1, result.stderr
    model = load_test_model("embed")
    with h5py.File(tmp_path / "out.h5") as f:
        ok = f["ok"][:]
        assert set(np.nonzero(~ok)[0]) == poison
        assert list(f["errors/row"][:]) == sorted(poison)
        assert [v.decode() for v in f["errors/id"][:]] == [records[row][0] for row in sorted(poison)]
        good = [row for row in range(120) if row not in poison]
        alone = model.predict({"sequence": np.array([records[r][1].encode() for r in good], dtype=object)})
        np.testing.assert_allclose(f["embedding"][:][good], alone["embedding"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("output", ["out.h5", "out.parquet"])
def test_a_chunk_whose_every_row_failed_merges_as_failed_rows(tmp_path, servers, output):
    """Its part stores no outputs (the model never ran on it); the merge once stopped on that
    with a KeyError and the finished rows of every other chunk were left unmerged."""
    poison = set(range(32, 64))  # the whole second chunk
    make_fasta(tmp_path / "in.fasta", 96, poison=poison)
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.fasta"}, model=servers_model(servers, "embed"),
        output={"path": output}, chunking={"chunk_rows": 32, "batch_rows": 16},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 1, result.stderr
    assert "32 of 96 rows failed" in result.stderr and "Traceback" not in result.stderr
    if output.endswith(".h5"):
        with h5py.File(tmp_path / output) as f:
            ok, embeddings = f["ok"][:], f["embedding"][:]
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(tmp_path / output)
        ok = np.array(table.column("ok").to_pylist())
        embeddings = np.array([v if v is not None else [np.nan] * 16 for v in table.column("embedding").to_pylist()], dtype=np.float32)
    assert set(np.nonzero(~ok)[0]) == poison
    assert np.isnan(embeddings[~ok]).all() and not np.isnan(embeddings[ok]).any()


def test_failing_rows_go_to_the_errors_table_and_exit_1(tmp_path, servers):
    poison = {3, 77, 78, 150}
    records = make_fasta(tmp_path / "in.fasta", 200, poison=poison)
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.fasta"}, model=servers_model(servers, "embed"),
        output={"path": "out.h5"}, chunking={"chunk_rows": 32, "batch_rows": 16},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 1, result.stderr
    assert "4 of 200 rows failed" in result.stderr
    model = load_test_model("embed")
    with h5py.File(tmp_path / "out.h5") as f:
        ok = f["ok"][:]
        assert set(np.nonzero(~ok)[0]) == poison
        assert [v.decode() for v in f["errors/id"][:]] == [records[row][0] for row in sorted(poison)]
        assert list(f["errors/row"][:]) == sorted(poison)
        assert all("poison row" in v.decode() for v in f["errors/message"][:])
        assert all(v.decode() == "INTERNAL" or v.decode() == "UNKNOWN" for v in f["errors/code"][:])
        assert all(f["error"][row].decode() for row in poison)
        embeddings = f["embedding"][:]
        assert np.isnan(embeddings[~ok]).all()
        good = [row for row in range(200) if row not in poison]
        alone = model.predict({"sequence": np.array([records[r][1].encode() for r in good], dtype=object)})
        np.testing.assert_allclose(embeddings[good], alone["embedding"], rtol=1e-5, atol=1e-6)


def _numeric_inputs(tmp_path, rows: int = 130):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((rows, 8)).astype(np.float32)
    ids = [f"cell-{(i * 7919) % 100003:06d}" for i in range(rows)]  # not sorted: order must follow the input
    return x, ids


@pytest.mark.parametrize("fmt", ["hdf5", "parquet", "h5ad"])
def test_output_order_equals_input_order(tmp_path, servers, fmt):
    x, ids = _numeric_inputs(tmp_path)
    source = tmp_path / "in.parquet"
    import pyarrow as pa

    pq.write_table(
        pa.table({"name": ids, "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8)}),
        source, row_group_size=17,
    )
    suffix = {"hdf5": "h5", "parquet": "parquet", "h5ad": "h5ad"}[fmt]
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.parquet", "ids": "name", "tensors": {"x": "x"}},
        model=servers_model(servers, "vec8"), output={"path": f"out.{suffix}", "row_group_size": 50},
        chunking={"chunk_rows": 20, "batch_rows": 9},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    expected = load_test_model("vec8").predict({"x": x})
    out = tmp_path / f"out.{suffix}"
    if fmt == "hdf5":
        with h5py.File(out) as f:
            got_ids, y, norm = [v.decode() for v in f["ids"][:]], f["y"][:], f["norm"][:]
    elif fmt == "parquet":
        table = pq.read_table(out)
        got_ids = table["id"].to_pylist()
        y = np.array(table["y"].to_pylist(), dtype=np.float32)
        norm = table["norm"].to_numpy()
        assert json.loads(pq.read_schema(out).metadata[b"tensorfleet"])["model_name"] == "vec8"
        meta = pq.ParquetFile(out).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [50, 50, 30]
    else:
        adata = anndata.read_h5ad(out)
        got_ids, y, norm = list(adata.obs_names), adata.obsm["y"], adata.obsm["norm"][:, 0]
        assert adata.obsm["norm"].shape == (130, 1)
    assert got_ids == ids
    np.testing.assert_allclose(y, expected["y"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm, expected["norm"], rtol=1e-5)


def test_h5ad_keeps_obs_and_var_and_writes_obsm(tmp_path, servers):
    x, ids = _numeric_inputs(tmp_path, rows=90)
    obs = pd.DataFrame({"cell_type": pd.Categorical(["T", "B", "NK"] * 30), "depth": np.arange(90)}, index=ids)
    var = pd.DataFrame({"gene_symbol": [f"G{i}" for i in range(8)]}, index=[f"ENSG{i:05d}" for i in range(8)])
    source = anndata.AnnData(X=x, obs=obs, var=var)
    source.uns["study"] = "test"
    source.write_h5ad(tmp_path / "cells.h5ad")
    job = write_job(
        tmp_path / "job.yaml", input={"path": "cells.h5ad", "tensors": {"x": "X"}},
        model=servers_model(servers, "vec8"), output={"path": "cells.embedded.h5ad", "tensors": {"y": "X_vec8"}},
        chunking={"chunk_rows": 25},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    out = anndata.read_h5ad(tmp_path / "cells.embedded.h5ad")
    pd.testing.assert_frame_equal(out.obs[["cell_type", "depth"]], obs)
    pd.testing.assert_frame_equal(out.var, var)
    np.testing.assert_array_equal(out.X, x)
    assert out.uns["study"] == "test"
    assert out.obsm["X_vec8"].shape == (90, 4) and "norm" not in out.obsm
    np.testing.assert_allclose(out.obsm["X_vec8"], load_test_model("vec8").predict({"x": x})["y"], rtol=1e-5, atol=1e-6)
    assert out.obs["tensorfleet_ok"].all()
    assert out.uns["tensorfleet"]["provenance"]["model_name"] == "vec8"


def test_npy_and_hdf5_inputs_with_float16_storage(tmp_path, servers):
    x, _ = _numeric_inputs(tmp_path, rows=40)
    np.save(tmp_path / "x.npy", x.astype(np.float64))  # cast to the model's FP32 on the way
    job = write_job(
        tmp_path / "job.yaml", input={"path": "x.npy"}, model=servers_model(servers, "vec8"),
        output={"path": "out.h5", "dtype": "float16", "compression": "gzip"},
    )
    assert run_tensorfleet("run", job).returncode == 0
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["y"].dtype == np.float16 and f["y"].compression == "gzip"
        assert [v.decode() for v in f["ids"][:3]] == ["0", "1", "2"]


def test_dry_run_limit_and_status(tmp_path, servers):
    make_fasta(tmp_path / "in.fasta", 120)
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.fasta"}, model=local_model("embed"), output={"path": "out.h5"},
        chunking={"chunk_rows": 30, "batch_rows": 10},
    )
    dry = run_tensorfleet("run", job, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "rows: 120" in dry.stdout and "requests: 12" in dry.stdout and "chunks: 4" in dry.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fasta", "job.yaml"]
    limited = run_tensorfleet("run", job, "--limit", "25", "--servers", ",".join(s.address for s in servers))
    assert limited.returncode == 0, limited.stderr
    with h5py.File(tmp_path / "out.limit25.h5") as f:
        assert len(f["ids"]) == 25
    assert not (tmp_path / "out.h5").exists()
    status = run_tensorfleet("status", tmp_path / "out.limit25.h5.tfjob", "--json")
    report = json.loads(status.stdout)
    assert report["state"] == "done" and report["rows_done"] == 25 and report["chunks_done"] == report["chunks"]


def test_parquet_failing_rows_have_an_errors_file_beside_the_output(tmp_path, servers):
    x, ids = _numeric_inputs(tmp_path, rows=60)
    x[[5, 41], 0] = -1000  # vec8 fails any batch with x[0] < -100
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f["features"] = x
        f["names"] = np.array(ids, dtype=object).astype("S")
    job = write_job(
        tmp_path / "job.yaml", input={"path": "in.h5", "ids": "names", "tensors": {"x": "features"}},
        model=servers_model(servers, "vec8"), output={"path": "out.parquet", "tensors": {"y": "y"}},
        chunking={"chunk_rows": 16, "batch_rows": 8},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 1, result.stderr
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["id", "y", "ok", "error"]
    assert [i for i, ok in enumerate(table["ok"].to_pylist()) if not ok] == [5, 41]
    assert "x[0] below -100" in table["error"][5].as_py() and table["error"][6].as_py() == ""
    errors = pq.read_table(tmp_path / "out.errors.parquet").to_pylist()
    assert [(e["row"], e["id"]) for e in errors] == [(5, ids[5]), (41, ids[41])]


def test_serve_subcommand_hands_over_to_the_model_server():
    result = run_tensorfleet("serve", "--help")
    assert result.returncode == 0 and "--model-repository" in result.stdout


def test_servers_with_room_take_waiting_requests_of_the_last_chunk(tmp_path):
    """One chunk of 8 requests and two servers: whoever leases it, the other one computes part
    of it (each server logs the rows it computed), and the output is still the plan's."""
    from tests.serving import running_server

    make_fasta(tmp_path / "in.fasta", 64, seed=3)
    logs = [tmp_path / "rows-slow.log", tmp_path / "rows-fast.log"]
    with (
        running_server(MODELS, "--model", "embed", env={"TF_TEST_ROW_LOG": str(logs[0]), "TF_TEST_DELAY_MS": "300"}) as slow,
        running_server(MODELS, "--model", "embed", env={"TF_TEST_ROW_LOG": str(logs[1])}) as fast,
    ):
        job = write_job(
            tmp_path / "job.yaml", input={"path": "in.fasta"}, model=servers_model([slow, fast], "embed"),
            output={"path": "out.h5"}, chunking={"chunk_rows": 64, "batch_rows": 8}, policy={"window": 4},
        )
        result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    computed = [path.read_text().splitlines() if path.exists() else [] for path in logs]
    assert computed[0] and computed[1], [len(rows) for rows in computed]
    assert sorted(computed[0] + computed[1]) == sorted(sequence for _, sequence in make_fasta(tmp_path / "again.fasta", 64, seed=3))
    with h5py.File(tmp_path / "out.h5") as f:
        np.testing.assert_array_equal(f["embedding"][:], expected_embeddings(tmp_path / "in.fasta", 8, 64))


def test_only_the_stored_outputs_are_asked_for_and_an_unknown_one_fails_before_dispatch(tmp_path, servers):
    from tensorfleet.coordinator.io.parts import Part

    x, _ = _numeric_inputs(tmp_path, rows=40)
    np.save(tmp_path / "x.npy", x)
    job = write_job(
        tmp_path / "job.yaml", input={"path": "x.npy"}, model=servers_model(servers, "vec8"),
        output={"path": "out.h5", "tensors": {"norm": "norm"}}, chunking={"chunk_rows": 16},
    )
    result = run_tensorfleet("run", job)
    assert result.returncode == 0, result.stderr
    parts = sorted((tmp_path / "out.h5.tfjob" / "parts").iterdir())
    assert parts
    for path in parts:  # vec8 also returns y: never sent, never written
        with Part(path) as part:
            assert "norm" in part.names and "y" not in part.names
    with h5py.File(tmp_path / "out.h5") as f:
        np.testing.assert_allclose(f["norm"][:], load_test_model("vec8").predict({"x": x})["norm"], rtol=1e-5)
        assert "y" not in f

    bad = write_job(
        tmp_path / "bad.yaml", input={"path": "x.npy"}, model=servers_model(servers, "vec8"),
        output={"path": "bad.h5", "tensors": {"y": "y", "z": "z"}},
    )
    result = run_tensorfleet("run", bad)
    assert result.returncode == 2, result.stderr
    assert "name ['z'], which model 'vec8' does not return (it returns: ['norm', 'y'])" in result.stderr
    assert not (tmp_path / "bad.h5.tfjob").exists()
