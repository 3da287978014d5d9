"""HDF5: one chunked dataset per output, plus ids, ok, error, an errors group and provenance attributes.

A ragged output (`output.ragged`) is one flat dataset NAME [total entries, ...] holding every
row's entries back to back in input order, plus NAME_offsets int64 [rows + 1]: row i is
NAME[offsets[i]:offsets[i + 1]] (empty for a failed row).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from .base import Ragged, WriteContext, Writer, register, rows_per_chunk

STRING = h5py.string_dtype("utf-8")


def dataset_dtype(dtype: np.dtype) -> np.dtype:
    """The HDF5 type of a column: BYTES (object) outputs become variable-length strings, labelled
    UTF-8 (`.asstr()` reads text back as str); the stored bytes are the model's, unchanged."""
    return STRING if dtype.hasobject else dtype


def checked_bytes(name: str, start: int, values: np.ndarray) -> np.ndarray:
    """A BYTES block as HDF5 strings take it: a NUL byte cannot be stored (HDF5 strings end at
    one), so it is a clear error naming the row rather than a value cut short."""
    per_row = int(np.prod(values.shape[1:], dtype=np.int64))
    for index, value in enumerate(values.reshape(-1)):
        if (b"\0" if isinstance(value, bytes) else "\0") in value:  # str: an input's text field (source_file)
            row = start + index // max(per_row, 1)
            raise ValueError(f"output '{name}', row {row}: a BYTES value holding a NUL byte cannot be stored in "
                             "an HDF5 string; use output.format: parquet for binary outputs")
    return values


def string_array(values: list[str] | np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def write_provenance(attrs: h5py.AttributeManager, provenance: dict) -> None:
    for key, value in provenance.items():
        if value is None:
            continue
        attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)


def write_errors(group: h5py.Group, context: WriteContext) -> None:
    errors = context.errors
    group.attrs["rows_failed"] = len(errors)
    group.create_dataset("row", data=np.array([e.row for e in errors], dtype=np.int64))
    for name in ("id", "code", "message"):
        group.create_dataset(name, data=string_array([getattr(e, name) for e in errors]), dtype=STRING)


@register("hdf5")
class Hdf5Writer(Writer):
    def __init__(self, context: WriteContext) -> None:
        super().__init__(context)
        self._file = h5py.File(context.temp_path, "w", track_order=True)
        rows = context.rows
        compression = context.spec.compression
        id_chunks = (max(1, min(rows, 65536)),)
        self._file.create_dataset("ids", shape=(rows,), dtype=STRING, chunks=id_chunks if rows else None)
        self._filled: dict[str, int] = {}
        for column in context.columns:
            if column.lengths_from:
                self._ragged_dataset(column)
                continue
            chunk_rows = min(max(rows, 1), rows_per_chunk(column.row_bytes))
            self._file.create_dataset(
                column.name,
                shape=(rows, *column.row_shape),
                dtype=dataset_dtype(column.dtype),
                chunks=(chunk_rows, *column.row_shape) if rows else None,
                compression=compression if rows else None,
                track_times=False,
            )
        self._file.create_dataset("ok", shape=(rows,), dtype=bool, chunks=id_chunks if rows else None)
        self._file.create_dataset("error", shape=(rows,), dtype=STRING, chunks=id_chunks if rows else None)

    def _ragged_dataset(self, column) -> None:
        dataset = self._file.create_dataset(
            column.name, shape=(0, *column.row_shape), maxshape=(None, *column.row_shape), dtype=dataset_dtype(column.dtype),
            chunks=(rows_per_chunk(column.row_bytes), *column.row_shape), compression=self.context.spec.compression,
            track_times=False,
        )
        dataset.attrs["offsets"] = f"{column.name}_offsets"
        dataset.attrs["lengths_from"] = column.lengths_from
        offsets = self._file.create_dataset(f"{column.name}_offsets", shape=(self.context.rows + 1,), dtype=np.int64)
        offsets[0] = 0
        self._filled[column.name] = 0

    def write(self, start, ids, arrays, ok, error) -> None:
        stop = start + len(ids)
        self._file["ids"][start:stop] = ids
        for name, values in arrays.items():
            if isinstance(values, Ragged):
                filled = self._filled[name]
                dataset = self._file[name]
                if len(values.values):
                    dataset.resize(filled + len(values.values), axis=0)
                    dataset[filled:] = values.values
                self._file[f"{name}_offsets"][start + 1 : stop + 1] = filled + np.cumsum(values.lengths)
                self._filled[name] = filled + len(values.values)
                continue
            if values.dtype.hasobject:
                values = checked_bytes(name, start, values)
            self._file[name][start:stop] = values
        self._file["ok"][start:stop] = ok
        self._file["error"][start:stop] = error

    def finish(self) -> list[Path]:
        write_errors(self._file.create_group("errors"), self.context)
        write_provenance(self._file.attrs, self.context.provenance)
        self._file.close()
        return []

    def abort(self) -> None:
        self._file.close()
