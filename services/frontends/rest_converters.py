"""Open Inference Protocol REST bodies (KServe v2 / Triton HTTP) <-> data plane values.

An infer body is JSON, optionally followed by binary tensor data (Triton's binary tensor
data extension): header `Inference-Header-Content-Length: N` says the first N bytes are the
JSON; each input with parameter `binary_data_size` takes that many bytes of what follows, in
input order, laid out as in gRPC's raw contents (row-major little-endian; BYTES elements
with a 4-byte length prefix). So a binary input reaches the data plane as a view of the
received body, not a copy, exactly as a gRPC raw buffer does.

Outputs come back as JSON `data`, or as binary after the JSON when the request asks
(output parameter `binary_data`, or request parameter `binary_data_output`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from tensorfleet.core import wire
from tensorfleet.core.codec import DATATYPES, NUMPY_DTYPES, element_count, serialize_bytes
from tensorfleet.core.errors import InvalidArgument
from tensorfleet.core.parameters import set_parameters
from tensorfleet.protos import inference_pb2 as pb

from ..dataplane import InferResult, ModelMetadata, ModelStatistics
from ..repository.repository import ModelEntry

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
_SCALARS = (bool, int, float, str)


#: Integers in a request become int64 (shapes, parameters): anything wider is refused as such.
_INT64 = range(-(2**63), 2**63)


def _json(data: bytes | memoryview, what: str) -> Any:
    """Parsed JSON; bad, too deeply nested or over-long numbers are InvalidArgument, never a 500 (issue 28.12)."""
    try:
        return json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgument(f"{what} is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidArgument(f"{what} is nested too deeply to be a request (JSON arrays/objects)") from None
    except ValueError as error:  # an integer of over 4,300 digits (int_max_str_digits)
        raise InvalidArgument(f"{what} holds a number too long to read: {error}") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _parameters(value: Any, what: str) -> dict[str, bool | int | float | str]:
    params = _object(value if value is not None else {}, f"{what} 'parameters'")
    for key, item in params.items():
        if not isinstance(item, _SCALARS):
            raise InvalidArgument(f"{what} parameter '{key}' must be a bool, number or string, got {item!r:.200}")
        if isinstance(item, int) and item not in _INT64:
            raise InvalidArgument(f"{what} parameter '{key}' is out of the int64 range")
    return params


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """(the parsed JSON header, a view of the binary data after it)."""
    view = memoryview(body)
    if header_length is None:
        return _json(view, "request body"), view[len(view):]
    try:
        size = int(header_length)
    except ValueError:
        raise InvalidArgument(f"header {HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 <= size <= len(view):
        raise InvalidArgument(f"header {HEADER_LENGTH} is {size}, but the body has {len(view)} bytes")
    return _json(view[:size], f"the first {size} bytes of the body ({HEADER_LENGTH})"), view[size:]


def _json_buffer(name: str, datatype: str, shape: list[int], data: Any) -> wire.Buffer:
    """A JSON `data` list (flat or nested, row-major) as the raw buffer gRPC would carry."""
    count = element_count(shape)
    if datatype not in DATATYPES:
        raise InvalidArgument(f"input '{name}': unknown datatype '{datatype}'; one of {sorted(DATATYPES)}")
    if datatype == "BYTES":
        flat = np.array(data, dtype=object).reshape(-1) if isinstance(data, list) else np.array([data], dtype=object)
        if flat.size != count:
            raise InvalidArgument(f"input '{name}': shape {shape} needs {count} elements in 'data', got {flat.size}")
        for item in flat:
            if not isinstance(item, str):
                raise InvalidArgument(f"input '{name}': BYTES 'data' must be strings, got {item!r:.200}")
        return serialize_bytes(flat)
    if datatype not in NUMPY_DTYPES:
        raise InvalidArgument(f"input '{name}': {datatype} travels as binary data only ('{BINARY_SIZE}')")
    dtype = NUMPY_DTYPES[datatype]
    try:
        if dtype.kind in "iu" and np.asarray(data).dtype.kind not in "iub":  # 1.5 must not become 1
            raise ValueError("it holds values that are not integers")
        array = np.asarray(data, dtype=dtype)  # an integer out of the type's range raises
    except (ValueError, TypeError, OverflowError) as error:
        raise InvalidArgument(f"input '{name}': 'data' is not a list of {datatype} values: {error}") from None
    if array.size != count:
        raise InvalidArgument(f"input '{name}': shape {shape} needs {count} elements in 'data', got {array.size}")
    return memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")


def _shape(name: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidArgument(f"input '{name}': 'shape' must be a list of integers, got {value!r:.200}")
    if not all(d in _INT64 for d in value):
        raise InvalidArgument(f"input '{name}': 'shape' has a dimension out of the int64 range")
    return value


def decode_infer(model: str, version: str, body: bytes, header_length: str | None) -> tuple[wire.InferRequest, bool, dict[str, bool]]:
    """(the request for the data plane, binary outputs by default?, binary flag per named output)."""
    doc, binary = split_body(body, header_length)
    doc = _object(doc, "request body")
    params = _parameters(doc.get("parameters"), "request")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"'id' must be a string, got {request_id!r}")
    message = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    set_parameters(message.parameters, {k: v for k, v in params.items() if k != "binary_data_output"})
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("request body needs 'inputs': a non-empty list of tensors")
    raw: list[wire.Buffer] = []
    offset = 0
    for index, item in enumerate(inputs):
        tensor = _object(item, f"inputs[{index}]")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"inputs[{index}] needs a 'name' (string)")
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidArgument(f"input '{name}' needs a 'datatype' (string)")
        shape = _shape(name, tensor.get("shape"))
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        size = _parameters(tensor.get("parameters"), f"input '{name}'").get(BINARY_SIZE)
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(f"input '{name}': '{BINARY_SIZE}' must be a non-negative integer")
            if "data" in tensor:
                raise InvalidArgument(f"input '{name}': has both 'data' and '{BINARY_SIZE}'; send one")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input '{name}': '{BINARY_SIZE}' {size} at offset {offset}, "
                    f"but the binary data has {len(binary)} bytes"
                )
            raw.append(binary[offset:offset + size])
            offset += size
        elif "data" in tensor:
            raw.append(_json_buffer(name, datatype, shape, tensor["data"]))
        else:
            raise InvalidArgument(f"input '{name}' has neither 'data' nor parameter '{BINARY_SIZE}'")
    if offset != len(binary):
        raise InvalidArgument(f"the body has {len(binary) - offset} bytes of binary data that no input claims")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidArgument("request parameter 'binary_data_output' must be a bool")
    wanted: dict[str, bool] = {}
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list")
    for index, item in enumerate(outputs):
        output = _object(item, f"outputs[{index}]")
        name = output.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"outputs[{index}] needs a 'name' (string)")
        flag = _parameters(output.get("parameters"), f"output '{name}'").get("binary_data", default_binary)
        if not isinstance(flag, bool):
            raise InvalidArgument(f"output '{name}': parameter 'binary_data' must be a bool")
        wanted[name] = flag
        message.outputs.add(name=name)
    return wire.InferRequest(message, raw), default_binary, wanted


def _json_data(name: str, datatype: str, array: np.ndarray) -> list:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        try:
            return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in flat]
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"output '{name}' holds bytes that are not UTF-8; ask for it with parameter 'binary_data'"
            ) from None
    if datatype == "BF16":
        raise InvalidArgument(f"output '{name}' is BF16, which travels as binary data only")
    values = flat.tolist()
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return [v if math.isfinite(v) else str(v) for v in values]  # JSON has no NaN/inf
    return values


def encode_infer(
    request: pb.ModelInferRequest, result: InferResult, default_binary: bool, wanted: dict[str, bool]
) -> tuple[bytes, int | None]:
    """(the response body, the JSON header's length when binary data follows it)."""
    config = result.config
    outputs: list[dict[str, Any]] = []
    buffers: list[wire.Buffer] = []
    for spec in config.outputs:
        if spec.name not in result.outputs:
            continue
        array = result.outputs[spec.name]
        entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape)}
        if wanted.get(spec.name, default_binary):
            buffer = serialize_bytes(array) if spec.datatype == "BYTES" else np.ascontiguousarray(array)
            entry["parameters"] = {BINARY_SIZE: memoryview(buffer).nbytes}
            buffers.append(buffer)
        else:
            entry["data"] = _json_data(spec.name, spec.datatype, array)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": config.name, "model_version": config.version, "outputs": outputs}
    if request.id:
        doc["id"] = request.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not buffers:
        return header, None
    return b"".join([header, *buffers]), len(header)


def model_metadata_json(metadata: ModelMetadata) -> dict[str, Any]:
    def tensors(items):
        return [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in items]

    return {
        "name": metadata.name,
        "versions": metadata.versions,
        "platform": metadata.platform,
        "inputs": tensors(metadata.inputs),
        "outputs": tensors(metadata.outputs),
    }


def _duration(value) -> dict[str, int]:
    return {"count": value.count, "ns": value.ns}


def statistics_json(found: list[ModelStatistics]) -> dict[str, Any]:
    """Triton's statistics JSON: numbers as numbers (perf_analyzer reads them so)."""
    models = []
    for each in found:
        stats = each.stats
        with stats.lock:
            fields = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
            batch_fields = ("compute_input", "compute_infer", "compute_output")
            models.append({
                "name": each.name,
                "version": each.config.version if each.config else "",
                "last_inference": stats.last_inference_ms,
                "inference_count": stats.inference_count,
                "execution_count": stats.execution_count,
                "inference_stats": {f: _duration(getattr(stats, f)) for f in fields},
                "batch_stats": [
                    {"batch_size": size, **{f: _duration(getattr(stats.by_batch_size[size], f)) for f in batch_fields}}
                    for size in sorted(stats.by_batch_size)
                ],
                "stage_stats": {stage: _duration(value) for stage, value in stats.stages.items()},
            })
    return {"model_stats": models}


def repository_index_json(entries: list[ModelEntry]) -> list[dict[str, str]]:
    return [
        {"name": e.name, "version": e.config.version if e.config else "", "state": e.state.value, "reason": e.reason}
        for e in entries
    ]
