"""Triton's own client, tritonclient[grpc]==2.73.0, against a real tensorfleet server.

The tritonclient calls run in a subprocess (tests/interop/triton_script.py): its generated
modules and ours both register protobuf package `inference`. This process starts the
server, runs the script once per module, and checks every reply against the model run
in-process on the same inputs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.inprocess import inprocess_server
from tests.serving import REPO_ROOT

pytestmark = pytest.mark.interop

MODELS = REPO_ROOT / "tests" / "models"
SCRIPT = Path(__file__).with_name("triton_script.py")
PROTEIN_DIR = REPO_ROOT / "examples" / "models" / "protein_embedder"
FP32_TOLERANCE = 1e-5
USED_MODELS = ("simple", "simple_int64", "simple_fp16", "echo_bytes")


def _run_script(address: str, out: Path, *args: str) -> tuple[dict, dict[str, np.ndarray]]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--url", address, "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, f"tritonclient script failed:\n{result.stdout}\n{result.stderr}"
    results = json.loads((out / "results.json").read_text())
    with np.load(out / "tensors.npz", allow_pickle=True) as archive:
        tensors = {key: archive[key] for key in archive.files}
    return results, tensors


def _model_class(model_dir: Path):
    """The test model's own `Model` class, loaded in this process for expected values."""
    spec = importlib.util.spec_from_file_location(
        f"inproc_{model_dir.name}", model_dir / "model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Model()
    model.load(None)
    return model


@pytest.fixture(scope="module")
def triton_run(tmp_path_factory) -> tuple[dict, dict[str, np.ndarray]]:
    with inprocess_server(MODELS, *USED_MODELS) as server:
        results, tensors = _run_script(server.address, tmp_path_factory.mktemp("triton"), "basic")
        assert server.alive(), f"server stopped during the run:\n{server.log()}"
    return results, tensors


@pytest.fixture(scope="module")
def results(triton_run) -> dict:
    return triton_run[0]


@pytest.fixture(scope="module")
def tensors(triton_run) -> dict[str, np.ndarray]:
    return triton_run[1]


def test_live_and_ready(results: dict) -> None:
    assert results["server_live"] is True
    assert results["server_ready"] is True
    assert results["model_ready"] == {
        "simple": True,
        "simple_int64": True,
        "simple_fp16": True,
        "echo_bytes": True,
    }


def test_server_metadata(results: dict) -> None:
    metadata = results["server_metadata"]
    assert metadata["name"]
    assert metadata["version"]


@pytest.mark.parametrize(
    "model,datatype", [("simple", "FP32"), ("simple_int64", "INT64"), ("simple_fp16", "FP16")]
)
def test_model_metadata(results: dict, model: str, datatype: str) -> None:
    metadata = results["model_metadata"][model]
    assert metadata["name"] == model
    assert metadata["platform"]

    def tensor_table(tensors):
        return {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in tensors}

    # As Triton reports it: the batch dimension shows as -1 in metadata shapes.
    want = {name: (datatype, [-1, 16]) for name in ("INPUT0", "INPUT1")}
    assert tensor_table(metadata["inputs"]) == want
    assert tensor_table(metadata["outputs"]) == {
        name: (datatype, [-1, 16]) for name in ("OUTPUT0", "OUTPUT1")
    }


def test_model_config(results: dict) -> None:
    config = results["model_config"]["simple"]["config"]
    assert config["name"] == "simple"
    assert int(config["max_batch_size"]) == 8
    assert config.get("backend") == "python" or config.get("platform")
    table = {t["name"]: (t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]}
    assert table == {"INPUT0": ("TYPE_FP32", [16]), "INPUT1": ("TYPE_FP32", [16])}
    outputs = {t["name"]: t["data_type"] for t in config["output"]}
    assert outputs == {"OUTPUT0": "TYPE_FP32", "OUTPUT1": "TYPE_FP32"}
    assert "dynamic_batching" in config
    bytes_config = results["model_config"]["echo_bytes"]["config"]
    assert {t["name"]: t["data_type"] for t in bytes_config["input"]} == {"text": "TYPE_STRING"}
    for model, type_name in (("simple_int64", "TYPE_INT64"), ("simple_fp16", "TYPE_FP16")):
        other = results["model_config"][model]["config"]
        assert {t["data_type"] for t in other["input"] + other["output"]} == {type_name}


def test_repository_index(results: dict) -> None:
    index = {entry["name"]: entry for entry in results["repository_index"]["models"]}
    assert set(index) == set(USED_MODELS)
    for name, entry in index.items():
        assert entry.get("state") == "READY", f"{name}: {entry}"


@pytest.mark.parametrize("model", ["simple", "simple_int64", "simple_fp16"])
def test_infer_matches_in_process_model(tensors: dict, results: dict, model: str) -> None:
    a, b = tensors[f"{model}/INPUT0"], tensors[f"{model}/INPUT1"]
    expected = _model_class(MODELS / model).predict({"INPUT0": a, "INPUT1": b})
    for name in ("OUTPUT0", "OUTPUT1"):
        got = tensors[f"{model}/{name}"]
        assert got.dtype == expected[name].dtype and got.shape == expected[name].shape == (3, 16)
        if model == "simple":
            assert np.max(np.abs(got - expected[name])) <= FP32_TOLERANCE
        else:
            np.testing.assert_array_equal(got, expected[name])
    assert np.array_equal(expected["OUTPUT0"], a + b)  # the in-process model is what we think
    assert results["infer_ids"][model] == f"unary-{model}"


def test_unary_error_reaches_tritonclient(results: dict) -> None:
    error = results["unary_error"]
    assert error is not None, "a request without INPUT1 was accepted"
    assert error["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT1" in error["message"]


def test_infer_bytes(tensors: dict, results: dict) -> None:
    text = tensors["echo_bytes/text"]
    upper, length = tensors["echo_bytes/upper"], tensors["echo_bytes/length"]
    assert list(upper) == [item.upper() for item in text]
    assert length.dtype == np.int64 and list(length) == [len(item) for item in text]
    assert results["infer_ids"]["echo_bytes"] == "unary-echo_bytes"


def test_stream_100_in_flight(tensors: dict, results: dict) -> None:
    stream = results["stream"]
    # The one bad request (INPUT1 missing) comes back as an error for itself alone.
    assert len(stream["errors"]) == 1
    assert stream["errors"][0].startswith("INVALID_ARGUMENT: ") and "INPUT1" in stream["errors"][0]
    assert sorted(stream["ids"]) == sorted(f"req-{i}" for i in range(100))
    model = _model_class(MODELS / "simple")
    worst = 0.0
    for index in range(100):
        a, b = tensors[f"stream/{index}/INPUT0"], tensors[f"stream/{index}/INPUT1"]
        expected = model.predict({"INPUT0": a, "INPUT1": b})
        for name in ("OUTPUT0", "OUTPUT1"):
            got = tensors[f"stream/{index}/{name}"]
            assert got.shape == a.shape, f"req-{index} {name}: shape {got.shape}, sent {a.shape}"
            worst = max(worst, float(np.max(np.abs(got - expected[name]))))
    assert worst <= FP32_TOLERANCE


def _protein_ready() -> str | None:
    """Why the example protein model cannot be exercised, or None when it can."""
    config_path = PROTEIN_DIR / "config.yaml"
    if not config_path.exists():
        return f"{config_path} does not exist"
    from tensorfleet.services.model_config import load_config

    config = load_config(PROTEIN_DIR)
    missing = [name for name in config.artifacts if not (PROTEIN_DIR / name).exists()]
    if missing:
        return f"protein_embedder artifacts {missing} not built (run make demo)"
    return None


@pytest.fixture(scope="module")
def protein_run(tmp_path_factory) -> tuple[dict, dict[str, np.ndarray]]:
    reason = _protein_ready()
    if reason:
        pytest.skip(reason)
    with inprocess_server(PROTEIN_DIR.parent, "protein_embedder") as server:
        return _run_script(
            server.address,
            tmp_path_factory.mktemp("protein"),
            "protein",
            "--model",
            "protein_embedder",
        )


def test_protein_embedder_matches_in_process(protein_run) -> None:
    from tensorfleet.services.backends import create_backend
    from tensorfleet.services.backends.base import ModelContext
    from tensorfleet.services.model_config import load_config

    results, tensors = protein_run
    assert results["model_ready"] is True
    assert results["stream_errors"] == []
    assert results["unary_id"] == "protein-unary"
    config = load_config(PROTEIN_DIR)
    backend = create_backend(
        ModelContext(
            PROTEIN_DIR, config, precision=config.precision, parameters=dict(config.parameters)
        )
    )
    backend.load()
    spec = config.input(results["protein_input"])
    batches = results["protein_sequences"]
    worst = 0.0
    for key, sequences in [
        ("unary", batches[0]),
        *((f"stream/{i}", s) for i, s in enumerate(batches)),
    ]:
        array = np.empty(len(sequences), dtype=object)
        array[:] = [s.encode() for s in sequences]
        array = array.reshape(len(sequences), *[1] * len(spec.shape))
        expected = backend.predict({spec.name: array})
        for name in results["protein_outputs"]:
            got = tensors[f"{key}/{name}"]
            want = np.asarray(expected[name])
            assert got.shape == want.shape, f"{key} {name}: {got.shape} != {want.shape}"
            if got.dtype.kind == "f":
                worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))))
            else:
                np.testing.assert_array_equal(got, want)
    print(f"protein_embedder: max abs diff served vs in-process = {worst:.3g}")
    assert worst <= FP32_TOLERANCE
