"""The tensor codec: raw round trips for every datatype, BYTES framing, BF16, clear errors."""

import numpy as np
import pytest

from tensorfleet.core.codec import (
    NUMPY_DTYPES,
    bf16_words_to_float32,
    decode_raw,
    encode_raw,
    float32_to_bf16_words,
    serialize_bytes,
)
from tensorfleet.core.errors import InvalidArgument


@pytest.mark.parametrize("datatype", [d for d in NUMPY_DTYPES if d != "BYTES"])
def test_raw_round_trip_keeps_values_and_shape(datatype):
    rng = np.random.default_rng(0)
    array = (rng.random((3, 4)) * 100).astype(NUMPY_DTYPES[datatype])
    name, shape, raw = encode_raw(array)
    assert name == datatype and shape == [3, 4]
    decoded = decode_raw("x", name, shape, raw)
    np.testing.assert_array_equal(decoded, array)


def test_decode_is_zero_copy_over_the_message_bytes():
    raw = np.arange(8, dtype="<f4").tobytes()
    decoded = decode_raw("x", "FP32", [2, 4], raw)
    assert not decoded.flags.owndata and not decoded.flags.writeable


def test_bytes_are_length_prefixed_little_endian():
    raw = serialize_bytes(np.array([b"ab", b""], dtype=object))
    assert raw == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    assert list(decode_raw("s", "BYTES", [2], raw)) == [b"ab", b""]


def test_strings_and_lists_encode_as_bytes():
    name, shape, raw = encode_raw(["MKV", "é"])
    assert name == "BYTES" and shape == [2]
    assert list(decode_raw("s", name, shape, raw)) == [b"MKV", "é".encode()]


@pytest.mark.parametrize(
    "raw, count, needle",
    [
        (b"\x05\x00\x00\x00ab", 1, "declares 5 bytes"),
        (b"\x01\x00", 1, "need at least 4 bytes of length prefixes"),
        (b"\x03\x00\x00\x00abc\x00\x00", 2, "no 4-byte length prefix at offset 7"),
        (b"\x01\x00\x00\x00ab", 1, "after its 1 elements"),
    ],
)
def test_bad_bytes_framing_names_the_tensor(raw, count, needle):
    with pytest.raises(InvalidArgument, match="seq") as info:
        decode_raw("seq", "BYTES", [count], raw)
    assert needle in info.value.message


def test_byte_size_mismatch_says_what_was_expected():
    with pytest.raises(InvalidArgument, match=r"'x': FP32 shape \[2, 2\] needs 16 bytes, got 12"):
        decode_raw("x", "FP32", [2, 2], b"\0" * 12)


def test_bf16_round_trip_is_exact_for_representable_values():
    values = np.array([1.0, -2.5, 0.15625, 2.0**100], dtype=np.float32)
    words = float32_to_bf16_words(values)
    np.testing.assert_array_equal(bf16_words_to_float32(words), values)


def test_torch_bf16_tensor_travels_as_bf16():
    torch = pytest.importorskip("torch")
    tensor = torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)
    name, shape, raw = encode_raw(tensor)
    assert name == "BF16" and shape == [1, 2]
    np.testing.assert_array_equal(decode_raw("t", name, shape, raw), [[1.5, -2.0]])
