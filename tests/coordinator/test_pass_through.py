"""Issue 27.6 (PerioGT's needs): input columns copied into the output (`output.keep_input`), a
one-value output ([1]) named without `_0`, and `tensorfleet infer --parameter NAME=VALUE`.

One real server over a small repository made here: `regress` (three features in, a [1] prediction
and a [2] pair out; a row whose first feature is below -100 fails alone) and `echo_parameters`
(returns, as text, every request parameter with its type, so the types sent are the ones seen).
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tensorfleet.coordinator.cli.request_parameters import parse_parameter, parse_parameters
from tests.serving import running_server

from .helpers import run_tensorfleet, write_job

REGRESS = {
    "config.yaml": """\
        name: regress
        backend: python
        max_batch_size: 16
        inputs:
          - {name: x, datatype: FP32, shape: [3]}
        outputs:
          - {name: prediction_value, datatype: FP32, shape: [1]}
          - {name: pair, datatype: FP32, shape: [2]}
        batching: {max_queue_delay_ms: 1}
        """,
    "model.py": """\
        import numpy as np


        class Model:
            def load(self, context):
                pass

            def predict(self, inputs):
                x = inputs["x"]
                if (x[:, 0] < -100).any():
                    raise ValueError("feature a below -100")
                return {"prediction_value": x.sum(axis=1, keepdims=True), "pair": x[:, :2] * 2}
        """,
}
ECHO = {
    "config.yaml": """\
        name: echo_parameters
        backend: python
        max_batch_size: 4
        inputs:
          - {name: x, datatype: FP32, shape: [1]}
        outputs:
          - {name: seen, datatype: BYTES, shape: []}
        """,
    "model.py": """\
        import json

        import numpy as np


        class Model:
            def load(self, context):
                pass

            def predict(self, inputs, parameters):
                text = json.dumps({k: [type(v).__name__, v] for k, v in sorted(parameters.items())})
                return {"seen": np.array([text.encode()] * len(inputs["x"]), dtype=object)}
        """,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repo")
    for name, files in (("regress", REGRESS), ("echo_parameters", ECHO)):
        (repository / name).mkdir()
        for file, text in files.items():
            (repository / name / file).write_text(textwrap.dedent(text))
    with running_server(repository) as running:
        yield running


def table(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({
        "smiles": [f"C{'C' * (i % 7)}O{i}" for i in range(rows)],
        "weight": rng.uniform(10, 500, rows).round(3),
        "a": rng.standard_normal(rows).astype(np.float32),
        "b": rng.standard_normal(rows).astype(np.float32),
        "c": rng.standard_normal(rows).astype(np.float32),
        "mol_id": [f"mol{i}" for i in range(rows)],
    })
    frame.loc[6, "a"] = -500.0  # fails alone
    return frame


def run_job(tmp_path, server, source: str, output: str, features: str = "a,b,c") -> None:
    job = write_job(tmp_path / "job.yaml", input={"path": source, "ids": "mol_id", "tensors": {"x": features}},
                    model={"name": "regress", "servers": [server.address]},
                    output={"path": output, "keep_input": ["smiles", "weight"]}, chunking={"chunk_rows": 8})
    result = run_tensorfleet("run", job)
    assert result.returncode == 1, result.stderr  # row 6 failed, the rest written


def want(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    x = frame[["a", "b", "c"]].to_numpy(np.float32)
    return x.sum(axis=1), x[:, :2] * 2


def test_csv_keeps_input_columns_after_the_id_and_names_a_one_value_output_plainly(tmp_path, server):
    frame = table(20)
    frame.to_csv(tmp_path / "mols.csv", index=False)
    run_job(tmp_path, server, "mols.csv", "out.csv")
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    # kept columns after the id, in keep_input's order; then the outputs (by name, output.tensors unset)
    assert list(out.columns) == ["id", "smiles", "weight", "pair_0", "pair_1", "prediction_value", "ok", "error"]
    assert out["id"].tolist() == frame["mol_id"].tolist()
    assert out["smiles"].tolist() == frame["smiles"].tolist()  # every row, the failed one too
    np.testing.assert_allclose(out["weight"].to_numpy(float), frame["weight"].to_numpy(float))
    good = [i for i in range(20) if i != 6]
    assert out["ok"].tolist() == [i != 6 for i in range(20)] and out.loc[6, "prediction_value"] == ""
    value, pair = want(frame)
    np.testing.assert_allclose(out.loc[good, "prediction_value"].to_numpy(np.float32), value[good], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.loc[good, ["pair_0", "pair_1"]].to_numpy(np.float32), pair[good], rtol=1e-6)


def test_parquet_keeps_input_columns_with_their_types(tmp_path, server):
    frame = table(20)
    stored = frame.assign(x=list(frame[["a", "b", "c"]].to_numpy(np.float32)))  # parquet: one list column
    stored.to_parquet(tmp_path / "mols.parquet", index=False)
    run_job(tmp_path, server, "mols.parquet", "out.parquet", features="x")
    written = pq.read_table(tmp_path / "out.parquet")
    assert written.column_names == ["id", "smiles", "weight", "pair", "prediction_value", "ok", "error"]
    assert written.schema.field("smiles").type == pa.string()  # text stays text, not binary
    assert written.schema.field("weight").type == pa.float64()
    out = written.to_pandas()
    assert out["smiles"].tolist() == frame["smiles"].tolist()
    assert out["weight"].tolist() == frame["weight"].tolist()
    good = [i for i in range(20) if i != 6]
    value, _ = want(frame)
    got = np.stack(out.loc[good, "prediction_value"].to_numpy()).ravel()
    np.testing.assert_allclose(got, value[good], rtol=1e-6)


def test_infer_sends_typed_parameters_that_the_model_sees(server):
    result = run_tensorfleet(
        "infer", "--server", server.address, "--model", "echo_parameters", "--input", "x=[[1.0]]",
        "--parameter", "steps=50", "--parameter", "scale=0.5", "--parameter", "sample=true",
        "--parameter", "label=perio", "--parameter", 'code="7"',
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(json.loads(result.stdout)["outputs"]["seen"][0])
    assert seen == {"code": ["str", "7"], "label": ["str", "perio"], "sample": ["bool", True],
                    "scale": ["float", 0.5], "steps": ["int", 50]}


def test_infer_refuses_a_malformed_or_reserved_parameter_with_exit_2(server):
    for bad, words in (("steps", "want NAME=VALUE"), ("tensorfleet.context=x", "the protocol's own")):
        result = run_tensorfleet("infer", "--server", server.address, "--model", "echo_parameters",
                                 "--input", "x=[[1.0]]", "--parameter", bad)
        assert result.returncode == 2 and words in result.stderr, result.stderr


def test_parameter_text_picks_the_protocol_type():
    assert parse_parameter("n=3") == ("n", 3) and isinstance(parse_parameter("n=3")[1], int)
    assert parse_parameter("f=1e-3") == ("f", 0.001)
    assert parse_parameter("b=False") == ("b", False)
    assert parse_parameter("s=hello world") == ("s", "hello world")
    assert parse_parameter("s=[1, 2]") == ("s", "[1, 2]")
    assert parse_parameter("eq=a=b") == ("eq", "a=b")
    with pytest.raises(ValueError, match="given twice"):
        parse_parameters(["a=1", "a=2"])
    with pytest.raises(ValueError, match="int64"):
        parse_parameter(f"big={2**64}")
