"""FASTA: ids from headers (first word), sequences as BYTES. An offset index gives row access."""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np

from ..spec import InputSpec
from .base import FieldInfo, InputError, Reader, register


@register("fasta")
class FastaReader(Reader):
    default_field = "sequence"

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        self.path = Path(spec.path)
        if not self.path.is_file():
            raise FileNotFoundError(spec.path)
        self._starts = array("q")  # offset of each '>' line
        self._ends = array("q")  # offset just past each record
        self._lengths = array("q")  # residues per record
        self._index()
        self._file = open(self.path, "rb")  # noqa: SIM115  (closed in close())

    def _index(self) -> None:
        """One streaming pass: where each record starts and ends, and its sequence length."""
        offset = 0
        length = -1
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if line.startswith(b">"):
                    if length >= 0:
                        self._ends.append(offset)
                        self._lengths.append(length)
                    self._starts.append(offset)
                    length = 0
                elif line.strip():
                    if length < 0:
                        raise InputError(
                            f"{self.path}:{number}: sequence data before the first '>' header; "
                            f"is this a FASTA file?"
                        )
                    length += len(line.strip())
                offset += len(line)
        if length >= 0:
            self._ends.append(offset)
            self._lengths.append(length)

    @property
    def num_rows(self) -> int:
        return len(self._starts)

    def fields(self) -> dict[str, FieldInfo]:
        return {"sequence": FieldInfo("sequence", np.dtype(object), ())}

    def _records(self, start: int, stop: int) -> list[tuple[bytes, bytes]]:
        if start >= stop:
            return []
        self._file.seek(self._starts[start])
        block = self._file.read(self._ends[stop - 1] - self._starts[start])
        records = []
        for text in block.split(b"\n>"):
            header, _, body = text.partition(b"\n")
            records.append((header.lstrip(b">").strip(), b"".join(body.split())))
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

    def close(self) -> None:
        self._file.close()
