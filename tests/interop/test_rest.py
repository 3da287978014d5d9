"""The REST face of the model server, with clients nobody here wrote: tritonclient.http and curl.

Every REST answer is checked against the same request sent over gRPC to the same server:
outputs must be equal bit for bit, in JSON and in the binary tensor data extension. Bad
requests must get 400/404 with a JSON error body, and a REST and a gRPC request must be able
to share one batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tensorfleet.client import InferenceClient
from tests.certificates import make_pki
from tests.serving import REPO_ROOT, ServerProcess, running_server

pytestmark = pytest.mark.interop

MODELS = REPO_ROOT / "tests" / "models"
SCRIPT = Path(__file__).with_name("triton_http_script.py")
USED_MODELS = ("simple", "simple_int64", "simple_fp16", "echo_bytes")
TOKEN = "rest-token-123"
HEADER_LENGTH = "Inference-Header-Content-Length"


def _serve_rest(tmp: Path, repository: Path, models: tuple[str, ...], *extra: str):
    """A real server with REST on a free port; yields (server, REST base URL)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port_file = tmp / "http-port"
    served = [arg for name in models for arg in ("--model", name)]
    args = [*served, "--http-port", "0", "--http-port-file", str(port_file), *extra]
    return running_server(repository, *args), port_file


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[ServerProcess, str]]:
    context, port_file = _serve_rest(tmp_path_factory.mktemp("rest"), MODELS, USED_MODELS)
    with context as process:
        yield process, f"127.0.0.1:{port_file.read_text().strip()}"


@contextlib.contextmanager
def _with_env(name: str, value: str) -> Iterator[None]:
    """Set a variable for the servers started inside (they inherit this process's environment)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _grpc(address: str, model: str, inputs: dict, token: str | None = None) -> dict[str, np.ndarray]:
    with InferenceClient(address, token=token) as client:
        return client.infer(model, inputs)


def _same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.dtype == object:  # tritonclient gives JSON strings as str, binary ones as bytes

        def as_bytes(item) -> bytes:
            return item.encode() if isinstance(item, str) else bytes(item)

        assert [as_bytes(x) for x in got.reshape(-1)] == [as_bytes(x) for x in want.reshape(-1)], what
    else:
        assert got.tobytes() == want.tobytes(), f"{what}: outputs differ"


# --- tritonclient.http --------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton_http(server, tmp_path_factory) -> tuple[dict, dict[str, np.ndarray]]:
    process, url = server
    out = tmp_path_factory.mktemp("triton-http")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--url", url, "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=REPO_ROOT, check=False,
    )
    assert result.returncode == 0, f"tritonclient.http script failed:\n{result.stdout}\n{result.stderr}\n{process.log()}"
    results = json.loads((out / "results.json").read_text())
    with np.load(out / "tensors.npz", allow_pickle=True) as archive:
        tensors = {key: archive[key] for key in archive.files}
    return results, tensors


def test_tritonclient_http_health_and_metadata(triton_http) -> None:
    results, _ = triton_http
    assert results["server_live"] is True and results["server_ready"] is True
    assert results["model_ready"] == dict.fromkeys(USED_MODELS, True)
    assert results["server_metadata"]["name"] == "tensorfleet"
    assert "binary_tensor_data" in results["server_metadata"]["extensions"]
    for model, datatype in {"simple": "FP32", "simple_int64": "INT64", "simple_fp16": "FP16"}.items():
        metadata = results["model_metadata"][model]
        assert metadata["name"] == model
        assert {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]} == {
            "INPUT0": (datatype, [-1, 16]), "INPUT1": (datatype, [-1, 16])
        }
    config = results["model_config"]
    assert config["max_batch_size"] == 8
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("INPUT0", "TYPE_FP32", [16]), ("INPUT1", "TYPE_FP32", [16])
    ]
    assert {m["name"] for m in results["repository_index"]} == set(USED_MODELS)
    assert results["statistics"]["name"] == "simple" and results["statistics"]["inference_count"] >= 6


@pytest.mark.parametrize("mode", ["json", "binary"])
def test_tritonclient_http_infer_equals_grpc_bitwise(server, triton_http, mode: str) -> None:
    process, _ = server
    results, tensors = triton_http
    for model in ("simple", "simple_int64", "simple_fp16"):
        inputs = {name: tensors[f"{mode}/{model}/{name}"] for name in ("INPUT0", "INPUT1")}
        want = _grpc(process.address, model, inputs)
        for name in ("OUTPUT0", "OUTPUT1"):
            _same_bits(tensors[f"{mode}/{model}/{name}"], want[name], f"{mode} {model} {name}")
        assert results["infer_ids"][f"{mode}/{model}"] == f"{mode}-{model}"
    text = tensors[f"{mode}/echo_bytes/text"]
    want = _grpc(process.address, "echo_bytes", {"text": list(text)})
    _same_bits(tensors[f"{mode}/echo_bytes/upper"], want["upper"], f"{mode} echo upper")
    _same_bits(tensors[f"{mode}/echo_bytes/length"], want["length"], f"{mode} echo length")
    # The binary run named no outputs: request parameter binary_data_output made them binary.
    binary = mode == "binary"
    assert results[f"{mode}_echo_outputs"] == [{"name": "upper", "binary": binary}, {"name": "length", "binary": binary}]


def test_tritonclient_http_errors(triton_http) -> None:
    errors = triton_http[0]["errors"]
    assert errors["missing_input"]["status"] == "400"
    assert "INPUT1" in errors["missing_input"]["message"]
    assert errors["unknown_model"]["status"] == "404"
    assert "no_such_model" in errors["unknown_model"]["message"]


# --- curl ------------------------------------------------------------------------------
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


def _curl(url: str, *args: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers lower-cased, body) of one curl call; the body goes in on stdin."""
    command = [CURL, "-sS", "-D", "-", *args]
    if body is not None:
        command += ["--data-binary", "@-"]
    command.append(f"http://{url}")
    done = subprocess.run(command, input=body, capture_output=True, timeout=60, check=True)
    head, _, content = done.stdout.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, content


@needs_curl
def test_curl_health_metadata_and_json_infer(server) -> None:
    process, url = server
    status, _, body = _curl(f"{url}/v2/health/ready")
    assert (status, json.loads(body)) == (200, {"ready": True})
    status, _, body = _curl(f"{url}/v2/models/simple")
    assert status == 200 and json.loads(body)["inputs"][0] == {"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((2, 16)).astype(np.float32) for _ in range(2))
    request = {
        "id": "curl-1",
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [2, 16], "data": a.tolist()},  # nested rows
            {"name": "INPUT1", "datatype": "FP32", "shape": [2, 16], "data": b.reshape(-1).tolist()},
        ],
    }
    status, headers, body = _curl(
        f"{url}/v2/models/simple/infer", "-H", "Content-Type: application/json", body=json.dumps(request).encode()
    )
    assert status == 200 and headers["content-type"] == "application/json"
    reply = json.loads(body)
    assert reply["id"] == "curl-1" and reply["model_name"] == "simple"
    want = _grpc(process.address, "simple", {"INPUT0": a, "INPUT1": b})
    for output in reply["outputs"]:
        got = np.asarray(output["data"], np.float32).reshape(output["shape"])
        _same_bits(got, want[output["name"]], f"curl JSON {output['name']}")


@needs_curl
def test_curl_binary_tensor_data(server) -> None:
    """The binary extension by hand: JSON header, then the raw tensors, in and out."""
    process, url = server
    rng = np.random.default_rng(4)
    a = rng.integers(-(2**40), 2**40, size=(3, 16), dtype=np.int64)
    b = rng.integers(-(2**40), 2**40, size=(3, 16), dtype=np.int64)
    header = json.dumps({
        "inputs": [
            {"name": "INPUT0", "datatype": "INT64", "shape": [3, 16], "parameters": {"binary_data_size": a.nbytes}},
            {"name": "INPUT1", "datatype": "INT64", "shape": [3, 16], "parameters": {"binary_data_size": b.nbytes}},
        ],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}, {"name": "OUTPUT1"}],
    }).encode()
    status, headers, body = _curl(
        f"{url}/v2/models/simple_int64/infer",
        "-H", "Content-Type: application/octet-stream", "-H", f"{HEADER_LENGTH}: {len(header)}",
        body=header + a.tobytes() + b.tobytes(),
    )
    assert status == 200, body
    size = int(headers[HEADER_LENGTH.lower()])
    reply = json.loads(body[:size])
    outputs = {o["name"]: o for o in reply["outputs"]}
    want = _grpc(process.address, "simple_int64", {"INPUT0": a, "INPUT1": b})
    assert outputs["OUTPUT0"]["parameters"]["binary_data_size"] == len(body) - size
    _same_bits(np.frombuffer(body[size:], "<i8").reshape(3, 16), want["OUTPUT0"], "curl binary OUTPUT0")
    _same_bits(np.asarray(outputs["OUTPUT1"]["data"], np.int64).reshape(3, 16), want["OUTPUT1"], "curl JSON OUTPUT1")


GOOD_INPUT1 = {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}
BAD_REQUESTS = [
    # (label, path, extra curl args, body, status, words the error must contain)
    ("not json", "simple/infer", [], b"{nope", 400, ["not valid JSON"]),
    ("no inputs", "simple/infer", [], b"{}", 400, ["inputs"]),
    ("unknown model", "no_such_model/infer", [], json.dumps({"inputs": [GOOD_INPUT1]}).encode(), 404, ["no_such_model"]),
    ("unknown version", "simple/versions/9/infer", [], json.dumps({"inputs": [GOOD_INPUT1]}).encode(), 404, ["version '9'"]),
    ("wrong shape", "simple/infer", [], json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 15], "data": [0.0] * 15}, GOOD_INPUT1]}).encode(),
     400, ["INPUT0", "[1, 15]"]),
    ("too few elements", "simple/infer", [], json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 3}, GOOD_INPUT1]}).encode(),
     400, ["INPUT0", "16 elements"]),
    ("wrong datatype", "simple/infer", [], json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16}, GOOD_INPUT1]}).encode(),
     400, ["INPUT0", "INT32", "FP32"]),
    ("not numbers", "simple/infer", [], json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": ["a"] * 16}, GOOD_INPUT1]}).encode(),
     400, ["INPUT0", "FP32"]),
    ("fractions for integers", "simple_int64/infer", [], json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "INT64", "shape": [1, 16], "data": [1.5] * 16}]}).encode(),
     400, ["INPUT0", "not integers"]),
    ("integer out of range", "simple_int64/infer", [], json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "INT64", "shape": [1, 16], "data": [2**70] * 16}]}).encode(),
     400, ["INPUT0", "INT64"]),
    ("header length past the body", "simple/infer", ["-H", f"{HEADER_LENGTH}: 99"], b"{}", 400, ["99", "2 bytes"]),
    ("binary over the end", "simple/infer", None, None, 400, ["INPUT0", "binary_data_size"]),
    ("unclaimed binary", "simple/infer", None, None, 400, ["no input claims"]),
]


def _binary_case(label: str) -> tuple[list[str], bytes]:
    header = {"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": 64}}, GOOD_INPUT1]}
    data = json.dumps(header).encode()
    tail = bytes(32) if label == "binary over the end" else bytes(64 + 8)
    return ["-H", f"{HEADER_LENGTH}: {len(data)}"], data + tail


@needs_curl
@pytest.mark.parametrize("label,path,args,body,status,words", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_rest_requests_get_status_and_json_error(server, label, path, args, body, status, words) -> None:
    process, url = server
    if body is None:
        args, body = _binary_case(label)
    got, headers, content = _curl(f"{url}/v2/models/{path}", *args, body=body)
    assert got == status, content
    assert headers["content-type"] == "application/json"
    error = json.loads(content)["error"]
    for word in words:
        assert word in error, error
    assert process.process.poll() is None


@needs_curl
def test_repository_load_refuses_sent_configs_and_index_lists_models(server) -> None:
    process, url = server
    body = json.dumps({"parameters": {"config": '{"backend": "python"}'}}).encode()
    status, _, reply = _curl(f"{url}/v2/repository/models/simple/load", body=body)
    assert status == 400 and "own repository" in json.loads(reply)["error"]
    status, _, reply = _curl(f"{url}/v2/repository/index", body=b'{"ready": true}')
    assert status == 200 and {m["name"] for m in json.loads(reply)} == set(USED_MODELS)
    assert _curl(f"{url}/v2/models/simple/ready")[0] == 200  # still loaded and serving
    assert process.process.poll() is None


@needs_curl
def test_refused_rest_requests_are_counted_like_grpc_ones(server) -> None:
    _, url = server

    def refused() -> float:
        text = _curl(f"{url}/metrics")[2].decode()
        key = 'tensorfleet_errors_total{code="INVALID_ARGUMENT",model="echo_bytes"}'
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))

    before = refused()
    assert _curl(f"{url}/v2/models/echo_bytes/infer", body=b"{not json")[0] == 400
    assert refused() == before + 1


@needs_curl
def test_unknown_route_and_method_get_json_errors(server) -> None:
    _, url = server
    status, _, body = _curl(f"{url}/v2/nothing/here")
    assert status == 404 and "error" in json.loads(body)
    status, _, body = _curl(f"{url}/v2/models/simple/infer")  # GET on a POST route
    assert status == 405 and "error" in json.loads(body)
    status, _, body = _curl(f"{url}/v2/models/no_such_model/ready")
    assert status == 404 and "no_such_model" in json.loads(body)["error"]


# --- token, and a batch shared by REST and gRPC ------------------------------------------------
@needs_curl
def test_token_guards_rest_but_not_health(tmp_path) -> None:
    context, port_file = _serve_rest(tmp_path, MODELS, ("simple",), "--token", TOKEN)
    with context as process:
        url = f"127.0.0.1:{port_file.read_text().strip()}"
        assert _curl(f"{url}/v2/health/live")[0] == 200
        for path in ("/v2", "/v2/models/simple", "/metrics"):
            status, headers, body = _curl(f"{url}{path}")
            assert status == 401 and "bearer token" in json.loads(body)["error"], path
            assert _curl(f"{url}{path}", "-H", "Authorization: Bearer wrong")[0] == 401
        status, _, body = _curl(f"{url}/v2/models/simple", "-H", f"Authorization: Bearer {TOKEN}")
        assert status == 200 and json.loads(body)["name"] == "simple"
        status, _, body = _curl(f"{url}/metrics", "-H", f"Authorization: Bearer {TOKEN}")
        assert status == 200 and b"tensorfleet_requests" in body
        assert process.process.poll() is None


@needs_curl
def test_rest_and_grpc_requests_share_a_batch(tmp_path) -> None:
    """While a 1 s batch runs, one REST and one gRPC request queue; they run as one batch of 2."""
    repository = tmp_path / "repo"
    shutil.copytree(MODELS / "slow_identity", repository / "slow_identity")
    config = repository / "slow_identity" / "config.yaml"
    config.write_text(config.read_text().replace("delay_ms: 50", "delay_ms: 1000"))
    context, port_file = _serve_rest(tmp_path, repository, ("slow_identity",))
    with context as process:
        url = f"127.0.0.1:{port_file.read_text().strip()}"
        x = np.ones((1, 2), np.float32)
        first = threading.Thread(target=_grpc, args=(process.address, "slow_identity", {"x": x}))
        first.start()
        time.sleep(0.3)  # the first batch is running now; it holds the model for 1 s
        rest_body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [3.0, 4.0]}]})
        rest: list = []
        second = threading.Thread(target=lambda: rest.append(_curl(f"{url}/v2/models/slow_identity/infer",
                                                                    body=rest_body.encode())))
        second.start()
        grpc_out = _grpc(process.address, "slow_identity", {"x": np.full((1, 2), 5.0, np.float32)})
        first.join(30)
        second.join(30)
        assert grpc_out["y"].tolist() == [[5.0, 5.0]]
        assert json.loads(rest[0][2])["outputs"][0]["data"] == [3.0, 4.0]
        status, _, body = _curl(f"{url}/v2/models/slow_identity/stats")
        stats = json.loads(body)["model_stats"][0]
        sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
        assert stats["inference_count"] == 3
        assert sizes == {1: 1, 2: 1}, f"REST and gRPC did not share a batch: {sizes}"


@needs_curl
def test_body_over_the_message_limit_gets_413(tmp_path) -> None:
    """The REST body limit is the gRPC message limit (TENSORFLEET_MAX_MESSAGE_MB), checked before reading."""
    context, port_file = _serve_rest(tmp_path, MODELS, ("simple",))
    with _with_env("TENSORFLEET_MAX_MESSAGE_MB", "1"), context as process:
        url = f"127.0.0.1:{port_file.read_text().strip()}"
        status, _, body = _curl(f"{url}/v2/models/simple/infer", body=b" " * (2 << 20))
        assert status == 413 and "limit of 1048576 bytes" in json.loads(body)["error"]
        assert process.process.poll() is None


@needs_curl
def test_rest_over_tls_and_mutual_tls(tmp_path) -> None:
    """--tls-cert/--tls-key (and --tls-ca for client certificates) apply to REST as to gRPC."""
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    tls = ["--tls-cert", str(pki["server"]), "--tls-key", str(pki["server_key"])]
    context, port_file = _serve_rest(tmp_path / "one", MODELS, ("simple",), *tls)
    with context:
        url = f"https://localhost:{port_file.read_text().strip()}/v2/health/ready"
        done = subprocess.run([CURL, "-sS", "--cacert", str(pki["ca"]), url], capture_output=True, timeout=60)
        assert done.returncode == 0 and json.loads(done.stdout) == {"ready": True}, done.stderr
        plain = subprocess.run([CURL, "-sS", url.replace("https", "http")], capture_output=True, timeout=60)
        assert plain.returncode != 0 or b"ready" not in plain.stdout
    context, port_file = _serve_rest(tmp_path / "two", MODELS, ("simple",), *tls, "--tls-ca", str(pki["ca"]))
    with context:
        url = f"https://localhost:{port_file.read_text().strip()}/v2/health/ready"
        anonymous = subprocess.run([CURL, "-sS", "--cacert", str(pki["ca"]), url], capture_output=True, timeout=60)
        assert anonymous.returncode != 0  # no client certificate: the handshake fails
        client = ["--cert", str(pki["client"]), "--key", str(pki["client_key"])]
        done = subprocess.run([CURL, "-sS", "--cacert", str(pki["ca"]), *client, url], capture_output=True, timeout=60)
        assert done.returncode == 0 and json.loads(done.stdout) == {"ready": True}, done.stderr


def test_rest_port_in_use_is_a_clear_error() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "tensorfleet.services", "--model-repository", str(MODELS), "--model", "simple",
             "--host", "127.0.0.1", "--port", "0", "--http-port", str(port)],
            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False,
        )
    assert done.returncode == 2, done.stderr
    assert f"cannot listen for REST on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr
