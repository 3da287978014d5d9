"""Protobuf wire format of the inference rpcs, with the tensor buffers kept out of protobuf.

Why: Python protobuf copies a `bytes` field on every append, serialize, parse and element
access, so a 16 MB tensor was copied about eight times per round trip. Here protobuf still
encodes and parses every small field (names, shapes, parameters, ids), while the repeated
raw-contents field (ModelInferRequest field 7, ModelInferResponse field 6) is written and
read directly in wire format:

- encode: the message without its raw buffers through `SerializeToString`, then each buffer
  as tag + length + bytes, all in one `b"".join` over the numpy buffers (one copy);
- decode: a scan of the top-level fields; raw buffers become memoryviews of the received
  bytes (no copy, `np.frombuffer` later), every other field goes to `ParseFromString`.

Protobuf parsers accept fields in any order, so tritonclient and grpcurl read what this
writes; the decoder accepts anything a standard encoder writes (any field order, unknown
fields; a message with group fields is handed whole to protobuf).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from tensorfleet.protos import inference_pb2 as pb

from .errors import InvalidArgument

#: Anything with a contiguous buffer: bytes, memoryview, a C-contiguous numpy array.
Buffer = bytes | bytearray | memoryview | np.ndarray

REQUEST_RAW_FIELD = 7  # ModelInferRequest.raw_input_contents
RESPONSE_RAW_FIELD = 6  # ModelInferResponse.raw_output_contents
STREAM_RESPONSE_FIELD = 2  # ModelStreamInferResponse.infer_response

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"

_LENGTH_DELIMITED = 2
_M = TypeVar("_M", bound=Message)


class WireError(InvalidArgument):
    """Bytes that are not a valid protobuf message (truncated, bad tag, bad wire type)."""


@dataclass(slots=True)
class InferRequest:
    """A ModelInferRequest whose raw_input_contents travel beside it as buffers.

    `message.raw_input_contents` stays empty. `error` is set instead of raising when the
    server received bytes that do not parse: the rpc then answers INVALID_ARGUMENT (or, on a
    stream, an error for that request alone) rather than failing inside grpc.
    """

    message: pb.ModelInferRequest = field(default_factory=pb.ModelInferRequest)
    raw: list[Buffer] = field(default_factory=list)
    error: WireError | None = None

    @classmethod
    def of(cls, request: pb.ModelInferRequest | InferRequest) -> InferRequest:
        """The same request as an InferRequest (a plain message keeps its raw field: no copy)."""
        if isinstance(request, InferRequest):
            return request
        return cls(request, list(request.raw_input_contents))


@dataclass(slots=True)
class InferResponse:
    """A ModelInferResponse whose raw_output_contents travel beside it as buffers."""

    message: pb.ModelInferResponse = field(default_factory=pb.ModelInferResponse)
    raw: list[Buffer] = field(default_factory=list)


@dataclass(slots=True)
class StreamResponse:
    """ModelStreamInferResponse: an error for one request, or its response."""

    error_message: str = ""
    response: InferResponse = field(default_factory=InferResponse)


# --- encode -----------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int) -> bytes:
    return _varint((number << 3) | _LENGTH_DELIMITED)


def _parts(message: Message, raw: Sequence[Buffer], number: int) -> tuple[list[Any], int]:
    """The pieces of `message` with `raw` appended as field `number`, and their total size."""
    head = message.SerializeToString()
    parts: list[Any] = [head]
    size = len(head)
    key = _key(number)
    for buffer in raw:
        view = memoryview(buffer)
        if not view.c_contiguous:
            raise ValueError("raw tensor buffers must be C-contiguous")
        prefix = key + _varint(view.nbytes)
        parts += (prefix, view)
        size += len(prefix) + view.nbytes
    return parts, size


def encode_request(request: InferRequest | pb.ModelInferRequest) -> bytes:
    """Wire bytes of a request (a plain protobuf message is serialized as usual)."""
    if isinstance(request, Message):
        return request.SerializeToString()
    parts, _ = _parts(request.message, request.raw, REQUEST_RAW_FIELD)
    return b"".join(parts)


def encode_response(response: InferResponse | pb.ModelInferResponse) -> bytes:
    if isinstance(response, Message):
        return response.SerializeToString()
    parts, _ = _parts(response.message, response.raw, RESPONSE_RAW_FIELD)
    return b"".join(parts)


def encode_stream_response(reply: StreamResponse | pb.ModelStreamInferResponse) -> bytes:
    """infer_response is written as field 2 around the response's pieces: still one copy."""
    if isinstance(reply, Message):
        return reply.SerializeToString()
    head = pb.ModelStreamInferResponse(error_message=reply.error_message).SerializeToString()
    parts, size = _parts(reply.response.message, reply.response.raw, RESPONSE_RAW_FIELD)
    return b"".join([head, _key(STREAM_RESPONSE_FIELD), _varint(size), *parts])


# --- decode -----------------------------------------------------------------------------
class _NeedsProtobuf(Exception):
    """The scan met a group field (proto2 only, never written by OIP clients)."""


def _read_varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError(f"varint longer than 10 bytes at byte {pos}")
    raise WireError(f"message ends inside a varint at byte {pos}")


def _split(data: Buffer, raw_number: int) -> tuple[Buffer, list[memoryview]]:
    """(the bytes of every top-level field but `raw_number`, views of that field's payloads)."""
    view = memoryview(data)
    end = len(view)
    kept: list[memoryview] = []
    raw: list[memoryview] = []
    pos = run = 0  # `run`: where the current stretch of kept fields began
    while pos < end:
        start = pos
        key, pos = _read_varint(view, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {start}")
        if wire_type == _LENGTH_DELIMITED:
            size, pos = _read_varint(view, pos, end)
            if pos + size > end:
                raise WireError(
                    f"field {number} at byte {start} declares {size} bytes, {end - pos} remain"
                )
            if number == raw_number:
                if start > run:
                    kept.append(view[run:start])
                raw.append(view[pos : pos + size])
                run = pos + size
            pos += size
        elif wire_type == 0:
            _, pos = _read_varint(view, pos, end)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > end:
                raise WireError(f"fixed-width field {number} at byte {start} is cut off")
        elif wire_type in (3, 4):
            raise _NeedsProtobuf
        else:
            raise WireError(f"invalid wire type {wire_type} for field {number} at byte {start}")
    if not raw:
        return view, raw
    if run < end:
        kept.append(view[run:end])
    return (kept[0] if len(kept) == 1 else b"".join(kept)), raw


def _parse(message: _M, data: Buffer) -> _M:
    try:
        message.MergeFromString(data)
    except DecodeError as error:
        raise WireError(f"malformed {type(message).__name__}: {error}") from None
    return message


def _decode(message: _M, data: Buffer, raw_number: int, raw_name: str) -> tuple[_M, list[Buffer]]:
    """Parse into `message`; its raw field comes back as views (or, after a fallback, bytes)."""
    try:
        rest, raw = _split(data, raw_number)
    except _NeedsProtobuf:
        _parse(message, data)
        raw_field = getattr(message, raw_name)
        copied: list[Buffer] = list(raw_field)
        del raw_field[:]
        return message, copied
    except WireError as error:
        raise WireError(f"malformed {type(message).__name__}: {error.message}") from None
    return _parse(message, rest), list(raw)


def decode_request(data: bytes) -> InferRequest:
    """Strict decode: malformed bytes raise WireError (naming the field and byte offset)."""
    message, raw = _decode(pb.ModelInferRequest(), data, REQUEST_RAW_FIELD, "raw_input_contents")
    return InferRequest(message, raw)


def decode_request_or_error(data: bytes) -> InferRequest:
    """Server-side decode: malformed bytes give a request carrying the error, for the rpc to
    raise as INVALID_ARGUMENT (an exception inside grpc's deserializer would be UNKNOWN)."""
    try:
        return decode_request(data)
    except WireError as error:
        return InferRequest(error=error)


def decode_response(data: Buffer) -> InferResponse:
    message, raw = _decode(pb.ModelInferResponse(), data, RESPONSE_RAW_FIELD, "raw_output_contents")
    return InferResponse(message, raw)


def decode_stream_response(data: bytes) -> StreamResponse:
    """Field 2 (infer_response) is split again for its raw buffers; repeats merge, as in protobuf."""
    try:
        rest, nested = _split(data, STREAM_RESPONSE_FIELD)
    except _NeedsProtobuf:
        whole = _parse(pb.ModelStreamInferResponse(), data)
        return StreamResponse(whole.error_message, decode_response(whole.infer_response.SerializeToString()))
    except WireError as error:
        raise WireError(f"malformed ModelStreamInferResponse: {error.message}") from None
    reply = StreamResponse(_parse(pb.ModelStreamInferResponse(), rest).error_message)
    for part in nested:
        message, raw = _decode(reply.response.message, part, RESPONSE_RAW_FIELD, "raw_output_contents")
        reply.response.raw.extend(raw)
    return reply


def infer_methods(channel: Any) -> tuple[Any, Any]:
    """ModelInfer and ModelStreamInfer on a sync or asyncio channel, through this codec."""
    infer = channel.unary_unary(INFER_METHOD, request_serializer=encode_request, response_deserializer=decode_response)
    stream = channel.stream_stream(
        STREAM_METHOD, request_serializer=encode_request, response_deserializer=decode_stream_response
    )
    return infer, stream
