"""Build ModelInferRequest messages and read ModelInferResponse messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tensorfleet.protos import inference_pb2 as pb

from .codec import decode_contents, decode_raw, encode_raw
from .errors import InternalError

ParameterValue = bool | int | float | str


def set_parameters(target: Any, values: Mapping[str, ParameterValue] | None) -> None:
    """Fill a protobuf map<string, InferParameter> from plain Python values."""
    for key, value in (values or {}).items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)


def parameter_value(param: pb.InferParameter) -> ParameterValue | None:
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def build_infer_request(
    model: str,
    inputs: Mapping[str, Any],
    *,
    request_id: str = "",
    outputs: Iterable[str] | None = None,
    parameters: Mapping[str, ParameterValue] | None = None,
    version: str = "",
) -> pb.ModelInferRequest:
    """One request with every input as raw contents."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    set_parameters(request.parameters, parameters)
    for name, value in inputs.items():
        datatype, shape, raw = encode_raw(value)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def parse_infer_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """name -> array for every output, from raw or typed contents."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise InternalError(
            f"response has {len(response.outputs)} outputs but {len(raw)} raw buffers"
        )
    result: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if raw:
            result[tensor.name] = decode_raw(tensor.name, tensor.datatype, shape, raw[index])
        else:
            result[tensor.name] = decode_contents(tensor.name, tensor.datatype, shape, tensor.contents)
    return result
