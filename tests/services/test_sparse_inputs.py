"""Inputs that declare `sparse: csr`: rows travel as three tensors (core/sparse.py) and reach the
model as a scipy CSR matrix; bad triples are refused naming the tensor, and the server goes on."""

from __future__ import annotations

import importlib.util
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse

from tensorfleet.client import InferenceClient
from tensorfleet.client.messages import build_wire_request
from tensorfleet.core.errors import InvalidArgument
from tensorfleet.core.sparse import csr_tensors
from tensorfleet.services.model_config import ModelConfig, load_config
from tensorfleet.services.validation import decode_request
from tests.serving import REPO_ROOT, running_server

EMBEDDER = REPO_ROOT / "examples" / "jobs" / "models" / "cell_embedder"
GENES = 2000


def counts(rows: int, seed: int = 0) -> scipy.sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((rows, GENES)) < 0.05) * rng.poisson(3.0, (rows, GENES))
    dense[1] = 0  # a cell with no counts: an empty row
    return scipy.sparse.csr_matrix(dense.astype(np.float32))


def decode(config: ModelConfig, inputs: dict) -> object:
    request = build_wire_request("cell_embedder", inputs)
    raw = [bytes(memoryview(b).cast("B")) if isinstance(b, np.ndarray) else bytes(b) for b in request.raw]
    return decode_request(request.message, config, raw)  # the bytes as they arrive


def test_three_tensors_decode_to_the_same_csr_rows():
    config = load_config(EMBEDDER)
    matrix = counts(9)
    decoded = decode(config, csr_tensors("counts", matrix, np.float32))
    got = decoded.inputs["counts"]
    assert scipy.sparse.issparse(got) and got.shape == (9, GENES) and decoded.rows == 9
    assert np.array_equal(got.toarray(), matrix.toarray())


@pytest.mark.parametrize(
    ("break_it", "problem"),
    [
        (lambda t: t.update({"counts.indices": t["counts.indices"] + GENES}), "counts.indices': column indices run"),
        (lambda t: t.update({"counts.indptr": t["counts.indptr"][::-1].copy()}), "counts.indptr': offsets run"),
        (lambda t: t.update({"counts.indptr": np.array([0, 5, 3, len(t["counts"])], np.int64)}), "offsets decrease"),
        (lambda t: t.update({"counts.indices": t["counts.indices"][:-1]}), "one index per value"),
        (lambda t: t.pop("counts.indptr"), "three tensors"),
        (lambda t: t.update({"counts.indptr": t["counts.indptr"].astype(np.float32)}), "INT32 or INT64 expected"),
    ],
)
def test_a_bad_triple_is_refused_naming_the_tensor(break_it, problem):
    tensors = csr_tensors("counts", counts(3), np.float32)
    break_it(tensors)
    with pytest.raises(InvalidArgument, match=problem.replace("(", r"\(")):
        decode(load_config(EMBEDDER), tensors)


def test_sparse_needs_one_fixed_numeric_dimension(tmp_path):
    with pytest.raises(ValueError, match="sparse: csr takes numeric rows"):
        ModelConfig.model_validate({
            "name": "m", "backend": "python", "max_batch_size": 4,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "sparse": "csr"}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}],
        })


def in_process(matrix: scipy.sparse.csr_matrix) -> np.ndarray:
    spec = importlib.util.spec_from_file_location("sparse_test_embedder", EMBEDDER / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = load_config(EMBEDDER)
    model = module.Model()
    model.load(SimpleNamespace(config=config))
    return model.predict({"counts": matrix})["embedding"]


def test_a_served_sparse_model_answers_csr_and_dense_rows_bitwise_like_in_process(tmp_path):
    shutil.copytree(EMBEDDER, tmp_path / "cell_embedder")
    matrix = counts(40, seed=3)
    expected = in_process(matrix)
    with running_server(tmp_path) as server, InferenceClient(server.address, shared_memory=False) as client:
        parameters = client.model_config("cell_embedder").parameters
        assert parameters["sparse.counts"].string_value == "csr"
        sparse = client.infer("cell_embedder", csr_tensors("counts", matrix, np.float32))["embedding"]
        dense = client.infer("cell_embedder", {"counts": matrix.toarray()})["embedding"]
        with pytest.raises(InvalidArgument, match="counts.indices"):
            bad = csr_tensors("counts", matrix, np.float32)
            bad["counts.indices"] = bad["counts.indices"] - GENES
            client.infer("cell_embedder", bad)
        again = client.infer("cell_embedder", csr_tensors("counts", matrix[5:9], np.float32))["embedding"]
    assert np.array_equal(sparse.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(dense.view(np.uint32), expected.view(np.uint32))  # dense rows are made CSR first
    assert np.array_equal(again.view(np.uint32), in_process(matrix[5:9]).view(np.uint32))
