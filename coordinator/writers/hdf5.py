"""HDF5: one chunked dataset per output, plus ids, ok, error, an errors group and provenance attributes."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from .base import WriteContext, Writer, register, rows_per_chunk

STRING = h5py.string_dtype("utf-8")


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
        for column in context.columns:
            chunk_rows = min(max(rows, 1), rows_per_chunk(column.row_bytes))
            self._file.create_dataset(
                column.name,
                shape=(rows, *column.row_shape),
                dtype=column.dtype,
                chunks=(chunk_rows, *column.row_shape) if rows else None,
                compression=compression if rows else None,
                track_times=False,
            )
        self._file.create_dataset("ok", shape=(rows,), dtype=bool, chunks=id_chunks if rows else None)
        self._file.create_dataset("error", shape=(rows,), dtype=STRING, chunks=id_chunks if rows else None)

    def write(self, start, ids, arrays, ok, error) -> None:
        stop = start + len(ids)
        self._file["ids"][start:stop] = ids
        for name, values in arrays.items():
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
