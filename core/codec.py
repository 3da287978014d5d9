"""Tensor codec: numpy / torch / str lists  <->  Open Inference Protocol tensors.

Raw contents are one flat little-endian row-major buffer per tensor and are decoded
with `np.frombuffer` (no copy, read-only view). BYTES elements carry a 4-byte
little-endian length prefix. BF16 has no numpy dtype: it travels as raw 16-bit words
and decodes to float32 exactly.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgument

#: OIP datatype name -> little-endian numpy dtype (BYTES: object array of bytes).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
DATATYPES: frozenset[str] = frozenset([*NUMPY_DTYPES, "BF16"])

#: Which typed `contents` field carries each datatype (FP16 and BF16 travel raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH_PREFIX = struct.Struct("<I")


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype name for a numpy array."""
    kind = array.dtype
    if kind == np.object_ or kind.kind in ("S", "U"):
        return "BYTES"
    for name, dtype in NUMPY_DTYPES.items():
        if name != "BYTES" and kind.newbyteorder("<") == dtype:
            return name
    raise InvalidArgument(f"numpy dtype {kind} has no Open Inference Protocol datatype")


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def to_numpy(value: Any) -> np.ndarray:
    """numpy arrays pass through; torch tensors move to host; lists of str/bytes become BYTES."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):  # duck-typed: the client never imports torch
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            return _Bf16Array.from_words(tensor.contiguous().view(_torch_int16(tensor)).numpy())
        return tensor.contiguous().numpy()
    if isinstance(value, (str, bytes)):
        return np.array([_as_bytes(value)], dtype=object)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, bytes)) for v in value):
        array = np.empty(len(value), dtype=object)
        array[:] = [_as_bytes(v) for v in value]
        return array
    return np.asarray(value)


def _torch_int16(tensor: Any) -> Any:
    import torch  # only reached when the caller already passed a torch tensor

    return torch.int16


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


class _Bf16Array(np.ndarray):
    """uint16 words marked as BF16 so the encoder sends datatype BF16."""

    @classmethod
    def from_words(cls, words: np.ndarray) -> _Bf16Array:
        return np.asarray(words, dtype="<u2").view(cls)


def bf16_words_to_float32(words: np.ndarray) -> np.ndarray:
    """Exact widening: a bf16 word is the top half of a float32."""
    return (words.astype("<u4") << 16).view("<f4")


def float32_to_bf16_words(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even narrowing of float32 to bf16 words."""
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4")
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype("<u2")


def serialize_bytes(array: np.ndarray) -> bytes:
    """Length-prefixed concatenation of BYTES elements in row-major order."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = _as_bytes(item) if isinstance(item, (str, bytes)) else bytes(item)
        parts.append(_LENGTH_PREFIX.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(raw: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """Split a length-prefixed buffer into exactly `count` elements, or say what is wrong."""
    if count * 4 > len(raw):  # checked before allocating: the shape may be absurd
        raise InvalidArgument(
            f"input '{name}': {count} BYTES elements need at least {count * 4} bytes of length "
            f"prefixes, the buffer has {len(raw)}"
        )
    # one copy of the buffer, then slices of it: each element is bytes, and a slice of bytes
    # is one allocation where bytes(memoryview slice) is two (this runs on the event loop)
    data = raw if isinstance(raw, bytes) else bytes(raw)
    size = len(data)
    items: list[bytes] = []
    unpack = _LENGTH_PREFIX.unpack_from
    offset = 0
    for index in range(count):
        if offset + 4 > size:
            raise InvalidArgument(
                f"input '{name}': BYTES buffer ends after {index} of {count} elements "
                f"(no 4-byte length prefix at offset {offset})"
            )
        (length,) = unpack(data, offset)
        offset += 4
        end = offset + length
        if end > size:
            raise InvalidArgument(
                f"input '{name}': BYTES element {index} declares {length} bytes but only "
                f"{size - offset} remain"
            )
        items.append(data[offset:end])
        offset = end
    if offset != size:
        raise InvalidArgument(
            f"input '{name}': BYTES buffer has {size - offset} bytes after its {count} elements"
        )
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def encode_buffer(value: Any) -> tuple[str, list[int], np.ndarray | bytes]:
    """(datatype, shape, raw buffer) for one tensor value; a numeric array is not copied
    when it already is contiguous little-endian (the wire encoder copies it once, when sent)."""
    array = to_numpy(value)
    if isinstance(array, _Bf16Array):
        return "BF16", list(array.shape), np.ascontiguousarray(array.view(np.ndarray), dtype="<u2")
    datatype = datatype_of(array)
    if datatype == "BYTES":
        return datatype, list(array.shape), serialize_bytes(array)
    return datatype, list(array.shape), np.ascontiguousarray(array, NUMPY_DTYPES[datatype])


def encode_raw(value: Any) -> tuple[str, list[int], bytes]:
    """(datatype, shape, raw bytes) for one tensor value."""
    datatype, shape, buffer = encode_buffer(value)
    return datatype, shape, buffer if isinstance(buffer, bytes) else buffer.tobytes()


def expected_byte_size(datatype: str, shape: Sequence[int]) -> int | None:
    """Byte size a raw buffer must have (None for BYTES, whose size is data-dependent)."""
    if datatype == "BYTES":
        return None
    itemsize = 2 if datatype == "BF16" else NUMPY_DTYPES[datatype].itemsize
    return element_count(shape) * itemsize


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """Zero-copy decode of one raw buffer, checking its size against dtype and shape."""
    if datatype not in DATATYPES:
        raise InvalidArgument(f"tensor '{name}': unknown datatype '{datatype}'")
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"tensor '{name}': shape {list(shape)} has a negative dimension")
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(raw, count, name).reshape(shape)
    expected = expected_byte_size(datatype, shape)
    if len(raw) != expected:
        raise InvalidArgument(
            f"tensor '{name}': {datatype} shape {list(shape)} needs {expected} bytes, got {len(raw)}"
        )
    if datatype == "BF16":
        return bf16_words_to_float32(np.frombuffer(raw, "<u2")).reshape(shape)
    return np.frombuffer(raw, NUMPY_DTYPES[datatype]).reshape(shape)


def decode_contents(name: str, datatype: str, shape: Sequence[int], contents: Any) -> np.ndarray:
    """Decode typed `contents` (JSON written by a person), checking the element count."""
    if datatype not in DATATYPES:
        raise InvalidArgument(f"tensor '{name}': unknown datatype '{datatype}'")
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"tensor '{name}': {datatype} travels in raw contents only")
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"tensor '{name}': shape {list(shape)} has a negative dimension")
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"tensor '{name}': shape {list(shape)} needs {count} elements in {field}, got {len(values)}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    return np.array(values, dtype=NUMPY_DTYPES[datatype]).reshape(shape)
