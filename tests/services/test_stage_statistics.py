"""ModelStatistics' per-stage breakdown, from a real server on the CPU.

Each request's decode and encode, each batch's merge and split, and each predict's h2d,
compute and d2h (the torch backend's own clock) must be counted where they happen, and
Triton's compute_input / compute_infer / compute_output must be built from the same figures.
A Triton client (tritonclient, run in its own process: its protobuf package clashes with ours)
must still read the reply.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tensorfleet.client import InferenceClient
from tests.inprocess import inprocess_server
from tests.serving import REPO_ROOT

pytest.importorskip("torch")
from tests.gpu.tiny_encoder import build_model, reference, token_rows, write_model  # noqa: E402

REQUESTS = 24


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repo = tmp_path_factory.mktemp("stages")
    model = build_model()
    write_model(repo, "enc", model)
    python_model = repo / "plain"
    python_model.mkdir()
    (python_model / "model.py").write_text(
        "class Model:\n"
        "    def load(self, context):\n        pass\n"
        "    def predict(self, inputs):\n        return {'y': inputs['x'] * 2}\n"
    )
    (python_model / "config.yaml").write_text(
        "name: plain\nbackend: python\nmax_batch_size: 8\n"
        "inputs: [{name: x, datatype: FP32, shape: [4]}]\noutputs: [{name: y, datatype: FP32, shape: [4]}]\n"
    )
    rows = token_rows(REQUESTS)
    with inprocess_server(repo) as server, InferenceClient(server.address) as client:
        results = list(client.stream("enc", [{"tokens": r} for r in rows], window=8))
        for _ in range(3):
            client.infer("plain", {"x": np.ones((2, 4), np.float32)})
        stats = {name: client.model_statistics(name).model_stats[0] for name in ("enc", "plain")}
        triton = subprocess.run(
            [sys.executable, "-c", TRITON_READ, server.address], capture_output=True, text=True, timeout=120,
            cwd=REPO_ROOT, check=False,
        )
    return model, rows, results, stats, triton


TRITON_READ = r"""
import json, sys
import tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient(sys.argv[1])
print(json.dumps(client.get_inference_statistics("enc", as_json=True)))
"""


def test_answers_are_right_while_being_timed(served):
    model, rows, results, _, _ = served
    for request, result in zip(rows, results, strict=True):
        mean, states = reference(model, request)
        np.testing.assert_allclose(result["mean"], mean, atol=1e-5)
        assert result["states"].dtype == np.float16 and result["states"].shape == (1, request.shape[1], 64)


def test_every_stage_is_counted_where_it_happens(served):
    _, _, _, stats, _ = served
    enc = stats["enc"]
    stages = {name: enc.stage_stats[name] for name in enc.stage_stats}
    assert set(stages) == {"decode", "queue", "merge", "h2d", "compute", "d2h", "split", "encode"}
    for per_request in ("decode", "queue", "encode"):
        assert stages[per_request].count == REQUESTS, per_request
    batches = enc.execution_count  # no out-of-memory halving here: one predict per batch
    assert 1 <= batches <= REQUESTS and enc.inference_count == REQUESTS
    for per_batch in ("merge", "split", "h2d", "compute", "d2h"):
        assert stages[per_batch].count == batches, per_batch
    for name in ("decode", "merge", "h2d", "compute", "d2h", "split", "encode"):
        assert stages[name].ns > 0, name


def test_triton_fields_are_built_from_the_stages(served):
    _, _, _, stats, _ = served
    enc = stats["enc"]
    stage, infer = enc.stage_stats, enc.inference_stats
    assert infer.compute_input.ns == stage["merge"].ns + stage["h2d"].ns
    assert infer.compute_output.ns == stage["d2h"].ns + stage["split"].ns
    assert infer.compute_input.count == infer.compute_output.count == enc.execution_count
    # compute_infer is the predict call less its copies: the model's own time and its overhead
    assert infer.compute_infer.ns >= stage["compute"].ns > 0
    assert sum(b.compute_input.count for b in enc.batch_stats) == enc.execution_count
    assert sum(b.compute_infer.ns for b in enc.batch_stats) == infer.compute_infer.ns


def test_a_python_model_without_its_own_clock_counts_predict_as_compute(served):
    _, _, _, stats, _ = served
    plain = stats["plain"]
    stage = plain.stage_stats
    assert stage["h2d"].ns == stage["d2h"].ns == 0 and stage["h2d"].count == plain.execution_count
    assert stage["compute"].ns == plain.inference_stats.compute_infer.ns > 0


def test_a_triton_client_reads_the_statistics(served):
    _, _, _, stats, triton = served
    assert triton.returncode == 0, triton.stderr
    theirs = json.loads(triton.stdout)["model_stats"][0]
    assert "stage_stats" not in theirs  # our field 1000 is skipped, the rest reads as Triton's
    ours = stats["enc"].inference_stats
    assert int(theirs["inference_stats"]["compute_input"]["ns"]) == ours.compute_input.ns
    assert int(theirs["inference_stats"]["queue"]["count"]) == REQUESTS
