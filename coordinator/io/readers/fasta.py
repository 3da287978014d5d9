"""FASTA as databases ship it: ids from headers (first word), sequences as BYTES.

- Plain, gzip or bgzip (told by the first bytes, not the suffix); one indexing pass keeps each
  record's offset, line and length, so rows are read by range (readers/unpack.py).
- Wrapped lines, blank lines and CRLF line ends are joined away.
- One terminal `*` (a stop codon, as translated sequences end) is removed. A `*` elsewhere
  in the sequence makes the row fail with its record number, line and id; it is not sent.
- Memory stays bounded whatever the file holds: lines are scanned in pieces of at most
  `unpack.LINE_PIECE` bytes, and a record (header, line ends included) over
  `TENSORFLEET_MAX_ROW_BYTES` stops the scan with an error naming it, before it is read.
"""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np

from ...spec import InputSpec
from . import base
from .base import FieldInfo, InputError, Reader, register
from .unpack import Unpacked


@register("fasta")
class FastaReader(Reader):
    default_field = "sequence"

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        self.path = Path(spec.path)
        if not self.path.is_file():
            raise FileNotFoundError(spec.path)
        self._starts = array("q")  # offset of each '>' line (uncompressed)
        self._ends = array("q")  # offset just past each record
        self._lengths = array("q")  # residues per record, terminal '*' excluded
        self._lines = array("q")  # line number of each header
        self._internal_stop: set[int] = set()  # rows with a '*' before their end
        self._last: tuple[int, int, list[tuple[bytes, bytes]]] | None = None
        self._file = Unpacked(self.path)
        try:
            self._index()
        except BaseException:
            self._file.close()
            raise

    def _index(self) -> None:
        """One streaming pass: where each record starts and ends, its length, and its stops."""
        offset = 0
        length = -1
        stars = 0
        last = b""

        def end_record() -> None:
            ends_with_stop = last.endswith(b"*")
            if stars > (1 if ends_with_stop else 0):
                self._internal_stop.add(len(self._ends))
            self._ends.append(offset)
            self._lengths.append(length - (1 if ends_with_stop else 0))

        number = 0  # the line `piece` belongs to
        at_line_start = True
        in_header = False
        limit = base.MAX_ROW_BYTES
        for piece in self._file.lines():  # a long line comes in pieces; only its last ends with b"\n"
            if at_line_start:
                number += 1
                in_header = piece.startswith(b">")
                if in_header:
                    if length >= 0:
                        end_record()
                    self._starts.append(offset)
                    self._lines.append(number)
                    length, stars, last = 0, 0, b""
            if not in_header:
                residues = piece.strip()
                if residues:
                    if length < 0:
                        raise InputError(
                            f"{self.path}:{number}: sequence data before the first '>' header; is this a FASTA file?"
                        )
                    length += len(residues)
                    stars += residues.count(b"*")
                    last = residues
            offset += len(piece)
            at_line_start = piece.endswith(b"\n")
            if self._starts and offset - self._starts[-1] > limit:
                row = len(self._starts) - 1
                raise InputError(
                    f"{self.path}: record {row + 1} (line {self._lines[row]}) is over {limit} bytes "
                    f"(at line {number}); at most {limit} a record (TENSORFLEET_MAX_ROW_BYTES)"
                )
        if length >= 0:
            end_record()

    @property
    def num_rows(self) -> int:
        return len(self._starts)

    def fields(self) -> dict[str, FieldInfo]:
        return {"sequence": FieldInfo("sequence", np.dtype(object), ())}

    def _records(self, start: int, stop: int) -> list[tuple[bytes, bytes]]:
        """(header, sequence) of rows [start, stop): one read from the first record's offset
        to the last one's end. The last span read is kept, so a chunk's ids (read at its lease)
        and its sequences (read once for all its requests) cost one parse."""
        if start >= stop:
            return []
        if self._last is not None and self._last[0] == start and self._last[1] == stop:
            return self._last[2]
        records = self._parse(start, stop)
        self._last = (start, stop, records)
        return records

    def _parse(self, start: int, stop: int) -> list[tuple[bytes, bytes]]:
        block = self._file.read(self._starts[start], self._ends[stop - 1] - self._starts[start])
        records = []
        for text in block.split(b"\n>"):
            header, _, body = text.partition(b"\n")
            sequence = b"".join(body.split())
            records.append((header.lstrip(b">").strip(), sequence[:-1] if sequence.endswith(b"*") else sequence))
        if len(records) != stop - start:
            raise InputError(f"{self.path} changed while reading rows {start}:{stop}")
        return records

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        if field != "sequence":
            raise InputError(f"FASTA has one field, 'sequence', not '{field}'")
        out = np.empty(stop - start, dtype=object)
        out[:] = [sequence for _, sequence in self._records(start, stop)]
        return out

    def ids(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=object)
        out[:] = [header.split(None, 1)[0].decode() if header else "" for header, _ in self._records(start, stop)]
        return out

    def lengths(self, field: str, start: int, stop: int) -> np.ndarray:
        return np.frombuffer(self._lengths, dtype=np.int64)[start:stop].copy()

    def row_bytes(self, field: str) -> float:
        rows = max(len(self._lengths), 1)
        return float(sum(self._lengths)) / rows + 64.0

    def where(self, row: int) -> str:
        return f"record {row + 1} (line {self._lines[row]})"

    def row_errors(self, start: int, stop: int) -> dict[int, str]:
        bad = sorted(row for row in self._internal_stop if start <= row < stop)
        out = {}
        for row in bad:
            sequence = self._records(row, row + 1)[0][1]
            out[row] = (
                f"sequence has a '*' (stop) at residue {sequence.index(b'*') + 1} of {len(sequence)}; "
                "only a terminal '*' is removed"
            )
        return out

    def close(self) -> None:
        self._file.close()
