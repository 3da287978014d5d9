"""parquet: columns by name; list and fixed-size-list columns become tensors; strings BYTES."""

from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ...spec import InputSpec
from . import base
from .base import FieldInfo, InputError, Reader, register

#: Bytes a decoded value takes, by parquet physical type; strings are measured otherwise.
_DECODED_BYTES = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8, "FIXED_LEN_BYTE_ARRAY": 16}


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_string(kind)


def _list_depth_and_value(kind: pa.DataType) -> tuple[int, pa.DataType]:
    depth = 0
    while pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
        depth += 1
    return depth, kind


def _to_numpy(column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    depth, value_type = _list_depth_and_value(column.type)
    if pa.types.is_string(value_type) or pa.types.is_binary(value_type) or pa.types.is_large_string(value_type):
        if depth:
            raise InputError(f"column '{name}': lists of strings cannot feed a model")
        out = np.empty(len(column), dtype=object)
        out[:] = [v.encode() if isinstance(v, str) else v for v in column.to_pylist()]
        return out
    shape = [len(column)]
    values = column
    for _ in range(depth):
        if values.null_count:
            raise InputError(f"column '{name}' has null lists")
        offsets = np.asarray(values.offsets) if hasattr(values, "offsets") else None
        if offsets is not None and len(values):
            widths = np.diff(offsets)
            if (widths != widths[0]).any():
                raise InputError(f"column '{name}': list lengths differ between rows; tensors need equal lengths")
            shape.append(int(widths[0]))
        elif isinstance(values.type, pa.FixedSizeListType):
            shape.append(values.type.list_size)
        else:
            shape.append(0)
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(shape)


@register("parquet")
class ParquetReader(Reader):
    default_field = ""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        # String columns stay dictionary-encoded until their decoded size is known (_decoded).
        schema = pq.read_schema(spec.path)
        self._file = pq.ParquetFile(spec.path, read_dictionary=[f.name for f in schema if _is_text(f.type)])
        meta = self._file.metadata
        self._offsets = [0]
        for group in range(meta.num_row_groups):
            self._offsets.append(self._offsets[-1] + meta.row_group(group).num_rows)
        self._schema = self._file.schema_arrow
        names = list(self._schema.names)
        if spec.ids and spec.ids not in names:
            raise InputError(f"input.ids: no column '{spec.ids}' in {spec.path} (has: {names})")
        if len(names) == 1:
            self.default_field = names[0]
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    @property
    def num_rows(self) -> int:
        return self._offsets[-1]

    def fields(self) -> dict[str, FieldInfo]:
        out = {}
        for field in self._schema:
            kind = field.type.value_type if pa.types.is_dictionary(field.type) else field.type  # read_dictionary
            depth, value_type = _list_depth_and_value(kind)
            if pa.types.is_string(value_type) or pa.types.is_binary(value_type) or pa.types.is_large_string(value_type):
                out[field.name] = FieldInfo(field.name, np.dtype(object), ())
                continue
            try:
                dtype = np.dtype(value_type.to_pandas_dtype())
            except (NotImplementedError, TypeError):
                continue
            row_shape: tuple[int, ...] = ()
            if depth and self.num_rows:
                row_shape = self._group(field.name, 0).shape[1:]
            out[field.name] = FieldInfo(field.name, dtype, tuple(row_shape))
        return out

    def _group(self, column: str, group: int) -> np.ndarray:
        key = (column, group)
        if key not in self._cache:
            if len(self._cache) >= 8:
                self._cache.pop(next(iter(self._cache)))
            self._check_group(column, group)
            table = self._file.read_row_group(group, columns=[column])
            self._cache[key] = _to_numpy(self._decoded(table.column(0), column, group), column)
        return self._cache[key]

    def _check_group(self, column: str, group: int) -> None:
        """InputError before a row group that would decode to more than the bounds is read. Its
        size comes from the values it counts, not its bytes: encoded, a list of a billion zeros
        takes a few bytes (strings: their encoded size, a lower bound)."""
        meta = self._file.metadata.row_group(group)
        decoded = 0
        for index in range(meta.num_columns):
            chunk = meta.column(index)
            if chunk.path_in_schema == column or chunk.path_in_schema.startswith(f"{column}."):
                width = _DECODED_BYTES.get(chunk.physical_type)
                decoded += chunk.num_values * width if width else chunk.total_uncompressed_size
        self._check_size(column, group, meta.num_rows, decoded, "")

    def _decoded(self, values: pa.ChunkedArray, column: str, group: int) -> pa.ChunkedArray:
        """A dictionary-encoded string column, decoded once its size is known to be within the
        bounds: one long string repeated on every row encodes to the size of one."""
        if not pa.types.is_dictionary(values.type):
            return values
        size = 0
        for chunk in values.chunks:
            lengths = pc.binary_length(chunk.dictionary).fill_null(0).to_numpy(zero_copy_only=False)
            indices = chunk.indices.fill_null(0).to_numpy(zero_copy_only=False)
            if len(lengths):
                size += int(np.bincount(indices, minlength=len(lengths)) @ lengths.astype(np.int64))
        self._check_size(column, group, len(values), size, " of strings")
        return values.cast(values.type.value_type)

    def _check_size(self, column: str, group: int, rows: int, decoded: int, what: str) -> None:
        """InputError when a row group's column decodes to more than the bounds allow."""
        where = f"{self.spec.path}: column '{column}', row group {group} ({rows} rows) decodes to {decoded} bytes{what}"
        per_row = decoded // max(rows, 1)
        if per_row > base.MAX_ROW_BYTES:
            raise InputError(f"{where}, {per_row} a row; at most {base.MAX_ROW_BYTES} a row (TENSORFLEET_MAX_ROW_BYTES)")
        if decoded > base.MAX_ROW_GROUP_BYTES:
            raise InputError(f"{where}; at most {base.MAX_ROW_GROUP_BYTES} (TENSORFLEET_MAX_ROW_GROUP_BYTES): "
                             "rewrite the file with smaller row groups")

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        if field not in self._schema.names:
            raise InputError(f"no column '{field}' in {self.spec.path} (has: {self._schema.names})")
        if start >= stop:
            return self._group(field, 0)[:0] if self.num_rows else np.empty(0)
        first = bisect.bisect_right(self._offsets, start) - 1
        last = bisect.bisect_right(self._offsets, stop - 1) - 1
        pieces = []
        for group in range(first, last + 1):
            base = self._offsets[group]
            array = self._group(field, group)
            pieces.append(array[max(start - base, 0) : min(stop - base, len(array))])
        return pieces[0].copy() if len(pieces) == 1 else np.concatenate(pieces)

    def ids(self, start: int, stop: int) -> np.ndarray:
        if not self.spec.ids:
            return super().ids(start, stop)
        values = self.read(self.spec.ids, start, stop)
        out = np.empty(len(values), dtype=object)
        out[:] = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
        return out

    def close(self) -> None:
        self._cache.clear()
        self._file.close()
