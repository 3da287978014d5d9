"""Malformed requests, sent through raw gRPC stubs to a real server: each gets the right status
code and a message that names the tensor or field and what was expected; the server lives on.

Every case is its own test id. The same cases go once more through one ModelStreamInfer
stream among good requests, where each must come back as `error_message` for its own id.
"""

from __future__ import annotations

import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorfleet.core.settings import channel_options
from tensorfleet.protos import inference_pb2 as pb
from tensorfleet.protos import inference_pb2_grpc as pb_grpc
from tests.serving import REPO_ROOT, running_server

MODELS = REPO_ROOT / "tests" / "models"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def _f32(rows: int, offset: float = 0.0) -> np.ndarray:
    return (np.arange(rows * 16, dtype=np.float32).reshape(rows, 16) + offset) / 8


def simple_request(rows: int = 1, request_id: str = "") -> pb.ModelInferRequest:
    """A valid request for `simple` (two FP32 [rows, 16] inputs, raw contents)."""
    request = pb.ModelInferRequest(model_name="simple", id=request_id)
    for name, offset in (("INPUT0", 0.0), ("INPUT1", 100.0)):
        request.inputs.add(name=name, datatype="FP32", shape=[rows, 16])
        request.raw_input_contents.append(_f32(rows, offset).tobytes())
    return request


def bytes_request(raw: bytes, shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="echo_bytes")
    request.inputs.add(name="text", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def typed_simple(values0: list[float], values1: list[float], shape=(1, 16)) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="simple")
    for name, values in (("INPUT0", values0), ("INPUT1", values1)):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=list(shape))
        tensor.contents.fp32_contents.extend(values)
    return request


def ragged_request(shape: list[int], raw: bytes, datatype: str = "INT64") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="ragged_sum")
    request.inputs.add(name="tokens", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


@dataclass
class Case:
    id: str
    build: Callable[[], pb.ModelInferRequest]
    words: list[str]  # each must appear in the error message (case-insensitive)
    code: grpc.StatusCode = INVALID
    stream: bool = True  # also sent on the stream test
    notes: str = field(default="")


def _mutate(
    base: Callable[[], pb.ModelInferRequest], change: Callable[[pb.ModelInferRequest], None]
):
    def build() -> pb.ModelInferRequest:
        request = base()
        change(request)
        return request

    return build


def _set(path: str, value):
    """Mutation that sets one attribute path, e.g. 'inputs.0.datatype'."""

    def change(request: pb.ModelInferRequest) -> None:
        *parents, last = path.split(".")
        target = request
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        if isinstance(value, list):
            del getattr(target, last)[:]
            getattr(target, last).extend(value)
        else:
            setattr(target, last, value)

    return change


def _raw(index: int, data: bytes):
    def change(request: pb.ModelInferRequest) -> None:
        request.raw_input_contents[index] = data

    return change


def _add_input(name: str, datatype: str = "FP32", shape=(1, 16), raw: bytes | None = None):
    def change(request: pb.ModelInferRequest) -> None:
        request.inputs.add(name=name, datatype=datatype, shape=list(shape))
        request.raw_input_contents.append(raw if raw is not None else _f32(1).tobytes())

    return change


def _drop_input(index: int):
    def change(request: pb.ModelInferRequest) -> None:
        del request.inputs[index]
        del request.raw_input_contents[index]

    return change


def _param(key: str, kind: str, value, on_input: bool = False):
    def change(request: pb.ModelInferRequest) -> None:
        target = request.inputs[0].parameters if on_input else request.parameters
        setattr(target[key], kind, value)

    return change


def _both_contents(request: pb.ModelInferRequest) -> None:
    request.inputs[0].contents.fp32_contents.extend(_f32(1).ravel().tolist())


def _fp16_typed() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="simple_fp16")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="FP16", shape=[1, 16])
        tensor.contents.fp32_contents.extend([1.5] * 16)
    return request


def _no_contents() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
    return request


def _one_raw_for_two_inputs(request: pb.ModelInferRequest) -> None:
    del request.raw_input_contents[1]


def _three_raws_for_two_inputs(request: pb.ModelInferRequest) -> None:
    request.raw_input_contents.append(_f32(1).tobytes())


def _duplicate_input(request: pb.ModelInferRequest) -> None:
    request.inputs[1].name = "INPUT0"


def _rows_disagree(request: pb.ModelInferRequest) -> None:
    request.inputs[1].shape[0] = 2
    request.raw_input_contents[1] = _f32(2).tobytes()


def _zero_rows() -> pb.ModelInferRequest:
    request = simple_request()
    for tensor in request.inputs:
        tensor.shape[0] = 0
    request.raw_input_contents[0] = request.raw_input_contents[1] = b""
    return request


def _unknown_output(request: pb.ModelInferRequest) -> None:
    request.outputs.add(name="OUTPUT9")


ONE_ROW_BYTES = 16 * 4
CASES: list[Case] = [
    Case(
        "unknown_model",
        _mutate(simple_request, _set("model_name", "no_such_model")),
        ["no_such_model"],
        NOT_FOUND,
    ),
    Case("empty_model_name", _mutate(simple_request, _set("model_name", "")), ["model"], NOT_FOUND),
    Case(
        "unknown_model_version",
        _mutate(simple_request, _set("model_version", "7")),
        ["simple", "7"],
        NOT_FOUND,
    ),
    Case(
        "wrong_dtype_int32",
        _mutate(simple_request, _set("inputs.0.datatype", "INT32")),
        ["INPUT0", "FP32", "INT32"],
    ),
    Case(
        "wrong_dtype_fp64_right_bytes",
        _mutate(
            _mutate(simple_request, _set("inputs.1.datatype", "FP64")),
            _raw(1, np.zeros((1, 16)).tobytes()),
        ),
        ["INPUT1", "FP32"],
    ),
    Case(
        "unknown_datatype_name",
        _mutate(simple_request, _set("inputs.0.datatype", "FLOAT")),
        ["INPUT0", "FP32"],
    ),
    Case(
        "lowercase_datatype",
        _mutate(simple_request, _set("inputs.0.datatype", "fp32")),
        ["INPUT0", "FP32"],
    ),
    Case(
        "empty_datatype", _mutate(simple_request, _set("inputs.1.datatype", "")), ["INPUT1", "FP32"]
    ),
    Case(
        "bf16_for_fp32",
        _mutate(_mutate(simple_request, _set("inputs.0.datatype", "BF16")), _raw(0, b"\0" * 32)),
        ["INPUT0", "FP32"],
    ),
    Case(
        "shape_mismatch_15",
        _mutate(_mutate(simple_request, _set("inputs.0.shape", [1, 15])), _raw(0, b"\0" * 60)),
        ["INPUT0", "16"],
    ),
    Case(
        "raw_one_byte_short",
        _mutate(simple_request, _raw(0, b"\0" * (ONE_ROW_BYTES - 1))),
        ["INPUT0", "64", "63"],
    ),
    Case(
        "raw_four_bytes_long",
        _mutate(simple_request, _raw(1, b"\0" * (ONE_ROW_BYTES + 4))),
        ["INPUT1", "64", "68"],
    ),
    Case("raw_zero_bytes_one_row", _mutate(simple_request, _raw(0, b"")), ["INPUT0", "64"]),
    Case("zero_rows", _zero_rows, ["INPUT0", "row"]),
    Case(
        "rank_missing_batch_dim",
        _mutate(simple_request, _set("inputs.0.shape", [16])),
        ["INPUT0", "16"],
    ),
    Case(
        "rank_extra_dim",
        _mutate(simple_request, _set("inputs.0.shape", [1, 1, 16])),
        ["INPUT0", "16"],
    ),
    Case(
        "negative_dim", _mutate(simple_request, _set("inputs.0.shape", [-1, 16])), ["INPUT0", "-1"]
    ),
    Case("batch_over_max", lambda: simple_request(rows=9), ["9", "8", "max_batch_size"]),
    Case("rows_disagree", _mutate(simple_request, _rows_disagree), ["INPUT0", "INPUT1", "rows"]),
    Case(
        "misnamed_input",
        _mutate(simple_request, _set("inputs.1.name", "input1")),
        ["input1", "INPUT1"],
    ),
    Case("extra_input", _mutate(simple_request, _add_input("EXTRA")), ["EXTRA", "INPUT0"]),
    Case("empty_input_name", _mutate(simple_request, _set("inputs.0.name", "")), ["INPUT0"]),
    Case("missing_input", _mutate(simple_request, _drop_input(1)), ["INPUT1"]),
    Case(
        "no_inputs_at_all", lambda: pb.ModelInferRequest(model_name="simple"), ["INPUT0", "INPUT1"]
    ),
    Case("duplicate_input", _mutate(simple_request, _duplicate_input), ["INPUT0"]),
    Case(
        "raw_count_below_inputs",
        _mutate(simple_request, _one_raw_for_two_inputs),
        ["raw_input_contents", "2", "1"],
    ),
    Case(
        "raw_count_above_inputs",
        _mutate(simple_request, _three_raws_for_two_inputs),
        ["raw_input_contents", "2", "3"],
    ),
    Case(
        "raw_and_typed_both_set",
        _mutate(simple_request, _both_contents),
        ["INPUT0", "raw", "contents"],
    ),
    Case("typed_count_short", lambda: typed_simple([1.0] * 15, [1.0] * 16), ["INPUT0", "16", "15"]),
    Case("typed_count_long", lambda: typed_simple([1.0] * 16, [1.0] * 17), ["INPUT1", "16", "17"]),
    Case(
        "typed_wrong_field",
        _mutate(
            lambda: typed_simple([1.0] * 16, []),
            lambda r: r.inputs[1].contents.int_contents.extend([1] * 16),
        ),
        ["INPUT1", "fp32_contents"],
    ),
    Case("typed_fp16", _fp16_typed, ["INPUT0", "FP16", "raw"]),
    Case("no_contents_at_all", _no_contents, ["INPUT0", "16"]),
    Case("bytes_truncated_prefix", lambda: bytes_request(b"\x05\x00", [1]), ["text", "prefix"]),
    Case(
        "bytes_length_beyond_buffer",
        lambda: bytes_request(struct.pack("<I", 100) + b"abc", [1]),
        ["text", "100", "3"],
    ),
    Case(
        "bytes_trailing_bytes", lambda: bytes_request(_prefixed(b"ok") + b"zz", [1]), ["text", "2"]
    ),
    Case(
        "bytes_fewer_elements_than_shape",
        lambda: bytes_request(_prefixed(b"one"), [2]),
        ["text", "2"],
    ),
    Case("bytes_zero_rows", lambda: bytes_request(b"", [0]), ["text", "row"]),
    Case(
        "bytes_rows_far_over_batch_limit",
        lambda: bytes_request(_prefixed(b"x"), [2**40]),
        ["text", "32"],
    ),
    Case("ragged_huge_dim_tiny_buffer", lambda: ragged_request([1, 2**60], b"\0" * 8), ["tokens"]),
    Case("ragged_wrong_rank", lambda: ragged_request([3], b"\0" * 24), ["tokens"]),
    Case(
        "ragged_wrong_dtype",
        lambda: ragged_request([1, 3], b"\0" * 12, "FP32"),
        ["tokens", "INT64"],
    ),
    Case(
        "unknown_requested_output", _mutate(simple_request, _unknown_output), ["OUTPUT9", "OUTPUT0"]
    ),
    Case(
        "exclusive_param_string",
        _mutate(simple_request, _param("tensorfleet.exclusive", "string_param", "yes")),
        ["tensorfleet.exclusive", "bool"],
    ),
    Case(
        "exclusive_param_int",
        _mutate(simple_request, _param("tensorfleet.exclusive", "int64_param", 1)),
        ["tensorfleet.exclusive", "bool"],
    ),
]


@pytest.fixture(scope="module")
def server():
    with running_server(
        MODELS,
        "--model",
        "simple",
        "--model",
        "simple_fp16",
        "--model",
        "echo_bytes",
        "--model",
        "ragged_sum",
    ) as running:
        yield running
        assert running.process.poll() is None, f"server died:\n{running.log()}"


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address, options=channel_options())
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _assert_words(message: str, words: list[str]) -> None:
    missing = [word for word in words if word.lower() not in message.lower()]
    assert not missing, f"error message {message!r} lacks {missing}"


def _assert_good_reply(response: pb.ModelInferResponse, rows: int = 1) -> None:
    outputs = {
        t.name: np.frombuffer(raw, "<f4").reshape(list(t.shape))
        for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    a, b = _f32(rows), _f32(rows, 100.0)
    np.testing.assert_array_equal(outputs["OUTPUT0"], a + b)
    np.testing.assert_array_equal(outputs["OUTPUT1"], a - b)


def test_cases_are_distinct_and_many() -> None:
    assert len({case.id for case in CASES}) == len(CASES) >= 30
    serialized = [case.build().SerializeToString(deterministic=True) for case in CASES]
    assert len(set(serialized)) == len(serialized), "two cases build the same request"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_malformed_request(stub, server, case: Case) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(case.build(), timeout=30)
    error = caught.value
    assert error.code() == case.code, f"{case.id}: got {error.code()} {error.details()!r}"
    details = error.details() or ""
    assert "Traceback" not in details
    _assert_words(details, case.words)
    assert server.process.poll() is None, server.log()


def test_stream_errors_are_per_request_among_good_ones(stub, server) -> None:
    """Good and bad requests interleaved on one stream: each gets its own reply by id."""
    stream_cases = [case for case in CASES if case.stream]
    requests: list[pb.ModelInferRequest] = []
    expected: dict[str, Case | None] = {}
    for index, case in enumerate(stream_cases):
        good = simple_request(rows=1 + index % 3, request_id=f"good-{index}")
        bad = case.build()
        bad.id = f"bad-{case.id}"
        requests += [good, bad]
        expected[good.id], expected[bad.id] = None, case
    replies = list(stub.ModelStreamInfer(iter(requests), timeout=120))
    assert len(replies) == len(requests)
    seen = set()
    for reply in replies:
        rid = reply.infer_response.id
        assert rid in expected and rid not in seen, f"unexpected or repeated id {rid!r}"
        seen.add(rid)
        case = expected[rid]
        if case is None:
            assert reply.error_message == "", f"{rid}: {reply.error_message}"
            _assert_good_reply(reply.infer_response, rows=1 + int(rid.split("-")[1]) % 3)
        else:
            prefix = f"{case.code.name}: "
            assert reply.error_message.startswith(prefix), f"{case.id}: {reply.error_message!r}"
            _assert_words(reply.error_message, case.words)
    assert server.process.poll() is None


def test_stream_stays_open_after_errors(stub) -> None:
    """A stream that already carried a bad request keeps answering on the same call."""
    outgoing: queue.Queue = queue.Queue()
    replies: queue.Queue = queue.Queue()

    def requests():
        while (item := outgoing.get()) is not None:
            yield item

    call = stub.ModelStreamInfer(requests(), timeout=60)

    def read() -> None:
        try:
            for reply in call:
                replies.put(reply)
        except grpc.RpcError as error:
            replies.put(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        bad = bytes_request(b"\x05\x00", [1])
        bad.id = "first-bad"
        outgoing.put(bad)
        first = replies.get(timeout=30)
        assert isinstance(first, pb.ModelStreamInferResponse), first
        assert first.infer_response.id == "first-bad"
        assert first.error_message.startswith("INVALID_ARGUMENT: ")
        outgoing.put(simple_request(rows=2, request_id="then-good"))
        second = replies.get(timeout=30)
        assert isinstance(second, pb.ModelStreamInferResponse), second
        assert second.infer_response.id == "then-good" and second.error_message == ""
        _assert_good_reply(second.infer_response, rows=2)
    finally:
        outgoing.put(None)
        reader.join(30)
        if reader.is_alive():
            call.cancel()
    assert replies.empty(), "the stream ended with an error after its replies"


def test_server_answers_correctly_after_all_cases(stub, server) -> None:
    response = stub.ModelInfer(simple_request(rows=3, request_id="after"), timeout=30)
    assert response.id == "after"
    _assert_good_reply(response, rows=3)
    assert server.process.poll() is None


# --- a message above the server's size limit ---------------------------------------------


@pytest.fixture(scope="module")
def small_server():
    env = {"TENSORFLEET_MAX_MESSAGE_MB": "1"}
    with running_server(MODELS, "--model", "echo_bytes", env=env) as running:
        yield running
        assert running.process.poll() is None, running.log()


def test_oversized_message_is_resource_exhausted(small_server) -> None:
    channel = grpc.insecure_channel(small_server.address, options=channel_options(64 << 20))
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    try:
        big = bytes_request(_prefixed(b"a" * (2 << 20)), [1])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(big, timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        _assert_words(caught.value.details() or "", ["larger than max"])
        small = bytes_request(_prefixed(b"fits"), [1])
        reply = stub.ModelInfer(small, timeout=30)
        assert reply.raw_output_contents[0] == _prefixed(b"FITS")
    finally:
        channel.close()


# --- a repository with broken models next to a good one ----------------------------------

GOOD_MODEL = "simple"


def _write_model(root: Path, name: str, config: str, model_py: str | None = None) -> None:
    folder = root / name
    folder.mkdir()
    (folder / "config.yaml").write_text(config)
    if model_py is not None:
        (folder / "model.py").write_text(model_py)


_PLAIN_MODEL = "class Model:\n    def load(self, context):\n        pass\n\n    def predict(self, inputs):\n        return {'y': inputs['x']}\n"
_RAISING_MODEL = "class Model:\n    def load(self, context):\n        raise RuntimeError('weights are corrupt on purpose')\n\n    def predict(self, inputs):\n        return {}\n"


def _config(name: str, extra: str = "", datatype: str = "FP32") -> str:
    return (
        f"name: {name}\nbackend: python\nmax_batch_size: 4\n"
        f"inputs:\n  - {{name: x, datatype: {datatype}, shape: [2]}}\n"
        f"outputs:\n  - {{name: y, datatype: FP32, shape: [2]}}\n{extra}"
    )


BROKEN = {
    "missing_artifact": (
        _config("missing_artifact", "artifacts: {weights.bin: " + "0" * 64 + "}\n"),
        ["weights.bin", "missing"],
    ),
    "bad_checksum": (
        _config("bad_checksum", "artifacts: {model.py: " + "f" * 64 + "}\n"),
        ["model.py", "sha256"],
    ),
    "bad_config": (_config("bad_config", datatype="FLOAT32"), ["datatype", "FLOAT32"]),
    "broken_yaml": ("name: broken_yaml\ninputs: [unclosed\n", ["yaml"]),
    "wrong_name": (_config("another_name"), ["another_name", "wrong_name"]),
    "load_raises": (_config("load_raises"), ["weights are corrupt on purpose"]),
}


@pytest.fixture(scope="module")
def broken_repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    good = MODELS / GOOD_MODEL
    _write_model(
        root, GOOD_MODEL, (good / "config.yaml").read_text(), (good / "model.py").read_text()
    )
    for name, (config, _) in BROKEN.items():
        _write_model(root, name, config, _RAISING_MODEL if name == "load_raises" else _PLAIN_MODEL)
    return root


@pytest.fixture(scope="module")
def broken_server(broken_repository):
    with running_server(broken_repository) as running:
        yield running
        assert running.process.poll() is None, running.log()


def test_broken_models_are_unavailable_with_reasons(broken_server) -> None:
    with grpc.insecure_channel(broken_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        index = {
            model.name: model
            for model in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models
        }
        assert set(index) == {GOOD_MODEL, *BROKEN}
        assert index[GOOD_MODEL].state == "READY"
        for name, (_, words) in BROKEN.items():
            assert index[name].state == "UNAVAILABLE", f"{name}: {index[name]}"
            _assert_words(index[name].reason, words)
            assert not stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=30).ready
        response = stub.ModelInfer(simple_request(rows=2, request_id="good"), timeout=30)
        _assert_good_reply(response, rows=2)
        with pytest.raises(grpc.RpcError) as caught:
            request = pb.ModelInferRequest(model_name="bad_checksum")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
            request.raw_input_contents.append(b"\0" * 8)
            stub.ModelInfer(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        _assert_words(caught.value.details() or "", ["bad_checksum", "UNAVAILABLE"])


def test_load_errors_are_in_the_log(broken_server) -> None:
    log = broken_server.log()
    for name, (_, words) in BROKEN.items():
        lines = [line for line in log.splitlines() if name in line]
        assert lines, f"no log line names {name}:\n{log}"
        _assert_words("\n".join(lines), words)
