"""Bounds on every input of a model server: message size, shapes against buffers, model loads
that would bring code or leave the repository, and the cap on rpcs in flight. Raw gRPC with
our protos (the wire format any OIP client sends), against a real server on loopback."""

from __future__ import annotations

import queue
import shutil
import struct
import threading

import grpc
import numpy as np
import pytest

from tensorfleet.client import ConnectionOptions, InferenceClient, ResourceExhausted
from tensorfleet.protos import inference_pb2 as pb
from tensorfleet.protos import inference_pb2_grpc as pb_grpc
from tests.serving import REPO_ROOT

from .helpers import snapshot, spawned

MODELS = REPO_ROOT / "tests" / "models"
ROW = {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    for name in ("simple", "echo_bytes"):
        shutil.copytree(MODELS / name, root / "repository" / name)
    (root / "outside").mkdir()
    args = ["serve", "--model-repository", root / "repository", "--model", "simple", "--model", "echo_bytes",
            "--max-message-mb", "1", "--max-concurrent-rpcs", "2"]
    with spawned(args, root / "run") as process:
        yield {"process": process, "root": root}


@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(server["process"].address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def still_serves(server) -> None:
    """The server answers a normal request, and no file appeared in the repository or outside it."""
    with InferenceClient(server["process"].address) as client:
        assert client.infer("simple", ROW)["OUTPUT0"][0, 0] == 2


def _raw(shape, datatype="FP32", raw=b"", model="simple", name="INPUT0") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _refused(stub, request, code: grpc.StatusCode, *words: str, method="ModelInfer") -> str:
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, method)(request, timeout=30)
    assert caught.value.code() == code, caught.value.details()
    for word in words:
        assert word in caught.value.details(), caught.value.details()
    return caught.value.details()


def test_an_oversized_request_is_resource_exhausted_naming_the_flag(server):
    before = snapshot(server["root"])
    big = {"INPUT0": np.ones((8, 16), np.float32), "INPUT1": np.ones((8, 16), np.float32)}
    options = ConnectionOptions(max_message_bytes=64 << 20)  # the client would send it: the server decides
    with InferenceClient(server["process"].address, options=options) as client:
        blob = {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)}
        client.infer("simple", blob)
        with pytest.raises(ResourceExhausted, match="--max-message-mb"):
            client.infer("echo_bytes", {"text": np.array([b"x" * (2 << 20)], dtype=object)})
        assert client.infer("simple", big)["OUTPUT0"].shape == (8, 16)
    still_serves(server)
    assert snapshot(server["root"]) == before


@pytest.mark.parametrize("shape", [[2**62, 2**62], [2**31, 2**31, 2**31], [8, 2**60]])
def test_a_shape_whose_product_overflows_is_refused_before_allocation(server, stub, shape):
    _refused(stub, _raw(shape, raw=b"\0" * 64), grpc.StatusCode.INVALID_ARGUMENT, "INPUT0")
    still_serves(server)


def test_a_buffer_that_disagrees_with_its_shape_is_refused(server, stub):
    request = _raw([1, 16], raw=b"\0" * 10)
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(b"\0" * 64)
    _refused(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "INPUT0", "64 bytes", "got 10")
    still_serves(server)


def test_a_negative_dimension_is_refused(server, stub):
    _refused(stub, _raw([1, -16], raw=b""), grpc.StatusCode.INVALID_ARGUMENT, "negative")
    still_serves(server)


def test_bytes_elements_beyond_the_buffer_are_refused(server, stub):
    request = _raw([2**40], datatype="BYTES", raw=struct.pack("<I", 3) + b"abc", model="echo_bytes", name="text")
    _refused(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "text")
    lying = _raw([1], datatype="BYTES", raw=struct.pack("<I", 2**31) + b"abc", model="echo_bytes", name="text")
    _refused(stub, lying, grpc.StatusCode.INVALID_ARGUMENT, "declares")
    still_serves(server)


@pytest.mark.parametrize("parameter", ["file:1/model.py", "config"])
def test_repository_model_load_never_loads_files_sent_in_the_request(server, stub, parameter):
    before = snapshot(server["root"])
    request = pb.RepositoryModelLoadRequest(model_name="simple")
    request.parameters[parameter].bytes_param = b"open('/tmp/pwned', 'w')\n"
    _refused(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "refused", method="RepositoryModelLoad")
    assert snapshot(server["root"]) == before
    still_serves(server)


@pytest.mark.parametrize("name", ["../outside", "/etc", "simple/../../outside", "..", "a\\b"])
def test_repository_model_load_never_leaves_the_repository(server, stub, name):
    before = snapshot(server["root"])
    request = pb.RepositoryModelLoadRequest(model_name=name)
    _refused(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "not a folder name", method="RepositoryModelLoad")
    assert snapshot(server["root"]) == before
    still_serves(server)


def test_rpcs_beyond_the_concurrency_cap_are_resource_exhausted(server):
    """Two streams held open fill --max-concurrent-rpcs 2; the next rpc is refused, not queued."""
    address = server["process"].address
    gates, replies, channels = [], [], []
    for _ in range(2):
        gate: queue.Queue = queue.Queue()

        def requests(gate=gate):
            while (item := gate.get()) is not None:
                yield item

        channel = grpc.insecure_channel(address)
        channels.append(channel)
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
        gate.put(_ok_request())
        replies.append(next(call))  # the stream is open and answered: it holds an rpc slot
        gates.append((gate, call))
    try:
        with InferenceClient(address) as client, pytest.raises(ResourceExhausted, match="(?i)concurrent rpc limit"):
            client.infer("simple", ROW)
    finally:
        for gate, call in gates:
            gate.put(None)
            threading.Thread(target=_drain, args=(call,), daemon=True).start()
        for channel in channels:
            channel.close()
    assert all(not reply.error_message for reply in replies)
    _wait_until_serving(server)


def _drain(call) -> None:
    try:
        list(call)
    except grpc.RpcError:
        pass  # its channel closed under it: that is the point


def _ok_request() -> pb.ModelInferRequest:
    request = _raw([1, 16], raw=np.ones(16, np.float32).tobytes())
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones(16, np.float32).tobytes())
    return request


def _wait_until_serving(server) -> None:
    import time

    deadline = time.monotonic() + 30
    while True:
        try:
            still_serves(server)
            return
        except ResourceExhausted:  # the closed streams' slots free up asynchronously
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
