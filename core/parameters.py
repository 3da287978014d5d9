"""Request and response parameters (protobuf map<string, InferParameter>) <-> plain Python values.

The client sets them on requests; the server reads them (sequence ids, contexts) and sets them on
REST answers; both go through these two functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tensorfleet.protos import inference_pb2 as pb

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
    """The value an InferParameter holds, or None when none of its fields is set."""
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)
