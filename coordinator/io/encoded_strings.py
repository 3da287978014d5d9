"""Strings as a part file stores them: UTF-8 bytes back to back, and int64 offsets (n + 1).

The merge hands a chunk's ids to the ids digest and to the writer. Decoding them into Python
str objects costs one object per row; a merge of 200,000 cells did it for every id, then
encoded them again for the digest, then decoded the .h5ad output's obs names to compare (issue
31: coordinator CPU per row). Kept as bytes, the digest lays them out with numpy and the .h5ad
writer compares its obs names as bytes; `decoded()` makes the str objects for the writers
that store ids as text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class EncodedStrings:
    """n strings: `data` (their UTF-8 bytes, back to back) and `offsets` (n + 1 int64, from 0)."""

    def __init__(self, data: bytes, offsets: np.ndarray) -> None:
        self.data = data
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != len(data):
            raise ValueError(f"offsets: n + 1 positions from 0 to the {len(data)} bytes")
        self._decoded: np.ndarray | None = None

    @classmethod
    def encode(cls, values: Sequence[str] | np.ndarray) -> EncodedStrings:
        encoded = [str(value).encode() for value in values]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
        return cls(b"".join(encoded), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """Each string's length in bytes."""
        return np.diff(self.offsets)

    def decoded(self) -> np.ndarray:
        """The strings as an object array of str (made once, then kept)."""
        if self._decoded is None:
            bounds = self.offsets.tolist()
            out = np.empty(len(self), dtype=object)
            text = self.data.decode()
            if len(text) == len(self.data):  # ASCII: byte offsets are character offsets
                out[:] = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            else:
                data = self.data
                out[:] = [data[a:b].decode() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            self._decoded = out
        return self._decoded

    def equals_bytes(self, values: Sequence[bytes]) -> bool:
        """Whether `values` (bytes objects, one per string) are these strings, in order."""
        if len(values) != len(self):
            return False
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        return bool(np.array_equal(lengths, self.lengths())) and b"".join(values) == self.data
