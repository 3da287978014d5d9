"""Part files: one per chunk, written durably (temp, fsync, rename) and read back by mmap.

Layout: magic, 8-byte header length, JSON header (arrays with dtype/shape/offset, a blake2b
digest of the payload), then 64-byte-aligned raw little-endian buffers. String arrays
(ids) are stored as UTF-8 bytes plus int64 offsets; BYTES outputs (object arrays of bytes, any
shape) the same way, as their raw bytes plus offsets, with their shape in the header. An
object array is never written as its buffer: that would be the values' addresses in memory.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import numpy as np

from .encoded_strings import EncodedStrings

MAGIC = b"TFPART1\n"
_ALIGN = 64


class CorruptPart(Exception):
    """A part file that does not hold what its header says: recompute the chunk."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_strings(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    encoded = [str(v).encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype="<i8")
    np.cumsum([len(v) for v in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _encode_bytes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A BYTES array (object array of bytes, or str) in row-major order: its bytes and int64 offsets."""
    encoded = [v.encode() if isinstance(v, str) else bytes(v) for v in values.reshape(-1)]
    offsets = np.zeros(len(encoded) + 1, dtype="<i8")
    np.cumsum([len(v) for v in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def encode_part(arrays: dict[str, np.ndarray], strings: dict[str, np.ndarray]) -> list[memoryview | bytes]:
    """The part file's bytes as pieces (header, padding, raw buffers), to write in order."""
    flat: dict[str, np.ndarray] = {}
    byte_shapes: dict[str, list[int]] = {}
    for name, values in strings.items():
        flat[f"{name}.utf8"], flat[f"{name}.offsets"] = _encode_strings(values)
    for name, values in arrays.items():
        if values.dtype.hasobject:
            flat[f"{name}.bytes"], flat[f"{name}.bytes_offsets"] = _encode_bytes(values)
            byte_shapes[name] = list(values.shape)
            continue
        flat[name] = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    entries, offset = [], 0
    digest = hashlib.blake2b(digest_size=16)
    for name, values in flat.items():
        offset = -(-offset // _ALIGN) * _ALIGN
        entries.append({"name": name, "dtype": values.dtype.str, "shape": list(values.shape), "offset": offset})
        offset += values.nbytes
    for values in flat.values():
        digest.update(memoryview(values).cast("B"))
    header = json.dumps(
        {"arrays": entries, "strings": sorted(strings), "bytes": byte_shapes, "digest": digest.hexdigest(), "size": offset}
    ).encode()
    start = -(-(len(MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
    pieces: list[memoryview | bytes] = [MAGIC + len(header).to_bytes(8, "little") + header]
    position = len(MAGIC) + 8 + len(header)
    for entry, values in zip(entries, flat.values(), strict=True):
        target = start + entry["offset"]
        pieces.append(b"\0" * (target - position))
        pieces.append(memoryview(values).cast("B"))
        position = target + values.nbytes
    return pieces


def file_checksum(pieces: list[memoryview | bytes]) -> str:
    """The checksum the manifest records for a part: blake2b-128 of the whole file's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def checksum_of_file(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_part(path: Path, arrays: dict[str, np.ndarray], strings: dict[str, np.ndarray]) -> str:
    """Write numeric `arrays` and str `strings` to `path` atomically and durably; returns the
    file's checksum (`file_checksum`). A failed write (a full disk) leaves no temp file behind."""
    temp = path.with_name(path.name + ".tmp")
    pieces = encode_part(arrays, strings)
    try:
        with open(temp, "wb") as handle:
            for piece in pieces:
                handle.write(piece)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    os.replace(temp, path)
    fsync_dir(path.parent)
    return file_checksum(pieces)


class Part:
    """A part file opened read-only through mmap (or held in memory, for one read from an object
    store: pass its bytes as `data`); arrays are views into it."""

    def __init__(self, path: Path | str, verify: bool = True, data: bytes | None = None) -> None:
        self.path = path
        self._map: mmap.mmap | bytes
        if data is not None:
            if not data:
                raise CorruptPart(f"{path} is empty")
            self._map = data
        else:
            with open(path, "rb") as handle:
                try:
                    self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                except ValueError:
                    raise CorruptPart(f"{path} is empty") from None
        if self._map[: len(MAGIC)] != MAGIC:
            raise CorruptPart(f"{path} is not a tensorfleet part file")
        size = int.from_bytes(self._map[len(MAGIC) : len(MAGIC) + 8], "little")
        try:
            self.header = json.loads(self._map[len(MAGIC) + 8 : len(MAGIC) + 8 + size])
        except ValueError:
            raise CorruptPart(f"{path}: unreadable header") from None
        self._start = -(-(len(MAGIC) + 8 + size) // _ALIGN) * _ALIGN
        if len(self._map) < self._start + self.header["size"]:
            raise CorruptPart(f"{path} is truncated")
        self._entries = {entry["name"]: entry for entry in self.header["arrays"]}
        #: BYTES arrays: name -> shape (stored as NAME.bytes and NAME.bytes_offsets)
        self._bytes: dict[str, list[int]] = self.header.get("bytes", {})
        if any(np.dtype(entry["dtype"]).hasobject for entry in self.header["arrays"]):
            raise CorruptPart(f"{path} holds an object array written as memory addresses (a BYTES output from "
                              "before parts stored bytes); rerun the job with --restart")
        if verify:
            digest = hashlib.blake2b(digest_size=16)
            for entry in self.header["arrays"]:
                digest.update(memoryview(self._raw(entry)).cast("B"))
            if digest.hexdigest() != self.header["digest"]:
                raise CorruptPart(f"{path}: contents do not match their checksum")

    def _raw(self, entry: dict) -> np.ndarray:
        dtype = np.dtype(entry["dtype"])
        count = int(np.prod(entry["shape"])) if entry["shape"] else 1
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=self._start + entry["offset"]).reshape(
            entry["shape"]
        )

    @property
    def names(self) -> list[str]:
        strings = set(self.header["strings"])
        out = []
        for entry in self.header["arrays"]:
            name = entry["name"]
            base, _, suffix = name.rpartition(".")
            if base in self._bytes and suffix in ("bytes", "bytes_offsets"):
                if suffix == "bytes":
                    out.append(base)
            elif base not in strings:
                out.append(name)
        return out

    def array(self, name: str) -> np.ndarray:
        """A stored array: a view into the file, or for a BYTES array a new object array of bytes."""
        if name not in self._bytes:
            return self._raw(self._entries[name])
        data = self._raw(self._entries[f"{name}.bytes"]).tobytes()
        offsets = self._raw(self._entries[f"{name}.bytes_offsets"])
        shape = tuple(self._bytes[name])
        count = int(np.prod(shape)) if shape else 1
        if len(offsets) != count + 1:
            raise CorruptPart(f"{self.path}: BYTES array '{name}' has {len(offsets) - 1} values for shape {shape}")
        out = np.empty(count, dtype=object)
        out[:] = [data[offsets[i] : offsets[i + 1]] for i in range(count)]
        return out.reshape(shape)

    def strings(self, name: str) -> np.ndarray:
        """A string array (the ids) as an object array of str."""
        return self.encoded_strings(name).decoded()

    def encoded_strings(self, name: str) -> EncodedStrings:
        """A string array as stored (UTF-8 bytes and offsets), copied out of the file: the merge
        digests and compares ids without a str object per row."""
        data = self._raw(self._entries[f"{name}.utf8"]).tobytes()
        offsets = np.array(self._raw(self._entries[f"{name}.offsets"]), dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) < 0):
            raise CorruptPart(f"{self.path}: string array '{name}' has offsets outside its {len(data)} bytes")
        return EncodedStrings(data, offsets)

    def close(self) -> None:
        if isinstance(self._map, bytes):
            return
        try:
            self._map.close()
        except BufferError:  # an array view still points into the map; it closes when that goes
            pass

    def __enter__(self) -> Part:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
