"""Several input files read as one input: their rows back to back, in the order listed.

`input.path` may list files (or a glob the spec expanded, sorted); each is opened with its own
format's reader and row r of the whole is row r - offset of the file it falls in. A block of
rows may span files: each file's piece is read and the pieces joined (sparse .h5ad rows stay
sparse). Every row also carries `source_file`, the name of the file it came from, which the
output keeps (a column; an obs field in .h5ad). The fields a job can map are those every file
has with the same row shape; ids must be unique across the files (the plan names the files of
a repeated id), or `input.duplicate_ids` makes them so.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import numpy as np

from ...spec import InputSpec
from ...spec.input_files import file_labels
from .base import FieldInfo, InputError, Reader

#: The per-row field naming each row's file: a column of table outputs, an obs field of .h5ad ones.
SOURCE_FILE = "source_file"


def open_files(spec: InputSpec, open_one: Callable[[InputSpec], Reader]) -> MultiFileReader:
    """Every file of spec.path opened with its format's reader (closed again on any error)."""
    readers: list[Reader] = []
    try:
        for path in spec.path:
            readers.append(open_one(spec.model_copy(update={"path": path})))
        return MultiFileReader(spec, readers)
    except BaseException:
        for reader in readers:
            reader.close()
        raise


def _same(a: FieldInfo, b: FieldInfo) -> bool:
    if a.is_bytes or b.is_bytes:
        return a.is_bytes == b.is_bytes
    return a.row_shape == b.row_shape and np.dtype(a.dtype).kind == np.dtype(b.dtype).kind


class MultiFileReader(Reader):
    """Rows of `readers`, one file after another."""

    def __init__(self, spec: InputSpec, readers: list[Reader]) -> None:
        super().__init__(spec)
        self.readers = readers
        self.names = file_labels([reader.spec.path for reader in readers])
        self.offsets = [0]
        for reader in readers:
            self.offsets.append(self.offsets[-1] + reader.num_rows)
        self.default_field = readers[0].default_field
        self._fields, self._differing = self._common_fields()

    def _common_fields(self) -> tuple[dict[str, FieldInfo], dict[str, str]]:
        """Fields every file has alike (dtype promoted across files); and why each other one is left out."""
        first = self.readers[0].fields()
        common: dict[str, FieldInfo] = {}
        differing: dict[str, str] = {}
        for name, info in first.items():
            dtype = np.dtype(info.dtype)
            for reader, label in zip(self.readers[1:], self.names[1:], strict=True):
                other = reader.fields().get(name)
                if other is None:
                    differing[name] = f"{label} has no field '{name}'"
                    break
                if not _same(info, other):
                    differing[name] = (f"'{name}' has rows of {list(info.row_shape)} {info.dtype} in {self.names[0]} "
                                       f"but {list(other.row_shape)} {other.dtype} in {label}")
                    break
                if not info.is_bytes:
                    dtype = np.result_type(dtype, other.dtype)
            else:
                common[name] = FieldInfo(name, dtype, info.row_shape)
        common[SOURCE_FILE] = FieldInfo(SOURCE_FILE, np.dtype(object), ())
        return common, differing

    @property
    def num_rows(self) -> int:
        return self.offsets[-1]

    def fields(self) -> dict[str, FieldInfo]:
        return self._fields

    def _check(self, field: str) -> None:
        if field not in self._fields:
            why = self._differing.get(field, f"no file has a field '{field}'")
            raise InputError(f"input.path lists {len(self.readers)} files; {why}. A job maps fields every file "
                             f"has with the same row shape (these: {sorted(self._fields)})")

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(file index, local start, local stop) of the files rows [start, stop) fall in."""
        out = []
        index = max(bisect.bisect_right(self.offsets, start) - 1, 0)
        while start < stop and index < len(self.readers):
            base, end = self.offsets[index], self.offsets[index + 1]
            if start < end:
                piece_stop = min(stop, end)
                out.append((index, start - base, piece_stop - base))
                start = piece_stop
            index += 1
        return out

    def _joined(self, pieces: list[Any], empty: Callable[[], Any]) -> Any:
        if not pieces:
            return empty()
        if len(pieces) == 1:
            return pieces[0]
        if any(hasattr(piece, "tocsr") for piece in pieces):  # .h5ad rows kept sparse
            import scipy.sparse

            return scipy.sparse.vstack([scipy.sparse.csr_matrix(piece) for piece in pieces], format="csr")
        return np.concatenate(pieces)

    def _empty(self, field: str) -> np.ndarray:
        info = self._fields[field]
        return np.zeros((0, *info.row_shape), dtype=info.dtype)

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        if field == SOURCE_FILE:
            return self.source_files(start, stop)
        self._check(field)
        dtype = self._fields[field].dtype
        pieces = [self.readers[i].read(field, a, b) for i, a, b in self._pieces(start, stop)]
        if not self._fields[field].is_bytes:
            pieces = [np.asarray(piece, dtype=dtype) for piece in pieces]
        return self._joined(pieces, lambda: self._empty(field))

    def read_block(self, field: str, start: int, stop: int) -> Any:
        if field == SOURCE_FILE:
            return self.source_files(start, stop)
        self._check(field)
        pieces = [self.readers[i].read_block(field, a, b) for i, a, b in self._pieces(start, stop)]
        return self._joined(pieces, lambda: self._empty(field))

    def source_files(self, start: int, stop: int) -> np.ndarray:
        """Each row's file name (str)."""
        out = np.empty(max(stop - start, 0), dtype=object)
        for index, a, b in self._pieces(start, stop):
            offset = self.offsets[index] + a - start
            out[offset : offset + (b - a)] = self.names[index]
        return out

    def row_bytes(self, field: str) -> float:
        if field == SOURCE_FILE:
            return 64.0
        return max(reader.row_bytes(field) for reader in self.readers)

    def ids(self, start: int, stop: int) -> np.ndarray:
        pieces = [self.readers[i].ids(a, b) for i, a, b in self._pieces(start, stop)]
        return self._joined(pieces, lambda: np.zeros(0, dtype=object))

    def lengths(self, field: str, start: int, stop: int) -> np.ndarray:
        if field == SOURCE_FILE:
            return np.array([len(name) for name in self.source_files(start, stop)], dtype=np.int64)
        self._check(field)
        pieces = [self.readers[i].lengths(field, a, b) for i, a, b in self._pieces(start, stop)]
        return self._joined(pieces, lambda: np.zeros(0, dtype=np.int64))

    def where(self, row: int) -> str:
        index = max(bisect.bisect_right(self.offsets, row) - 1, 0)
        return f"{self.names[index]} {self.readers[index].where(row - self.offsets[index])}"

    def row_errors(self, start: int, stop: int) -> dict[int, str]:
        errors: dict[int, str] = {}
        for index, a, b in self._pieces(start, stop):
            base = self.offsets[index]
            errors.update({base + row: message for row, message in self.readers[index].row_errors(a, b).items()})
        return errors

    def stored_fields(self) -> list[FieldInfo]:
        """`source_file`, and what every file's reader keeps beside the outputs."""
        kept = [f for f in self.readers[0].stored_fields() if f.name in self._fields]
        return [self._fields[SOURCE_FILE], *kept]

    def feature_names(self, field: str, column: str | None = None) -> np.ndarray | None:
        """The column names of `field` (an .h5ad's genes) when every file names them alike; a gene
        list that differs between files is an error (one alignment per job)."""
        names = [getattr(reader, "feature_names", lambda *_: None)(field, column) for reader in self.readers]
        if names[0] is None:
            return None
        for label, other in zip(self.names[1:], names[1:], strict=True):
            if other is None or len(other) != len(names[0]) or not np.array_equal(other, names[0]):
                raise InputError(
                    f"input.path: the features (var names) of '{field}' differ between {self.names[0]} and {label}; "
                    "a job aligns one gene list: align the files to one var first, or run them as separate jobs "
                    "(output.per_file)"
                )
        return names[0]

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
