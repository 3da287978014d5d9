"""`--api-key-header NAME` (issue 27.6): an API gateway's `X-Api-Key` carries the token, on a model
server's gRPC and REST faces and on the coordinator service's gRPC and dashboard, beside
`authorization: Bearer`. The key is the whole header value; a wrong, empty, bearer-prefixed or
missing one is refused as a wrong bearer token is; health stays open; the read token sent as a
key still may only read. Real servers on loopback; requests by a raw grpc channel with hand-set
metadata, by raw HTTP/1.1 on a socket (curl-style), and by tritonclient.
"""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest

from tensorfleet.core.auth import TokenAuth, check_api_key_header
from tensorfleet.protos import inference_pb2 as pb
from tensorfleet.protos import inference_pb2_grpc as pb_grpc
from tensorfleet.protos import tensorfleet_pb2 as tf
from tensorfleet.protos import tensorfleet_pb2_grpc as tf_grpc
from tests.serving import REPO_ROOT

from .helpers import run_cli, spawned
from .test_http_faces import request

MODELS = REPO_ROOT / "tests" / "models"
TOKEN = "api-key-3c9e0b7f15a2"
READ = "api-read-84d1f6a02c"


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    root = tmp_path_factory.mktemp("apikey")
    files = {}
    for name, token in (("submit", TOKEN), ("read", READ)):
        files[name] = root / name
        files[name].write_text(token + "\n")
        files[name].chmod(0o600)
    return root, files


@pytest.fixture(scope="module")
def server(secrets):
    root, files = secrets
    with spawned(["--model-repository", MODELS, "--model", "simple", "--token-file", files["submit"],
                  "--api-key-header", "X-Api-Key", "--http-port", "0", "--http-port-file", root / "rest-port"],
                 root / "server", module="tensorfleet.services") as running:
        running.rest_port = int((root / "rest-port").read_text())
        yield running


def model_metadata(address: str, metadata: list[tuple[str, str]]) -> pb.ModelMetadataResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(name="simple"), metadata=metadata, timeout=30)


@pytest.mark.parametrize("metadata", [[("x-api-key", TOKEN)], [("authorization", f"Bearer {TOKEN}")]])
def test_grpc_takes_the_token_in_the_named_header_or_as_bearer(server, metadata):
    assert model_metadata(server.address, metadata).name == "simple"


@pytest.mark.parametrize("metadata", [
    [], [("x-api-key", "wrong-key-000000000")], [("x-api-key", "")], [("x-api-key", f"Bearer {TOKEN}")],
    [("x-api-key", TOKEN[:-1])], [("x-other-key", TOKEN)], [("authorization", TOKEN)],
])
def test_grpc_refuses_a_missing_wrong_or_misplaced_key(server, metadata):
    with pytest.raises(grpc.RpcError) as caught:
        model_metadata(server.address, metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert model_metadata(server.address, [("x-api-key", TOKEN)]).name == "simple"  # still serving


def test_rest_takes_the_named_header_curl_style(server):
    body = json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}
                                  for name in ("INPUT0", "INPUT1")]}).encode()
    status, reply = request(server.rest_port, "POST", "/v2/models/simple/infer",
                            {"X-Api-Key": TOKEN, "Content-Type": "application/json"}, body)
    assert status == 200, reply
    assert reply["outputs"][0]["data"][0] == 2.0
    for headers in ({}, {"X-Api-Key": "wrong-key-000000000"}, {"X-Api-Key": f"Bearer {TOKEN}"}, {"Api-Key": TOKEN}):
        assert request(server.rest_port, "GET", "/v2/models/simple", headers)[0] == 401, headers
    assert request(server.rest_port, "GET", "/v2/models/simple", {"x-API-key": TOKEN})[0] == 200  # any case
    assert request(server.rest_port, "GET", "/v2/health/ready")[0] == 200  # health stays open


#: tritonclient in a subprocess: its generated modules and ours both register protobuf package `inference`.
TRITON_SCRIPT = """
import sys
import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

grpc_url, http_url, key = sys.argv[1:4]
row = np.ones((1, 16), np.float32)
# gRPC metadata keys are lower case (grpc refuses others client-side); HTTP headers any case
for module, url, name in ((triton_grpc, grpc_url, "x-api-key"), (triton_http, http_url, "X-Api-Key")):
    client = module.InferenceServerClient(url)
    inputs = [module.InferInput(name, [1, 16], "FP32") for name in ("INPUT0", "INPUT1")]
    for item in inputs:
        item.set_data_from_numpy(row)
    print(module.__name__, "key", float(client.infer("simple", inputs, headers={name: key}).as_numpy("OUTPUT0")[0, 0]))
    try:
        client.infer("simple", inputs, headers={name: "wrong-key-000000000"})
        print(module.__name__, "wrong served")
    except InferenceServerException as error:
        print(module.__name__, "wrong refused", str(error).splitlines()[0])
    client.close()
"""


def test_tritonclient_sends_the_key_as_a_header_on_grpc_and_http(server):
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, server.address, f"127.0.0.1:{server.rest_port}", TOKEN],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for module in ("tritonclient.grpc", "tritonclient.http"):
        assert f"{module} key 2.0" in lines, result.stdout
        refused = [line for line in lines if line.startswith(f"{module} wrong")]
        assert refused and refused[0].startswith(f"{module} wrong refused") and "bearer token" in refused[0], lines


def test_the_coordinator_service_takes_the_key_and_keeps_its_roles(secrets):
    root, files = secrets
    with spawned(["coordinator", "serve", "--state-dir", root / "state", "--token-file", files["submit"],
                  "--read-token-file", files["read"], "--api-key-header", "X-Api-Key", "--http-port", "0",
                  "--http-port-file", root / "dash-port", "--data-root", root, "--output-root", root],
                 root / "coordinator") as coordinator:
        with grpc.insecure_channel(coordinator.address) as channel:
            stub = tf_grpc.CoordinatorStub(channel)
            stub.ListJobs(tf.ListJobsRequest(), metadata=[("x-api-key", READ)], timeout=30)
            with pytest.raises(grpc.RpcError) as denied:  # the read token as a key may still only read
                stub.CancelJob(tf.CancelJobRequest(job_id="nope"), metadata=[("x-api-key", READ)], timeout=30)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListJobs(tf.ListJobsRequest(), metadata=[("x-api-key", "wrong-key-000000000")], timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        port = int((root / "dash-port").read_text())
        assert request(port, "GET", "/api/jobs", {"X-Api-Key": READ})[0] == 200
        assert request(port, "GET", "/api/jobs", {"X-Api-Key": "wrong-key-000000000"})[0] == 401


@pytest.mark.parametrize("args,words", [
    (["--api-key-header", "Authorization"], "carries something else"),
    (["--api-key-header", "x-key-bin"], "want a header name"),
    (["--api-key-header", "bad header"], "want a header name"),
])
def test_a_bad_header_name_is_a_one_line_exit_2(secrets, args, words):
    _, files = secrets
    result = run_cli(["serve", "--model-repository", MODELS, "--model", "simple", "--port", "0",
                      "--token-file", files["submit"], *args])
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_key_header_without_a_token_is_refused(secrets):
    result = run_cli(["serve", "--model-repository", MODELS, "--model", "simple", "--port", "0",
                      "--api-key-header", "X-Api-Key"])
    assert result.returncode == 2 and "give the token too" in result.stderr, result.stderr


def test_the_key_is_compared_whole_for_every_role():
    auth = TokenAuth({"submit": TOKEN, "read": READ}, "X-Api-Key")
    assert auth.api_key_header == "x-api-key" and check_api_key_header(" X-Api-Key ") == "x-api-key"
    assert auth.role_in({"x-api-key": TOKEN}) == "submit" and auth.role_in({"x-api-key": READ}) == "read"
    assert auth.role_in({"x-api-key": TOKEN + "x"}) is None and auth.role_in({"x-api-key": ""}) is None
    assert auth.role_in({"authorization": TOKEN}) is None  # the bearer header still wants "Bearer "
    assert TokenAuth({"submit": TOKEN}).role_in({"x-api-key": TOKEN}) is None  # no header named: not read
