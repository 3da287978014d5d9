"""Random reads by uncompressed offset from a plain, gzip or bgzip (BGZF) file.

Text readers index a file in one streaming pass and then read record ranges by offset. For
gzip that needs access points: during the pass, every `SPACING` uncompressed bytes the
decompressor's state is kept (`zlib.Decompress.copy()`, about 40 KiB each); a read starts
from the nearest one at or before its offset (or from where the last read stopped, when
that is nearer) and decompresses at most `SPACING` bytes it does not keep. A bgzip file is a
series of gzip members (64 KiB blocks), so its access points are member starts, every
`MEMBER_SPACING` bytes, and cost no copy. A 1 GiB plain-gzip FASTA keeps 256 access points,
about 10 MiB; the last `CACHE` bytes decompressed are kept, so the requests of one chunk
read their rows once.
"""

from __future__ import annotations

import bisect
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GZIP_MAGIC = b"\x1f\x8b"
SPACING = 4 << 20
MEMBER_SPACING = 256 << 10
CACHE = 8 << 20
_BLOCK = 256 << 10
#: The most uncompressed bytes one decompress call returns (a gzip bomb inflates by pieces).
OUT_BLOCK = 1 << 20
#: The longest piece of a line `lines()` yields at once.
LINE_PIECE = 1 << 20
_GZIP_WBITS = 31  # gzip header and trailer, raw deflate inside


def is_gzip(path: Path | str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


class Unpacked:
    """One input file as its uncompressed bytes: `stream()` once to index, then `read()` anywhere."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.compressed = is_gzip(self.path)
        self._file = open(self.path, "rb")  # noqa: SIM115  (closed in close())
        #: uncompressed offset -> (compressed offset, decompressor state or None at a member start)
        self._points: list[int] = []
        self._states: list[tuple[int, Any | None]] = []
        #: where the last read stopped: (uncompressed, compressed offset, decompressor state)
        self._cursor: tuple[int, int, Any] | None = None
        self._cache: tuple[int, bytes] = (0, b"")

    def stream(self) -> Iterator[bytes]:
        """The uncompressed bytes in blocks, from the start; records access points as it goes."""
        if not self.compressed:
            with open(self.path, "rb") as handle:
                while block := handle.read(_BLOCK):
                    yield block
            return
        self._points, self._states = [], []
        with open(self.path, "rb") as handle:
            produced = 0
            position = 0  # compressed offset of pending[0]: what the decompressor has consumed
            last_point = -SPACING
            decompressor: Any | None = None
            pending = b""
            capped = False  # the last call filled its output: zlib may hold more without new input
            while True:
                if decompressor is None:  # a member starts at `position`
                    if not pending:
                        pending = handle.read(_BLOCK)
                        if not pending:
                            return
                    if produced - last_point >= MEMBER_SPACING or not self._points:
                        self._add_point(produced, position, None)
                        last_point = produced
                    decompressor = zlib.decompressobj(_GZIP_WBITS)
                if not pending and not capped:
                    pending = handle.read(_BLOCK)
                    if not pending:
                        raise OSError(f"{self.path}: the gzip stream ends in the middle of a member (truncated file)")
                try:
                    out = decompressor.decompress(pending, OUT_BLOCK)  # bounded: a bomb inflates by pieces
                except zlib.error as error:
                    raise OSError(f"{self.path}: corrupt gzip data near byte {position}: {error}") from None
                capped = len(out) == OUT_BLOCK
                rest = decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail
                position += len(pending) - len(rest)
                pending = rest
                if decompressor.eof:
                    decompressor, capped = None, False
                elif produced + len(out) - last_point >= SPACING:
                    self._add_point(produced + len(out), position, decompressor.copy())
                    last_point = produced + len(out)
                produced += len(out)
                if out:
                    yield out

    def _add_point(self, uncompressed: int, compressed: int, state: Any | None) -> None:
        self._points.append(uncompressed)
        self._states.append((compressed, state))

    def lines(self, limit: int | None = None) -> Iterator[bytes]:
        """The uncompressed bytes line by line (each with its newline), for an indexing pass. A line
        longer than `limit` comes in pieces of at most `limit` bytes (only the last ends with the
        newline), so a file holding one 12 GiB line never holds it whole."""
        reader = io.BufferedReader(_StreamIO(self.stream()), buffer_size=_BLOCK)
        while piece := reader.readline(limit or LINE_PIECE):
            yield piece

    def read(self, offset: int, size: int) -> bytes:
        """`size` uncompressed bytes from `offset` (after `stream()` has run once for gzip)."""
        if not self.compressed:
            self._file.seek(offset)
            return self._file.read(size)
        cached_at, cached = self._cache
        if cached_at <= offset and offset + size <= cached_at + len(cached):
            return cached[offset - cached_at : offset - cached_at + size]
        index = bisect.bisect_right(self._points, offset) - 1
        if index < 0:
            raise OSError(f"{self.path}: offset {offset} before the first access point; index the file first")
        produced = self._points[index]
        position, state = self._states[index]
        if self._cursor is not None and produced < self._cursor[0] <= offset:
            produced, position, state = self._cursor
        decompressor = state.copy() if state is not None else zlib.decompressobj(_GZIP_WBITS)
        self._file.seek(position)
        pieces: list[bytes] = []
        wanted_end = offset + max(size, min(CACHE, size + CACHE // 2))
        pending = b""  # read, not yet consumed; `position` is its offset
        capped = False
        while produced < wanted_end:
            if not pending and not capped:
                pending = self._file.read(_BLOCK)
                if not pending:
                    break
            out = decompressor.decompress(pending, OUT_BLOCK)
            capped = len(out) == OUT_BLOCK
            rest = decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail
            position += len(pending) - len(rest)
            pending = rest
            if decompressor.eof:
                decompressor, capped = zlib.decompressobj(_GZIP_WBITS), False
            lo = max(offset - produced, 0)
            if lo < len(out):
                pieces.append(out[lo : wanted_end - produced])
            produced += len(out)
        self._cursor = (produced, position, decompressor.copy())
        window = b"".join(pieces)
        self._cache = (offset, window)
        return window[:size]

    def close(self) -> None:
        self._file.close()


class _StreamIO(io.RawIOBase):
    """A read-only raw stream over an iterator of byte blocks (for line iteration)."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._rest:
            try:
                self._rest = next(self._blocks)
            except StopIteration:
                return 0
        count = min(len(buffer), len(self._rest))
        buffer[:count] = self._rest[:count]
        self._rest = self._rest[count:]
        return count
