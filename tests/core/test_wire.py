"""client/wire.py against protobuf's own encoder and parser, and through a real server.

What protobuf writes, the wire decoder reads (any field order, unknown fields, groups,
packed typed contents); what the wire encoder writes, protobuf reads; malformed bytes are a
WireError (INVALID_ARGUMENT), never another exception, and never kill the server.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tensorfleet.client import InferenceClient
from tensorfleet.client.messages import parse_infer_response
from tensorfleet.core import wire
from tensorfleet.core.parameters import set_parameters
from tensorfleet.core.settings import channel_options
from tensorfleet.protos import inference_pb2 as pb
from tests.inprocess import inprocess_server
from tests.serving import REPO_ROOT

DTYPES = {"FP32": "<f4", "INT64": "<i8", "UINT8": "u1", "FP16": "<f2", "BOOL": "?"}
names = st.text(max_size=8)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw) -> tuple[str, list[int], np.ndarray]:
    datatype = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    return datatype, shape, draw(arrays(DTYPES[datatype], shape))


def _parameters(draw, target) -> None:
    values = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), names)
    set_parameters(target, draw(st.dictionaries(names, values, max_size=3)))


@st.composite
def requests(draw) -> tuple[pb.ModelInferRequest, list[np.ndarray]]:
    """A request without its raw field, and the arrays that belong in it."""
    message = pb.ModelInferRequest(model_name=draw(names), model_version=draw(names), id=draw(names))
    _parameters(draw, message.parameters)
    raw = []
    for index, (datatype, shape, array) in enumerate(draw(st.lists(tensors(), max_size=6))):
        tensor = message.inputs.add(name=f"in{index}", datatype=datatype, shape=shape)
        if draw(st.booleans()):  # packed typed contents, as grpcurl would send
            tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-5, 5), max_size=4)))
        raw.append(array)
    for name in draw(st.lists(names, max_size=3)):
        message.outputs.add(name=name)
    return message, raw


@st.composite
def responses(draw) -> tuple[pb.ModelInferResponse, list[np.ndarray]]:
    message = pb.ModelInferResponse(model_name=draw(names), model_version=draw(names), id=draw(names))
    _parameters(draw, message.parameters)
    raw = []
    for index, (datatype, shape, array) in enumerate(draw(st.lists(tensors(), max_size=6))):
        message.outputs.add(name=f"out{index}", datatype=datatype, shape=shape)
        raw.append(array)
    return message, raw


def _with_raw(message, raw, field_name: str):
    full = type(message)()
    full.CopyFrom(message)
    getattr(full, field_name).extend(array.tobytes() for array in raw)
    return full


def _views(raw) -> list[bytes]:
    return [bytes(buffer) for buffer in raw]


def _fields(message) -> list[tuple[int, bytes]]:
    """(field number, encoding) of every top-level field, one repeated element per entry."""
    out = []
    for descriptor, value in message.ListFields():
        values = value if descriptor.is_repeated else [value]
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            values = [(k, value[k]) for k in value]
        for item in values:
            single = type(message)()
            target = getattr(single, descriptor.name)
            if isinstance(item, tuple):
                target[item[0]].CopyFrom(item[1])
            elif descriptor.is_repeated and descriptor.message_type:
                target.add().CopyFrom(item)
            elif descriptor.is_repeated:
                target.append(item)
            elif descriptor.message_type:
                target.CopyFrom(item)
            else:
                setattr(single, descriptor.name, item)
            out.append((descriptor.number, single.SerializeToString()))
    return out


def _shuffled(draw, chunks: list[tuple[int, bytes]]) -> bytes:
    """Any interleaving of the fields that keeps each field's own elements in order."""
    order = draw(st.permutations(range(len(chunks))))
    by_number: dict[int, list[bytes]] = {}
    for number, data in chunks:
        by_number.setdefault(number, []).append(data)
    return b"".join(by_number[chunks[i][0]].pop(0) for i in order)


def _unknown_field(draw) -> bytes:
    number = draw(st.integers(20, 2000))
    kind = draw(st.sampled_from([0, 1, 2, 5]))
    key = wire._varint((number << 3) | kind)
    if kind == 0:
        return key + wire._varint(draw(st.integers(0, 2**64 - 1)))
    if kind == 1:
        return key + draw(st.binary(min_size=8, max_size=8))
    if kind == 5:
        return key + draw(st.binary(min_size=4, max_size=4))
    payload = draw(st.binary(max_size=20))
    return key + wire._varint(len(payload)) + payload


# --- round trips against protobuf ---------------------------------------------------------
@FAST
@given(requests())
def test_request_round_trips_with_protobuf(case) -> None:
    message, raw = case
    full = _with_raw(message, raw, "raw_input_contents")
    ours = wire.decode_request(full.SerializeToString())
    assert ours.error is None and ours.message == message
    assert _views(ours.raw) == [a.tobytes() for a in raw]
    written = wire.encode_request(wire.InferRequest(message, raw))
    assert pb.ModelInferRequest.FromString(written) == full
    again = wire.decode_request(written)
    assert again.message == message and _views(again.raw) == _views(ours.raw)


@FAST
@given(responses(), st.text(max_size=10))
def test_stream_response_round_trips_with_protobuf(case, error_message) -> None:
    message, raw = case
    full = pb.ModelStreamInferResponse(
        error_message=error_message, infer_response=_with_raw(message, raw, "raw_output_contents")
    )
    ours = wire.decode_stream_response(full.SerializeToString())
    assert ours.error_message == error_message and ours.response.message == message
    assert _views(ours.response.raw) == [a.tobytes() for a in raw]
    reply = wire.StreamResponse(error_message, wire.InferResponse(message, raw))
    assert pb.ModelStreamInferResponse.FromString(wire.encode_stream_response(reply)) == full
    unary = wire.decode_response(wire.encode_response(wire.InferResponse(message, raw)))
    assert unary.message == message and _views(unary.raw) == _views(ours.response.raw)


@FAST
@given(st.data())
def test_any_field_order_and_unknown_fields(data) -> None:
    message, raw = data.draw(requests())
    full = _with_raw(message, raw, "raw_input_contents")
    unknown = [(-1 - i, _unknown_field(data.draw)) for i in range(data.draw(st.integers(0, 3)))]
    chunks = _fields(full) + unknown
    encoded = _shuffled(data.draw, chunks)
    expected = pb.ModelInferRequest.FromString(encoded)
    ours = wire.decode_request(encoded)
    assert _views(ours.raw) == list(expected.raw_input_contents)
    del expected.raw_input_contents[:]
    assert ours.message == expected
    assert ours.message.SerializeToString() == expected.SerializeToString()  # unknown fields kept


@FAST
@given(st.data())
def test_stream_response_fields_in_any_order_and_split_submessages(data) -> None:
    """infer_response may come in several pieces (protobuf merges them) around error_message."""
    message, raw = data.draw(responses())
    full = _with_raw(message, raw, "raw_output_contents")
    pieces = [wire._key(2) + wire._varint(len(c)) + c for _, c in _fields(full)]
    error = pb.ModelStreamInferResponse(error_message=data.draw(names)).SerializeToString()
    encoded = _shuffled(data.draw, [(2, p) for p in pieces] + [(1, error)])
    expected = pb.ModelStreamInferResponse.FromString(encoded)
    ours = wire.decode_stream_response(encoded)
    assert ours.error_message == expected.error_message
    assert _views(ours.response.raw) == list(expected.infer_response.raw_output_contents)
    del expected.infer_response.raw_output_contents[:]
    assert ours.response.message == expected.infer_response


def test_group_fields_fall_back_to_protobuf() -> None:
    message = pb.ModelInferRequest(model_name="m", id="1")
    message.raw_input_contents.append(b"abc")
    group = wire._varint((50 << 3) | 3) + b"\x08\x01" + wire._varint((50 << 3) | 4)
    encoded = group + message.SerializeToString()
    expected = pb.ModelInferRequest.FromString(encoded)
    ours = wire.decode_request(encoded)
    assert _views(ours.raw) == [b"abc"] and ours.message.id == "1"
    del expected.raw_input_contents[:]
    assert ours.message == expected


def test_empty_and_many_buffers() -> None:
    message = pb.ModelInferRequest(model_name="m")
    raw = [np.zeros(0, np.float32), b"", np.arange(3, dtype=np.int64)] + [np.full(7, i % 256, np.uint8) for i in range(300)]
    for index in range(len(raw)):
        message.inputs.add(name=f"x{index}")
    ours = wire.decode_request(wire.encode_request(wire.InferRequest(message, raw)))
    assert _views(ours.raw) == [bytes(memoryview(r)) for r in raw]
    assert wire.decode_request(b"").message == pb.ModelInferRequest()


def test_plain_messages_pass_through_the_encoders() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.raw_input_contents.append(b"xyz")
    assert wire.encode_request(message) == message.SerializeToString()
    assert wire.InferRequest.of(message).raw == [b"xyz"]


def test_outputs_are_views_of_the_received_bytes() -> None:
    """No copy on decode: the array's memory lies inside the message bytes."""
    message = pb.ModelInferResponse()
    message.outputs.add(name="y", datatype="FP32", shape=[4, 1000])
    data = wire.encode_response(wire.InferResponse(message, [np.ones((4, 1000), np.float32)]))
    out = parse_infer_response(wire.decode_response(data))["y"]
    start = np.frombuffer(data, np.uint8).__array_interface__["data"][0]
    assert start <= out.__array_interface__["data"][0] < start + len(data)
    assert not out.flags.writeable and out.shape == (4, 1000) and out.sum() == 4000


def test_non_contiguous_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        wire.encode_request(wire.InferRequest(pb.ModelInferRequest(), [np.ones((4, 4))[:, ::2]]))


# --- malformed bytes ------------------------------------------------------------------------
def _content(message) -> tuple[str, bytes]:
    """A message's content in protobuf's own deterministic encoding (map entries sorted by
    key: plain SerializeToString may order a map's entries differently for equal messages).
    A stream reply: its two fields."""
    if isinstance(message, pb.ModelStreamInferResponse):
        return message.error_message, message.infer_response.SerializeToString(deterministic=True)
    if isinstance(message, wire.StreamResponse):
        return message.error_message, _content(message.response)[1]
    if isinstance(message, wire.InferRequest | wire.InferResponse):
        encode = wire.encode_request if isinstance(message, wire.InferRequest) else wire.encode_response
        message = type(message.message).FromString(encode(message))
    return "", message.SerializeToString(deterministic=True)


def _same_verdict(decode, message_type, data: bytes) -> None:
    """Protobuf accepts -> we decode the same content; protobuf refuses -> WireError."""
    try:
        expected = message_type.FromString(data)
    except Exception:
        with pytest.raises(wire.WireError, match="malformed"):
            decode(data)
        return
    assert _content(decode(data)) == _content(expected)


@FAST
@given(requests(), st.data())
def test_truncated_messages(case, data) -> None:
    message, raw = case
    encoded = _with_raw(message, raw, "raw_input_contents").SerializeToString()
    cut = data.draw(st.integers(0, len(encoded)))
    _same_verdict(wire.decode_request, pb.ModelInferRequest, encoded[:cut])
    _same_verdict(wire.decode_stream_response, pb.ModelStreamInferResponse, encoded[:cut])


@FAST
@given(st.binary(max_size=64))
def test_random_bytes(data) -> None:
    _same_verdict(wire.decode_request, pb.ModelInferRequest, data)
    _same_verdict(wire.decode_response, pb.ModelInferResponse, data)
    _same_verdict(wire.decode_stream_response, pb.ModelStreamInferResponse, data)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x3a\x05ab", "declares 5 bytes"),  # field 7 longer than what is left
        (b"\x0a", "ends inside a varint"),  # length missing
        (b"\x3a\xff\xff", "ends inside a varint"),
        (b"\x0f", "invalid wire type 7"),
        (b"\x02\x00", "field number 0"),
        (b"\x3d\x01\x02", "cut off"),
        (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
        (b"\x0a\x02\xff\xfe", "malformed ModelInferRequest"),  # model_name is not UTF-8
    ],
)
def test_malformed_bytes_name_the_problem(data: bytes, words: str) -> None:
    with pytest.raises(wire.WireError, match=words):
        wire.decode_request(data)
    request = wire.decode_request_or_error(data)
    assert isinstance(request.error, wire.WireError) and request.error.code == grpc.StatusCode.INVALID_ARGUMENT


# --- through a real server -------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with inprocess_server(REPO_ROOT / "tests" / "models", "simple") as running:
        yield running
        assert running.alive(), f"server stopped:\n{running.log()}"


def _simple(rows: int, request_id: str = "") -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="simple", id=request_id)
    for name in ("INPUT0", "INPUT1"):
        message.inputs.add(name=name, datatype="FP32", shape=[rows, 16])
        message.raw_input_contents.append(np.full((rows, 16), 1.5, np.float32).tobytes())
    return message


def test_server_reads_fields_in_any_order_and_answers_protobuf(server) -> None:
    """Raw buffers first, metadata last: the server decodes it; the reply parses with protobuf."""
    chunks = _fields(_simple(2, "rev"))
    encoded = b"".join(data for _, data in reversed(chunks))
    with grpc.insecure_channel(server.address, options=channel_options()) as channel:
        call = channel.unary_unary(wire.INFER_METHOD, response_deserializer=pb.ModelInferResponse.FromString)
        reply = call(encoded, timeout=30)
    assert reply.id == "rev"
    out = {t.name: np.frombuffer(r, "<f4") for t, r in zip(reply.outputs, reply.raw_output_contents, strict=True)}
    assert (out["OUTPUT0"] == 3.0).all() and (out["OUTPUT1"] == 0.0).all()


def test_server_answers_malformed_bytes_with_invalid_argument(server) -> None:
    with grpc.insecure_channel(server.address, options=channel_options()) as channel:
        call = channel.unary_unary(wire.INFER_METHOD)
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\x0a\x02ab\x3a\x40short", timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed ModelInferRequest" in caught.value.details()
        stream = channel.stream_stream(
            wire.STREAM_METHOD, response_deserializer=pb.ModelStreamInferResponse.FromString
        )
        good = _simple(1, "good").SerializeToString()
        replies = list(stream(iter([good, b"\x3a\xff", good]), timeout=30))
    errors = [r.error_message for r in replies if r.error_message]
    assert len(replies) == 3 and len(errors) == 1 and errors[0].startswith("INVALID_ARGUMENT: malformed")
    assert [r.infer_response.id for r in replies if not r.error_message] == ["good", "good"]
    assert server.alive()


def test_sdk_round_trip_through_the_server(server) -> None:
    with InferenceClient(server.address) as client:
        x = np.arange(32, dtype=np.float32).reshape(2, 16)
        out = client.infer("simple", {"INPUT0": x, "INPUT1": x})
        np.testing.assert_array_equal(out["OUTPUT0"], 2 * x)
        rows = [{"INPUT0": x[:1] + i, "INPUT1": x[:1]} for i in range(5)]
        streamed = list(client.stream("simple", rows, window=2))
    assert [r["OUTPUT1"][0, 0] for r in streamed] == [0, 1, 2, 3, 4]
