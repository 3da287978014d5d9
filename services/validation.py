"""Check a ModelInferRequest against its model's config and decode it, before any model runs.

Every error names the tensor (or field) and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorfleet.core.codec import decode_contents, decode_raw, element_count
from tensorfleet.core.errors import InvalidArgument
from tensorfleet.core.parameters import parameter_value
from tensorfleet.core.sparse import INDICES_SUFFIX, INDPTR_SUFFIX, check_csr
from tensorfleet.protos import inference_pb2 as pb

from .model_config import ModelConfig, TensorSpec

EXCLUSIVE_PARAMETER = "tensorfleet.exclusive"


@dataclass
class DecodedRequest:
    """A validated request: decoded inputs plus what the batcher needs to place it."""

    inputs: dict[str, np.ndarray]
    rows: int
    length: int = 0  # longest ragged dimension or BYTES element, for token budgets
    exclusive: bool = False
    requested_outputs: list[str] = field(default_factory=list)
    #: A stored context (services/contexts.py): its id, and the tensors added before predict.
    context: str = ""
    context_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    #: The request's own parameters for the model (all but tensorfleet.* and the protocol's
    #: own): the batcher merges only requests with equal parameters; predict gets them.
    parameters: dict[str, bool | int | float | str] = field(default_factory=dict)


def _shape_matches(spec_shape: list[int], shape: list[int]) -> bool:
    return len(spec_shape) == len(shape) and all(
        want == -1 or want == got for want, got in zip(spec_shape, shape, strict=True)
    )


def _describe(shape: list[int]) -> str:
    return "[" + ", ".join("*" if dim == -1 else str(dim) for dim in shape) + "]"


def _has_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> bool:
    # ListFields lists only the non-empty repeated fields: no getattr per field per request.
    return tensor.HasField("contents") and bool(tensor.contents.ListFields())


def _decode_input(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | memoryview | None, spec: TensorSpec, config: ModelConfig
) -> np.ndarray:
    name, shape = tensor.name, list(tensor.shape)
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(
            f"input '{name}': datatype {tensor.datatype or '(empty)'}, model '{config.name}' expects {spec.datatype}"
        )
    expected = ([-1] if config.batched else []) + list(spec.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"input '{name}': shape {shape} has a negative dimension")
    if not _shape_matches(expected, shape):
        raise InvalidArgument(
            f"input '{name}': shape {shape}, model '{config.name}' expects {_describe(expected)}"
            + (" (first dimension = rows)" if config.batched else "")
        )
    if element_count(shape) == 0:
        raise InvalidArgument(f"input '{name}': shape {shape} is empty; send at least one row")
    if config.batched and shape[0] > config.max_batch_size:  # before decoding anything
        raise InvalidArgument(
            f"input '{name}': {shape[0]} rows is over model '{config.name}' max_batch_size {config.max_batch_size}"
        )
    if raw is not None:
        if _has_contents(tensor):
            raise InvalidArgument(
                f"input '{name}': both raw_input_contents and typed contents are set; send one"
            )
        return decode_raw(name, spec.datatype, shape, raw)
    return decode_contents(name, spec.datatype, shape, tensor.contents)


def _length(spec: TensorSpec, array: np.ndarray, batched: bool) -> int:
    if spec.datatype == "BYTES":
        return max((len(item) for item in array.reshape(-1)), default=0)
    if spec.ragged:
        axis = spec.shape.index(-1) + (1 if batched else 0)
        return int(array.shape[axis])
    return 0


def _exclusive(request: pb.ModelInferRequest) -> bool:
    if EXCLUSIVE_PARAMETER not in request.parameters:
        return False
    value = parameter_value(request.parameters[EXCLUSIVE_PARAMETER])
    if not isinstance(value, bool):
        raise InvalidArgument(f"parameter '{EXCLUSIVE_PARAMETER}' must be a bool, got {value!r}")
    return value


#: Request parameters the protocol or the server itself reads, never handed to a model.
PROTOCOL_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
                                 "binary_data_output", "headers"})


def model_parameters(request: pb.ModelInferRequest) -> dict[str, bool | int | float | str]:
    """The parameters a request carries for its model."""
    return {
        name: parameter_value(value) for name, value in request.parameters.items()
        if not name.startswith("tensorfleet.") and name not in PROTOCOL_PARAMETERS
    }


def decode_request(
    request: pb.ModelInferRequest, config: ModelConfig, raw: Sequence[bytes | memoryview] | None = None
) -> DecodedRequest:
    """Validate names, dtypes, shapes, byte sizes and the batch limit; return decoded inputs.

    `raw`: the raw input buffers when they travel beside the message (core/wire.py)."""
    raw = request.raw_input_contents if raw is None else raw
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; "
            "send one raw buffer per input, or none"
        )
    inputs: dict[str, np.ndarray] = {}
    length = 0
    companions = _sparse_companions(request, config)
    for index, tensor in enumerate(request.inputs):
        if tensor.name in companions:
            continue  # a CSR input's indices or offsets: decoded with its values
        spec = config.input(tensor.name)
        if spec is None:
            known = [s.name for s in config.inputs]
            raise InvalidArgument(f"unknown input '{tensor.name}' for model '{config.name}'; it takes {known}")
        if tensor.name in inputs:
            raise InvalidArgument(f"input '{tensor.name}' is given more than once")
        if spec.sparse and tensor.name + INDPTR_SUFFIX in companions.values():
            inputs[tensor.name] = _decode_csr(request, raw, spec, config)
            continue
        array = _decode_input(tensor, raw[index] if raw else None, spec, config)
        inputs[tensor.name] = array
        length = max(length, _length(spec, array, config.batched))
    missing = [spec.name for spec in config.inputs if spec.name not in inputs and not spec.optional]
    if missing:
        raise InvalidArgument(f"model '{config.name}' needs input(s) {missing}, which the request lacks")
    rows = _rows(inputs, config)
    requested = [output.name for output in request.outputs]
    for name in requested:
        if config.output(name) is None:
            known = [s.name for s in config.outputs]
            raise InvalidArgument(f"unknown output '{name}' requested from model '{config.name}'; it has {known}")
    return DecodedRequest(
        inputs=inputs, rows=rows, length=length, exclusive=_exclusive(request), requested_outputs=requested,
        parameters=model_parameters(request) if request.parameters else {},
    )


def _sparse_companions(request: pb.ModelInferRequest, config: ModelConfig) -> dict[str, str]:
    """Companion tensor name -> itself, for the indices and offsets of CSR inputs in this request."""
    sparse = [spec.name for spec in config.inputs if spec.sparse]
    if not sparse:
        return {}
    names = {tensor.name for tensor in request.inputs}
    out = {}
    for name in sparse:
        parts = [name + INDICES_SUFFIX, name + INDPTR_SUFFIX]
        present = [part for part in parts if part in names]
        if present and (len(present) != 2 or name not in names):
            raise InvalidArgument(
                f"input '{name}' takes CSR rows as three tensors: '{name}' (values), '{parts[0]}', '{parts[1]}'; "
                f"the request has {sorted(n for n in names if n == name or n in parts)}"
            )
        out.update({part: part for part in present})
    return out


def _decode_csr(
    request: pb.ModelInferRequest, raw: Sequence[bytes | memoryview] | None, spec: TensorSpec, config: ModelConfig,
) -> Any:
    """A CSR input's three tensors, checked (core/sparse.py), as a scipy.sparse.csr_matrix."""
    import scipy.sparse

    position = {tensor.name: i for i, tensor in enumerate(request.inputs)}
    arrays = {}
    for name, datatype in ((spec.name, spec.datatype), (spec.name + INDICES_SUFFIX, None),
                           (spec.name + INDPTR_SUFFIX, None)):
        tensor = request.inputs[position[name]]
        if datatype is None and tensor.datatype not in ("INT32", "INT64"):
            raise InvalidArgument(f"input '{name}': datatype {tensor.datatype or '(empty)'}; INT32 or INT64 expected")
        if datatype is not None and tensor.datatype != datatype:
            raise InvalidArgument(
                f"input '{name}': datatype {tensor.datatype or '(empty)'}, model '{config.name}' expects {datatype}"
            )
        shape = list(tensor.shape)
        if len(shape) != 1 or shape[0] < 0:
            raise InvalidArgument(f"input '{name}': shape {shape}; CSR tensors are one-dimensional")
        buffer = raw[position[name]] if raw else None
        if buffer is not None:
            arrays[name] = decode_raw(name, tensor.datatype, shape, buffer)
        else:
            arrays[name] = decode_contents(name, tensor.datatype, shape, tensor.contents)
    values, indices, indptr = arrays.values()
    columns = spec.shape[0]
    rows = check_csr(spec.name, values, indices, indptr, columns)
    if rows == 0:
        raise InvalidArgument(f"input '{spec.name}': no rows; send at least one row")
    if config.batched and rows > config.max_batch_size:
        raise InvalidArgument(
            f"input '{spec.name}': {rows} rows is over model '{config.name}' max_batch_size {config.max_batch_size}"
        )
    return scipy.sparse.csr_matrix((values, indices, indptr), shape=(rows, columns))


def _rows(inputs: dict[str, np.ndarray], config: ModelConfig) -> int:
    if not config.batched:
        return 1
    counts = {name: int(array.shape[0]) for name, array in inputs.items()}
    distinct = set(counts.values())
    if len(distinct) > 1:
        raise InvalidArgument(f"inputs disagree on the number of rows: {counts}")
    rows = distinct.pop()
    if rows > config.max_batch_size:
        raise InvalidArgument(
            f"batch of {rows} rows is over model '{config.name}' max_batch_size {config.max_batch_size}"
        )
    return rows


def example_inputs(config: ModelConfig, example: dict[str, Any]) -> dict[str, np.ndarray]:
    """One row of warm-up inputs from the config's `warmup` list, shaped like a real request."""
    from tensorfleet.core.codec import NUMPY_DTYPES, to_numpy

    arrays: dict[str, np.ndarray] = {}
    for spec in config.inputs:
        if spec.name not in example:
            if spec.optional:
                continue
            raise InvalidArgument(f"model '{config.name}': warmup example lacks input '{spec.name}'")
        value = example[spec.name]
        if spec.datatype == "BYTES":
            array = to_numpy([value] if isinstance(value, (str, bytes)) else value)
        else:
            array = np.asarray(value, dtype=NUMPY_DTYPES.get(spec.datatype, np.float32))
        arrays[spec.name] = array[np.newaxis, ...] if config.batched else array
    return arrays
