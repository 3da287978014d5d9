"""Build ModelInferRequest messages and read ModelInferResponse messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
import numpy as np

from tensorfleet.core.codec import decode_contents, decode_raw, encode_buffer
from tensorfleet.core.errors import InternalError, TensorfleetError, error_for_code
from tensorfleet.core.parameters import ParameterValue, parameter_value, set_parameters
from tensorfleet.core.wire import Buffer, InferRequest, InferResponse, StreamResponse
from tensorfleet.protos import inference_pb2 as pb

__all__ = [  # parameter helpers live in core.parameters (the server uses them too); kept here for users
    "ParameterValue",
    "StreamResult",
    "build_wire_request",
    "parameter_value",
    "parse_infer_response",
    "set_parameters",
    "stream_error",
    "stream_result",
]

# One answer on an ordered stream: the outputs, or the typed error of that request.
StreamResult = dict[str, np.ndarray] | TensorfleetError


def build_wire_request(
    model: str,
    inputs: Mapping[str, Any],
    *,
    request_id: str = "",
    outputs: Iterable[str] | None = None,
    parameters: Mapping[str, ParameterValue] | None = None,
    version: str = "",
) -> InferRequest:
    """One request with every input as a raw buffer kept beside the message (core.wire)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    set_parameters(request.parameters, parameters)
    raw: list[Buffer] = []
    for name, value in inputs.items():
        datatype, shape, buffer = encode_buffer(value)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        raw.append(buffer)
    for name in outputs or ():
        request.outputs.add(name=name)
    return InferRequest(request, raw)


def parse_infer_response(response: pb.ModelInferResponse | InferResponse) -> dict[str, np.ndarray]:
    """name -> array for every output, from raw or typed contents.

    Raw outputs are read-only views of the received message (np.frombuffer, no copy)."""
    if isinstance(response, InferResponse):
        message, raw = response.message, response.raw
    else:
        message, raw = response, response.raw_output_contents
    if raw and len(raw) != len(message.outputs):
        raise InternalError(
            f"response has {len(message.outputs)} outputs but {len(raw)} raw buffers"
        )
    result: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.outputs):
        shape = list(tensor.shape)
        if raw:
            result[tensor.name] = decode_raw(tensor.name, tensor.datatype, shape, raw[index])
        else:
            result[tensor.name] = decode_contents(tensor.name, tensor.datatype, shape, tensor.contents)
    return result


def stream_result(reply: StreamResponse) -> tuple[int, StreamResult]:
    """(request index, outputs or error) for one reply of an ordered stream (ids are indexes)."""
    try:
        index = int(reply.response.message.id)
    except ValueError:
        raise InternalError(f"stream reply without a request id: {reply.error_message!r}") from None
    if reply.error_message:
        return index, stream_error(reply.error_message)
    return index, parse_infer_response(reply.response)


def stream_error(message: str) -> TensorfleetError:
    """Stream errors travel as text; our server prefixes them with the status code name."""
    code_name, sep, rest = message.partition(": ")
    code = getattr(grpc.StatusCode, code_name, None) if sep else None
    if isinstance(code, grpc.StatusCode):
        return error_for_code(code, rest)
    return error_for_code(grpc.StatusCode.UNKNOWN, message)
