"""The inference rpcs' wire format, re-exported from tensorfleet.core.wire (shared with the server).

Kept so that `tensorfleet.client.wire` imports keep working for users."""

from tensorfleet.core.wire import (
    INFER_METHOD,
    REQUEST_RAW_FIELD,
    RESPONSE_RAW_FIELD,
    STREAM_METHOD,
    STREAM_RESPONSE_FIELD,
    Buffer,
    InferRequest,
    InferResponse,
    StreamResponse,
    WireError,
    decode_request,
    decode_request_or_error,
    decode_response,
    decode_stream_response,
    encode_request,
    encode_response,
    encode_stream_response,
    infer_methods,
)

__all__ = [
    "Buffer",
    "decode_request",
    "decode_request_or_error",
    "decode_response",
    "decode_stream_response",
    "encode_request",
    "encode_response",
    "encode_stream_response",
    "INFER_METHOD",
    "infer_methods",
    "InferRequest",
    "InferResponse",
    "REQUEST_RAW_FIELD",
    "RESPONSE_RAW_FIELD",
    "STREAM_METHOD",
    "STREAM_RESPONSE_FIELD",
    "StreamResponse",
    "WireError",
]
