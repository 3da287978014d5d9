"""The tensor codec, re-exported from tensorfleet.core.codec (client and server encode alike).

Kept so that `tensorfleet.client.codec` imports keep working for users."""

from tensorfleet.core.codec import (
    CONTENTS_FIELD,
    DATATYPES,
    NUMPY_DTYPES,
    bf16_words_to_float32,
    datatype_of,
    decode_contents,
    decode_raw,
    deserialize_bytes,
    element_count,
    encode_buffer,
    encode_raw,
    expected_byte_size,
    float32_to_bf16_words,
    serialize_bytes,
    to_numpy,
)

__all__ = [
    "bf16_words_to_float32",
    "CONTENTS_FIELD",
    "datatype_of",
    "DATATYPES",
    "decode_contents",
    "decode_raw",
    "deserialize_bytes",
    "element_count",
    "encode_buffer",
    "encode_raw",
    "expected_byte_size",
    "float32_to_bf16_words",
    "NUMPY_DTYPES",
    "serialize_bytes",
    "to_numpy",
]
