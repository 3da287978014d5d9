"""Bounded fuzz of ModelInferRequest fields against one real server.

Requests start from a valid one for a real model and take a few random mutations (names,
datatypes, shapes, raw bytes, typed contents, parameters), or are random from scratch.
Every reply must be a well-formed response or a clean error: a deliberate status code with
a non-empty message, never UNKNOWN/INTERNAL, never a traceback; the server stays up.
"""

from __future__ import annotations

import struct
from collections import Counter

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorfleet.core.codec import expected_byte_size
from tensorfleet.core.settings import channel_options
from tensorfleet.protos import inference_pb2 as pb
from tensorfleet.protos import inference_pb2_grpc as pb_grpc
from tests.serving import REPO_ROOT, running_server

MODELS = REPO_ROOT / "tests" / "models"
SERVED = ("simple", "echo_bytes", "ragged_sum", "simple_fp16")
CLEAN_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
]
NAMES = ["INPUT0", "INPUT1", "text", "tokens", "x", "OUTPUT0", "upper", ""]
CONTENT_FIELDS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32, allow_nan=True),
    "fp64_contents": st.floats(allow_nan=True),
    "bytes_contents": st.binary(max_size=16),
}


def _prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def valid_request(model: str, rows: int, length: int, words: list[bytes]) -> pb.ModelInferRequest:
    """A request the server must accept, for one of the served models."""
    request = pb.ModelInferRequest(model_name=model)
    if model in ("simple", "simple_fp16"):
        dtype, datatype = ("<f4", "FP32") if model == "simple" else ("<f2", "FP16")
        for name in ("INPUT0", "INPUT1"):
            request.inputs.add(name=name, datatype=datatype, shape=[rows, 16])
            request.raw_input_contents.append(np.ones((rows, 16), dtype).tobytes())
    elif model == "echo_bytes":
        items = (words * rows)[:rows] or [b""] * rows
        request.inputs.add(name="text", datatype="BYTES", shape=[len(items)])
        request.raw_input_contents.append(_prefixed(items))
    else:
        request.inputs.add(name="tokens", datatype="INT64", shape=[rows, length])
        request.raw_input_contents.append(np.arange(rows * length, dtype="<i8").tobytes())
    return request


dims = st.one_of(st.integers(-2, 20), st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1]))
shapes = st.lists(dims, max_size=4)
parameter_values = st.one_of(
    st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: pb.InferParameter(string_param=v), st.text(max_size=8)),
    st.builds(lambda v: pb.InferParameter(double_param=v), st.floats()),
    st.builds(lambda v: pb.InferParameter(uint64_param=v), st.integers(0, 2**64 - 1)),
    st.just(pb.InferParameter()),
)
parameter_keys = st.one_of(
    st.sampled_from(["tensorfleet.exclusive", "priority", "timeout", ""]), st.text(max_size=8)
)


@st.composite
def mutation(draw, request: pb.ModelInferRequest) -> None:
    """Apply one random change to `request` in place."""
    kind = draw(
        st.sampled_from(
            [
                "name",
                "datatype",
                "shape",
                "raw",
                "drop_raw",
                "extra_raw",
                "contents",
                "param",
                "input_param",
                "model",
                "output",
                "add_input",
                "drop_input",
                "bytes_prefix",
            ]
        )
    )
    tensors = request.inputs
    index = draw(st.integers(0, max(len(tensors) - 1, 0)))
    if kind == "model":
        request.model_name = draw(
            st.one_of(st.sampled_from([*SERVED, "flaky_rows", ""]), st.text(max_size=12))
        )
    elif kind == "param":
        request.parameters[draw(parameter_keys)].CopyFrom(draw(parameter_values))
    elif kind == "output":
        request.outputs.add(
            name=draw(
                st.one_of(
                    st.sampled_from(["OUTPUT0", "OUTPUT1", "upper", "length", "total", "doubled"]),
                    st.text(max_size=6),
                )
            )
        )
    elif kind == "add_input":
        request.inputs.add(
            name=draw(st.sampled_from(NAMES)),
            datatype=draw(st.sampled_from(DATATYPES)),
            shape=draw(shapes),
        )
        if request.raw_input_contents or draw(st.booleans()):
            request.raw_input_contents.append(draw(st.binary(max_size=128)))
    elif kind == "extra_raw":
        request.raw_input_contents.append(draw(st.binary(max_size=64)))
    elif not tensors:
        return
    elif kind == "name":
        tensors[index].name = draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=8)))
    elif kind == "datatype":
        tensors[index].datatype = draw(st.one_of(st.sampled_from(DATATYPES), st.text(max_size=6)))
    elif kind == "shape":
        del tensors[index].shape[:]
        tensors[index].shape.extend(draw(shapes))
    elif kind == "raw" and index < len(request.raw_input_contents):
        old = request.raw_input_contents[index]
        request.raw_input_contents[index] = draw(
            st.one_of(
                st.binary(max_size=256),
                st.just(old[: draw(st.integers(0, len(old)))]),
                st.just(old + draw(st.binary(min_size=1, max_size=8))),
            )
        )
    elif kind == "drop_raw" and request.raw_input_contents:
        del request.raw_input_contents[draw(st.integers(0, len(request.raw_input_contents) - 1))]
    elif kind == "contents":
        name, values = draw(st.sampled_from(sorted(CONTENT_FIELDS.items())))
        getattr(tensors[index].contents, name).extend(draw(st.lists(values, max_size=40)))
    elif kind == "input_param":
        tensors[index].parameters[draw(parameter_keys)].CopyFrom(draw(parameter_values))
    elif kind == "drop_input":
        del tensors[index]
        if index < len(request.raw_input_contents):
            del request.raw_input_contents[index]
    elif kind == "bytes_prefix" and index < len(request.raw_input_contents):
        prefix = struct.pack("<I", draw(st.sampled_from([0, 1, 2**31, 2**32 - 1])))
        request.raw_input_contents[index] = prefix + request.raw_input_contents[index][4:]


@st.composite
def requests(draw) -> pb.ModelInferRequest:
    request = valid_request(
        draw(st.sampled_from(SERVED)),
        rows=draw(st.integers(1, 4)),
        length=draw(st.integers(1, 12)),
        words=draw(st.lists(st.binary(max_size=12), min_size=1, max_size=4)),
    )
    for _ in range(draw(st.integers(0, 4))):
        draw(mutation(request))
    request.id = draw(st.text(max_size=10))
    return request


@pytest.fixture(scope="module")
def server():
    models = [arg for name in SERVED for arg in ("--model", name)]
    with running_server(MODELS, *models) as running:
        yield running
        assert running.process.poll() is None, f"server died:\n{running.log()}"


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address, options=channel_options())
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _check_response(request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> None:
    assert response.model_name == request.model_name
    assert response.id == request.id
    assert response.outputs, "a successful reply carries outputs"
    raws = response.raw_output_contents
    assert len(raws) == len(response.outputs)
    for tensor, raw in zip(response.outputs, raws, strict=True):
        size = expected_byte_size(tensor.datatype, list(tensor.shape))
        if size is not None:
            assert len(raw) == size, (
                f"output {tensor.name}: {len(raw)} bytes for {list(tensor.shape)}"
            )


def test_fuzzed_requests_get_a_reply_or_a_clean_error(stub, server) -> None:
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(request=requests())
    def one(request: pb.ModelInferRequest) -> None:
        try:
            response = stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as error:
            details = error.details() or ""
            assert error.code() in CLEAN_CODES, f"{error.code()}: {details!r} for\n{request}"
            assert details.strip(), f"{error.code()} with an empty message for\n{request}"
            assert "Traceback" not in details
            outcomes[error.code().name] += 1
        else:
            _check_response(request, response)
            outcomes["OK"] += 1
        assert server.process.poll() is None, f"server died on\n{request}\n{server.log()}"

    one()
    print(f"fuzz outcomes: {dict(outcomes)}")
    # Not vacuous: the mix holds both accepted requests and several kinds of rejection.
    assert (
        outcomes["OK"] >= 10 and outcomes["INVALID_ARGUMENT"] >= 50 and outcomes["NOT_FOUND"] >= 1
    )


def test_server_still_correct_after_fuzz(stub, server) -> None:
    request = valid_request("simple", rows=2, length=1, words=[])
    request.id = "after-fuzz"
    response = stub.ModelInfer(request, timeout=30)
    _check_response(request, response)
    outputs = dict(
        zip([t.name for t in response.outputs], response.raw_output_contents, strict=True)
    )
    np.testing.assert_array_equal(
        np.frombuffer(outputs["OUTPUT0"], "<f4"), np.full(32, 2, np.float32)
    )
    assert "Traceback" not in server.log()
